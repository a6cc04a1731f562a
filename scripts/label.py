"""Snakemake script of rule `label`: label every answer of results/{model}/embeddings.h5."""

import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

# The package lives in src/ beside scripts/; a job imports it from there, ahead of any installed copy.
_SRC = Path(snakemake.scriptdir).resolve().parent / "src"  # noqa: F821
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from vlmstates.labels import label_embeddings  # noqa: E402

summary = label_embeddings(
    snakemake.input.embeddings,  # noqa: F821
    snakemake.output.labels,  # noqa: F821
    method=snakemake.params.method,  # noqa: F821
    labels_file=snakemake.input.get("labels_file"),  # noqa: F821
)
print(
    f"{summary['n_judged']} of {summary['n_total']} answers judged by {summary['method']}, "
    f"{summary['n_hallucinated']} hallucinated; unjudged: {summary['unjudged_by_reason'] or 'none'}"
)
