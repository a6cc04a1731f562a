"""The GPU paths in one command: what torch sees, a reduced benchmark of Qwen2.5-VL and Gemma 3 at full size,
how far bf16 batches drift from batch 1, and the out-of-memory path; one table at the end.

    python scripts/device_check.py                 # on a GPU: full-size random-weight models in bf16
    python scripts/device_check.py --tiny          # anywhere: the tiny checkpoints (automatic without CUDA)

Checks, each saved as one JSON line (--out) the moment it completes, so that a failure loses nothing measured:
  cuda         torch's version and CUDA build, the device and its driver, transformers' version
  benchmark    per family: the engine at batch 1 and at --batch, samples/s and peak memory
  batch_error  per family: batch --batch against batch 1 on the same questions, every recorded layer's
               relative error ||a - b|| / ||b|| per sample (median and 99th percentile; the worst layer in the
               table, every layer in the JSON line), and the share of identical answers
  oom          per family: --batch under a memory fraction just above the weights
               (torch.cuda.set_per_process_memory_fraction), then half the batch each time, as the
               workflow's retries do; reports where it ran out, where it fitted, whether every sample of the
               fitting run is ok, and the memory left allocated after the failed attempts were freed. On the
               CPU the `oom_above` failpoint stands in for the GPU's limit.
A check that fails is recorded with its error and the next one runs. Full size: random weights built from
the real configs (vlmstates.extraction.benchmark.FULL_SIZE), so answers are not meaningful text, and
agreement is that of random logits (many near-ties): compare it between machines, not with real models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlmstates.errors import OutOfDeviceMemory  # noqa: E402
from vlmstates.extraction.benchmark import (  # noqa: E402
    build_full_size,
    peak_memory_mb,
    reset_peak_memory,
    synthetic_inputs,
)
from vlmstates.extraction.engine import (  # noqa: E402
    Extractor,
    configure_cuda_allocator,
    free_device_memory,
    load_model,
)
from vlmstates.settings import ModelSettings  # noqa: E402
from vlmstates.store import STATUS_OK  # noqa: E402

FAMILIES = ("qwen2_5_vl", "gemma3")
#: Images of a HALP-like dataset (COCO-sized photographs).
IMAGE_SIZES = [(640, 480), (480, 640), (640, 427)]
#: Memory above the weights allowed in the OOM check: room for batch 1, not for a batch of 64.
OOM_HEADROOM_GIB = 1.0


class Recorder:
    """Appends each check's record to a JSON lines file as soon as it completes, and keeps it for the table."""

    def __init__(self, path: Path):
        self.path, self.records = path, []
        path.parent.mkdir(parents=True, exist_ok=True)

    def run(self, check: str, family: str, measure) -> dict | None:
        print(f"device check: {check} {family} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            record = {"status": "ok", **measure()}
        except Exception as error:  # recorded, and the next check runs
            traceback.print_exc()
            record = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        record = {"check": check, "family": family, "seconds": round(time.perf_counter() - start, 2), **record}
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.records.append(record)
        return record


def cuda_seen() -> dict:
    import transformers

    available = torch.cuda.is_available()
    # before naming the GPU, which initialises CUDA: the checks run with the allocator the jobs use
    allocator = configure_cuda_allocator() if available else None
    driver = None
    try:
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except OSError:
        pass
    return {
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "cuda_available": available,
        "device": torch.cuda.get_device_name(0) if available else f"cpu ({platform.machine()})",
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if available else None,
        "cudnn": torch.backends.cudnn.version() if available else None,
        "allocator": allocator,
        "driver": driver,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "summary": f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        + (torch.cuda.get_device_name(0) if available else "no CUDA device"),
    }


def load(family: str, tiny: bool, device: torch.device, dtype: torch.dtype, workdir: Path, new_tokens: int):
    settings = dict(max_new_tokens=new_tokens, device=str(device), dtype=str(dtype).removeprefix("torch."))
    if not tiny:
        return build_full_size(family, device, dtype, ModelSettings(name=family, model=f"random {family}", **settings))
    from vlmstates.demo.tiny import build_tiny_checkpoint

    path = workdir / "checkpoints" / f"tiny-{family}"
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(family, path)
    return load_model(ModelSettings(name=family, model=str(path), **settings))


def extract(loaded, questions, images, batch_size: int):
    device = loaded.device
    extractor = Extractor(loaded, progress=False, batch_size=batch_size, prefetch=0)
    reset_peak_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = extractor.extract(questions, images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return results, time.perf_counter() - start, peak_memory_mb(device)


def benchmark(runs: dict, loaded, questions, images, batch: int) -> dict:
    row = {}
    for size in (1, batch):
        results, seconds, peak = extract(loaded, questions, images, size)
        runs[size] = results
        failed = [r.error for r in results if r.status != STATUS_OK]
        if failed:
            raise RuntimeError(f"batch {size}: {len(failed)} samples failed, first: {failed[0]}")
        row[f"samples_per_s_batch_{size}"] = round(len(results) / seconds, 3)
        row[f"peak_mb_batch_{size}"] = round(peak)
    row["summary"] = (
        f"{row[f'samples_per_s_batch_{batch}']} samples/s at batch {batch}, {row['samples_per_s_batch_1']} at 1"
    )
    return row


def relative_errors(batched, singles) -> dict[str, np.ndarray]:
    """Per vector key, each sample's ||a - b|| / ||b||."""
    errors = {}
    for key in singles[0].vectors:
        a = np.stack([r.vectors[key] for r in batched]).astype(np.float64)
        b = np.stack([r.vectors[key] for r in singles]).astype(np.float64)
        errors[key] = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)
    return errors


def batch_error(runs: dict, batch: int) -> dict:
    if 1 not in runs or batch not in runs:
        raise RuntimeError("needs the benchmark's batch-1 and batch runs, which failed")
    singles, batched = runs[1], runs[batch]
    errors = relative_errors(batched, singles)
    per_key = {key: {"median": float(np.median(e)), "p99": float(np.percentile(e, 99))} for key, e in errors.items()}
    worst = max(per_key, key=lambda k: per_key[k]["p99"])
    agreement = float(np.mean([a.answer == b.answer for a, b in zip(batched, singles)]))
    return {
        "batch_size": batch,
        "per_key": per_key,
        "worst_key": worst,
        "worst_median": per_key[worst]["median"],
        "worst_p99": per_key[worst]["p99"],
        "answer_agreement": agreement,
        "summary": f"worst {worst}: median {per_key[worst]['median']:.2e}, p99 {per_key[worst]['p99']:.2e}; "
        f"answers {agreement:.0%} equal",
    }


def oom_path(loaded, questions, images, batch: int) -> dict:
    """--batch under a small memory fraction, then half each time (as the workflow's retries do)."""
    device = loaded.device
    on_cuda = device.type == "cuda"
    if on_cuda:
        free_device_memory()
        weights = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (weights + OOM_HEADROOM_GIB * 2**30) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        limit = f"memory fraction {fraction:.3f} ({OOM_HEADROOM_GIB} GiB above the weights)"
    else:  # no device memory to run out of: the failpoint raises as a GPU with room for 1 row would
        os.environ["VLMSTATES_FAILPOINT"] = "oom_above:1"
        limit = "failpoint oom_above:1"
    ran_out, size, left_mb = [], batch, []
    try:
        while True:
            try:
                results, _, _ = extract(loaded, questions, images, size)
                break
            except OutOfDeviceMemory as error:
                ran_out.append(error.batch_size)
                free_device_memory()
                left_mb.append(round(torch.cuda.memory_allocated(device) / 2**20) if on_cuda else 0)
                if size == 1:
                    raise RuntimeError(f"batch 1 does not fit under {limit}") from None
                size = max(1, error.batch_size // 2)
    finally:
        if on_cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        else:
            os.environ.pop("VLMSTATES_FAILPOINT", None)
    all_ok = all(r.status == STATUS_OK for r in results)
    weights_mb = round(weights / 2**20) if on_cuda else 0
    return {
        "limit": limit,
        "ran_out_at": ran_out,
        "fitted_at": size,
        "all_ok": all_ok,
        "weights_mb": weights_mb,
        "allocated_after_free_mb": left_mb,
        "summary": f"ran out at {ran_out}, fitted at {size}, {'all ok' if all_ok else 'FAILED SAMPLES'}; "
        f"after freeing {left_mb} MB allocated (weights {weights_mb} MB)",
    }


def check_family(recorder: Recorder, family: str, args, device, dtype, workdir: Path) -> None:
    """The family's checks; its model is gone when this returns."""
    model: dict = {}

    def loaded_model() -> dict:
        model["loaded"] = load(family, args.tiny, device, dtype, workdir, args.new_tokens)
        return {"summary": f"{model['loaded'].attn_implementation} attention, {model['loaded'].dtype}"}

    if recorder.run("load", family, loaded_model)["status"] != "ok":
        return
    loaded, images = model["loaded"], workdir / "images"
    questions = synthetic_inputs(images, args.samples, IMAGE_SIZES, seed=0)
    runs: dict = {}
    recorder.run("benchmark", family, lambda: benchmark(runs, loaded, questions, images, args.batch))
    recorder.run("batch_error", family, lambda: batch_error(runs, args.batch))
    recorder.run("oom", family, lambda: oom_path(loaded, questions[: args.batch], images, args.batch))


COLUMNS = ("check", "family", "status", "seconds", "result")


def format_table(records: list[dict]) -> str:
    rows = [
        [str(r["check"]), str(r["family"]), r["status"], f"{r['seconds']:.1f}", r.get("summary") or r.get("error", "")]
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(COLUMNS[:-1])]
    lines = [" | ".join([h.ljust(w) for h, w in zip(COLUMNS, widths)] + [COLUMNS[-1]])]
    lines += [" | ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]) for row in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoints in fp32 (the default without CUDA)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--batch", type=int, default=None, help="the batched size (default 64 on a GPU, 4 tiny)")
    p.add_argument("--samples", type=int, default=None, help="questions per run (default: --batch)")
    p.add_argument("--new-tokens", type=int, default=8, help="answer length (greedy; agreement is over it)")
    p.add_argument("--out", type=Path, default=Path("device_check.jsonl"), help="JSON lines, appended")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and images (default: temporary)")
    args = p.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    args.batch = args.batch or (4 if args.tiny else 64)
    args.samples = args.samples or args.batch
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    recorder = Recorder(args.out)
    recorder.run("cuda", "-", cuda_seen)
    with tempfile.TemporaryDirectory(prefix="vlmstates-device-check-") as tmp:
        workdir = args.workdir or Path(tmp)
        for family in args.families:
            check_family(recorder, family, args, device, dtype, workdir)
            free_device_memory()  # the model is gone: its memory back before the next one
    print(format_table(recorder.records))
    print(f"each check's record: {args.out}", file=sys.stderr)
    return recorder.records


if __name__ == "__main__":
    records = main()
    sys.exit(0 if all(r["status"] == "ok" for r in records) else 1)
