"""Snakemake script of rule `probe`: logistic-regression and MLP probes on every representation and layer."""

import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821 (snakemake is injected)

# The package lives in src/ beside scripts/; a job imports it from there, ahead of any installed copy.
_SRC = Path(snakemake.scriptdir).resolve().parent / "src"  # noqa: F821
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402

from vlmstates.probes import OUTPUT_FILES, ProbeSettings, run_probes  # noqa: E402

torch.set_num_threads(max(1, snakemake.threads))  # noqa: F821
settings = ProbeSettings.from_mapping(snakemake.params.settings)  # noqa: F821
out_dir = Path(snakemake.output.metrics).parent  # noqa: F821
for path in map(Path, snakemake.output):  # noqa: F821
    if path.parent != out_dir or path.name not in OUTPUT_FILES:
        raise ValueError(f"rule probe: output {path} is not one of {', '.join(OUTPUT_FILES)} in {out_dir}")
run_probes(snakemake.input.embeddings, snakemake.input.labels, out_dir, settings)  # noqa: F821
