"""What a crash costs: one shard run uninterrupted, then killed (SIGKILL) at a batch and resumed.

The job runs as the workflow runs it (`python -m vlmstates extract-shard`); the failpoint makes it kill itself
at the start of a batch. Prints, per kill point, the samples saved before the kill, the wall time of the
killed run plus the resumed run, and the seconds lost against the uninterrupted run.

    python scripts/bench_resume.py [--family qwen2_5_vl] [--shard-size 32] [--save-every 8] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlmstates.dataset import validate_dataset, write_validation_outputs
from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.demo.tiny import build_tiny_checkpoint
from vlmstates.store import read_results


def run_shard(args, checkpoint: Path, table: Path, images: Path, out: Path, failpoint: str | None) -> float:
    settings = {
        "name": "bench",
        "model": str(checkpoint),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    env = {k: v for k, v in os.environ.items() if k != "VLMSTATES_FAILPOINT"}
    if failpoint:
        env["VLMSTATES_FAILPOINT"] = failpoint
    command = [
        sys.executable,
        "-m",
        "vlmstates",
        "extract-shard",
        "--settings",
        json.dumps(settings),
        "--table",
        str(table),
        "--images",
        str(images),
        "--shard",
        "0000",
        "--shard-size",
        str(args.shard_size),
        "--save-every",
        str(args.save_every),
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, timeout=3600)
    return time.perf_counter() - started


def saved_samples(progress: Path) -> int:
    return sum(len(read_results(part)) for part in progress.glob("part_*.h5"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    checkpoint = build_tiny_checkpoint(args.family, root / "checkpoint")
    csv = write_demo_dataset(root / "demo")
    table = root / "questions.csv"
    write_validation_outputs(validate_dataset(csv, root / "demo" / "images"), table, root / "v.json", root / "v.md")
    images = root / "demo" / "images"

    full = run_shard(args, checkpoint, table, images, root / "full" / "shard.h5", None)
    batches = -(-args.shard_size // args.batch_size)
    print(
        f"{args.family}, shard of {args.shard_size}, batch {args.batch_size}, save every {args.save_every}: "
        f"uninterrupted {full:.1f} s ({full / args.shard_size:.2f} s a sample, model load included)"
    )
    print(f"{'killed at':>10} {'saved':>6} {'redone':>7} {'killed+resumed s':>17} {'lost s':>7}")
    for batch in sorted({1, batches // 2, batches - 1}):
        out = root / f"kill-{batch}" / "shard.h5"
        killed = run_shard(args, checkpoint, table, images, out, f"batch:{batch}")
        saved = saved_samples(out.with_suffix(".progress"))
        resumed = run_shard(args, checkpoint, table, images, out, None)
        print(
            f"{'batch ' + str(batch):>10} {saved:>6} {args.shard_size - saved:>7} {killed + resumed:>17.1f} {killed + resumed - full:>7.1f}"
        )


if __name__ == "__main__":
    main()
