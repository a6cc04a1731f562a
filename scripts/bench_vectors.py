"""What reading the vectors costs: `vlmstates.load`, `iter_chunks` and `export-hf` on a synthetic embeddings file.

Writes one file with the store's writer (VF, and VT and QT at three layers, random float32), then runs each
operation in a fresh Python and prints its wall time and the growth of its peak resident memory over the
imports (Linux only), beside the bytes of vectors it reads at once: `load` should grow by its result and one
slice, `iter_chunks` by about one chunk, an export by a few written slices. Pages of memory-mapped files count
as resident too (the arrow export maps what it writes back in), though the system can drop them at will.

    python scripts/bench_vectors.py [--rows 4000] [--width 1024] [--chunk-rows 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vlmstates.store import QUERY_TOKEN, VISION_ONLY, VISION_TOKEN, SampleResult, layer_key, write_embeddings

LAYERS = (0, 1, 2)

# Each operation, run in its own interpreter: {path}, {out} and {chunk_rows} are filled in.
OPERATIONS = {
    "load VT layer 1": "vlmstates.load({path!r}, representations=['VT'], layers=[1])",
    "load everything": "vlmstates.load({path!r})",
    "iter_chunks VT layer 1": "[c['VT_layer_1'].sum() for c in vlmstates.iter_chunks({path!r}, ['VT'], [1], "
    "chunk_rows={chunk_rows})]",
    "export-hf arrow": "export_hf_dataset({path!r}, {out!r}, shard_bytes={shard_bytes})",
    "export-hf parquet": "export_hf_dataset({path!r}, {out!r}, format='parquet', shard_bytes={shard_bytes})",
}
# The peak is Linux's VmHWM, reset after the imports (clear_refs 5), less the resident memory before.
MEASURE = """
import time, json
import vlmstates, vlmstates.vectors
from vlmstates.inspection.hf_dataset import export_hf_dataset
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
start = time.perf_counter()
{operation}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_growth_kib": status("VmHWM") - before}}))
"""


def write_file(path: Path, rows: int, width: int) -> dict[str, int]:
    rng = np.random.default_rng(0)
    dims = {VISION_ONLY: width} | {layer_key(r, k): width for r in (VISION_TOKEN, QUERY_TOKEN) for k in LAYERS}
    results = [
        SampleResult(
            f"q{i}",
            f"img{i}.png",
            f"question {i}?",
            "yes",
            answer="yes",
            vectors={key: rng.standard_normal(dim, dtype=np.float32) for key, dim in dims.items()},
        )
        for i in range(rows)
    ]
    write_embeddings(path, results, dims, {"model": "bench", "layers": list(LAYERS)})
    return dims


def measure(operation: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE.format(operation=operation)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=500)
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.h5"
        dims = write_file(path, args.rows, args.width)
        one = args.rows * args.width * 4
        touched = {
            "load VT layer 1": one,
            "load everything": one * len(dims),
            "iter_chunks VT layer 1": args.chunk_rows * args.width * 4,
        }
        shard_bytes = args.chunk_rows * args.width * 4 * len(dims)
        touched |= {"export-hf arrow": shard_bytes, "export-hf parquet": shard_bytes}
        print(
            f"{args.rows} rows, {len(dims)} vectors of width {args.width} (float32): {path.stat().st_size / mib:.0f} MiB"
        )
        print(f"export slices of {args.chunk_rows} rows ({shard_bytes / mib:.1f} MiB)\n")
        print("| operation | seconds | peak memory growth (MiB) | vectors held at once (MiB) | output (MiB) |")
        print("|---|---|---|---|---|")
        for name, template in OPERATIONS.items():
            out = Path(tmp) / f"out-{name.split()[-1]}"
            code = template.format(path=str(path), out=str(out), chunk_rows=args.chunk_rows, shard_bytes=shard_bytes)
            result = measure(code)
            written = f"{folder_bytes(out) / mib:.0f}" if out.exists() else ""
            print(
                f"| {name} | {result['seconds']:.2f} | {result['peak_growth_kib'] / 1024:.0f} | "
                f"{touched[name] / mib:.0f} | {written} |"
            )


if __name__ == "__main__":
    main()
