"""Snakemake script of rule `probe_summary`: best layer per model and representation, beside the paper's numbers."""

import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

# The package lives in src/ beside scripts/; a job imports it from there, ahead of any installed copy.
_SRC = Path(snakemake.scriptdir).resolve().parent / "src"  # noqa: F821
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from vlmstates.probes import summarise_models  # noqa: E402

metrics = dict(zip(snakemake.params.models, snakemake.input.metrics))  # noqa: F821
summary = summarise_models(metrics, snakemake.output.table, snakemake.output.plot)  # noqa: F821
print(summary.to_string())
