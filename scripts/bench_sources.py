"""Time the materialisation of a parquet source (vlmstates.sources.materialise), and its reuse.

    python scripts/bench_sources.py [--rows 2000] [--images 500] [--size 256]

Builds a POPE-shaped parquet file of --rows questions whose embedded JPEG images are --images distinct
random pictures of --size pixels square (POPE asks several questions of each image), then prints one table
row: the first materialisation (every image decoded once and written once under its SHA-256) and a second
call, which finds the fingerprint unchanged and reuses the materialised set.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from vlmstates.sources import Source, materialise


def parquet_source(folder: Path, rows: int, images: int, size: int) -> Source:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
        encoded.append(buffer.getvalue())
    features = datasets.Features(
        {name: datasets.Value("string") for name in ("question_id", "question", "answer")} | {"image": datasets.Image()}
    )
    table = {
        "question_id": [str(i) for i in range(rows)],
        "question": ["Is there a dog in the image?"] * rows,
        "answer": ["yes"] * rows,
        "image": [{"bytes": encoded[i % images], "path": None} for i in range(rows)],
    }
    path = folder / "pope.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return Source(kind="parquet", path=str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = parquet_source(folder, args.rows, args.images, args.size)
        start = time.perf_counter()
        first = materialise(source, folder / "materialised")
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = materialise(source, folder / "materialised")
        reuse_s = time.perf_counter() - start
        stored = len(list(first.images.iterdir()))
    print("| rows | distinct images | size | first materialisation (s) | reuse (s) | images stored | reused |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.rows} | {args.images} | {args.size} | {first_s:.2f} | {reuse_s:.2f} | {stored} | {again.reused} |")


if __name__ == "__main__":
    main()
