"""Preprocessing alone: samples/s of the engine's batch preparation (decode the image, run the processor) in
line and with 1, 2 and 4 worker processes, for the real-geometry processors of Qwen2.5-VL, Gemma 3 and
Phi-4-multimodal (vlmstates.extraction.benchmark's full-size builders: the real processor classes and image
geometry, the tiny builders' tokenizers; no weights are built) on synthetic images of two sizes.

python scripts/bench_preprocess.py                       # 96 samples per row, batches of 4
python scripts/bench_preprocess.py --samples 256 --batch-size 16 --workers 1 2 4 8

Each row runs the engine's own code (vlmstates.extraction.engine.BatchPreparer.ahead, the batches planned as the
engine plans them). Reported: samples/s once every worker has delivered its first batch (a job's steady
state), and in brackets over the whole call, the workers' start included (the forkserver is started once,
untimed, before the rows; a job starts it while it plans its batches). Pixel values are cast to bfloat16 as on CUDA; nothing is pinned (that
is the job's process, on CUDA only). The load average is printed with the table: on a shared machine the
figures say more about it than about the code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import torch  # noqa: E402

from vlmstates.extraction.adapters import adapter_for_family  # noqa: E402
from vlmstates.extraction.adapters.base import LoadedModel  # noqa: E402
from vlmstates.extraction.batching import plan_batches, sort_keys  # noqa: E402
from vlmstates.extraction.benchmark import _FULL_SIZE_BUILDERS, FAMILIES, FULL_SIZE, synthetic_inputs  # noqa: E402
from vlmstates.extraction.engine import BatchPreparer, untimed  # noqa: E402
from vlmstates.extraction.preparing import ConfigOnly  # noqa: E402
from vlmstates.settings import ModelSettings  # noqa: E402

SIZES = ((640, 480), (1024, 768))


def processor_only(family: str) -> LoadedModel:
    """The family's full-size processor and config, without a model."""
    _, config, processor = _FULL_SIZE_BUILDERS[family](FULL_SIZE[family])
    processor.tokenizer.padding_side = "left"
    settings = ModelSettings(name=family, model=family)
    return LoadedModel(
        ConfigOnly(config), processor, adapter_for_family(family), settings, torch.device("cpu"), torch.bfloat16, "sdpa"
    )


def samples_per_s(loaded: LoadedModel, workers: int, questions, images: Path, batch_size: int) -> tuple[float, float]:
    """(steady, overall): samples/s after the first max(workers, 1) batches have arrived (the workers started
    and busy), and over the whole call, the workers' start included."""
    batches = plan_batches(sort_keys(loaded, questions, images), batch_size)
    preparer = BatchPreparer(loaded, 0, untimed, workers=workers)
    start = time.perf_counter()
    arrivals, failed = [], []
    for indices, fetched in preparer.ahead(batches, questions, images):
        arrivals.append((time.perf_counter(), len(indices)))
        if fetched.prepared is None:
            failed.append(fetched.error)
    if failed:
        raise RuntimeError(f"{len(failed)} batches failed to prepare, first: {failed[0]}")
    warm = max(workers, 1)
    steady = sum(n for _, n in arrivals[warm:]) / (arrivals[-1][0] - arrivals[warm - 1][0])
    return steady, len(questions) / (arrivals[-1][0] - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--samples", type=int, default=96, help="samples per row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (0: in line)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # in line: one core, as a worker has
    counts = [0, *[n for n in args.workers if n > 0]]
    header = ["family", "image"] + ["in line" if n == 0 else f"{n} worker{'s' if n > 1 else ''}" for n in counts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            loaded = processor_only(family)
            for width, height in SIZES:
                images = Path(tmp) / f"{width}x{height}"
                questions = synthetic_inputs(images, args.samples, [(width, height)], seed=0)
                samples_per_s(loaded, 1, questions[: 2 * args.batch_size], images, args.batch_size)  # the forkserver
                rates = [samples_per_s(loaded, n, questions, images, args.batch_size) for n in counts]
                rows.append(
                    [family, f"{width}x{height}", *[f"{steady:.1f} ({overall:.1f})" for steady, overall in rates]]
                )
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"samples/s of preprocessing once the workers run (in brackets: over the whole call, their start included); "
        f"{args.samples} samples per row, batches of {args.batch_size}"
    )
    print(f"cores: {os.cpu_count()}, load average (1, 5, 15 min) after the run: {os.getloadavg()}")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
