"""The CPU benchmark (vlmstates.extraction.benchmark) on the Molmo stand-in, both layouts, at batch 1 and 4.

    OMP_NUM_THREADS=1 PYTHONPATH=src:tests python -m molmo_standin.benchmark

vlmstates.extraction.benchmark builds its models from vlmstates.demo.tiny, which has no Molmo (the stand-in lives in
tests/); this swaps in the stand-in's loading and runs the benchmark's own engine and HALP-style loop.
Image sizes give the stand-in 2, 3 and 5 crops. Figures of a tiny random model: they show batching at
work, not the speed of the real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import vlmstates.extraction.benchmark as benchmark
from vlmstates.extraction.engine import load_model
from vlmstates.settings import ModelSettings

from . import build_standin_checkpoint

ARGS = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--batch-sizes",
    "1",
    "4",
    "--samples",
    "16",
    "--new-tokens",
    "8",
    "--repeats",
    "3",
    "--image-sizes",
    "160x120",
    "120x160",
    "100x100",
    "200x200",
]


def load_standin(family, args, device, dtype, checkpoints: Path):
    path = build_standin_checkpoint(checkpoints / f"{family}_standin", layout=family)
    settings = ModelSettings(
        name=family,
        model=str(path),
        trust_remote_code=True,
        max_new_tokens=args.new_tokens,
        device=str(device),
        dtype="float32",
    )
    return load_model(settings), f"stand-in {family}"


def main() -> None:
    benchmark.load_benchmark_model = load_standin
    args = benchmark.parse_args(ARGS)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            row
            for f in ("molmo", "molmoe")
            for row in benchmark.benchmark_family(f, args, torch.device("cpu"), torch.float32, Path(folder))
        ]
    print(benchmark.format_table(benchmark.with_ratios(rows)))


if __name__ == "__main__":
    main()
