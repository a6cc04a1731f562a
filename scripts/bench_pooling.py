"""What pooling a batch's activations costs in memory: the adapters' poolings and the capture's multimodal mean
against the formulas they replaced (a float32 copy, or a masked copy, of the whole input, then the mean).

Each (case, formula) runs in a fresh Python on a bf16 input of the family's layout at one 1024x768 image per
sample (sizes below, approximate for Molmo and Phi-4), and prints the growth of its peak resident memory over
the input's (Linux's VmHWM, reset once the input exists) and its wall time on the CPU. On CUDA the new sums read
bf16 as it is, so there they allocate less still; the old formulas allocate the same copies on any device.

    python scripts/bench_pooling.py [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch

from vlmstates.extraction.adapters import adapter_for_family
from vlmstates.extraction.adapters.declarative import PooledBatch
from vlmstates.extraction.pooling import CHUNK_ELEMENTS, masked_means

QWEN_PATCHES, QWEN_WIDTH = 54 * 74, 1280  # Qwen2.5-VL: 756x1036 (multiples of 28) in 14-pixel patches
MOLMO_CROPS, MOLMO_TOKENS, MOLMO_WIDTH = 13, 144, 1024  # MolmoE-1B: 12 crops and the global image, 12x12 pooled
MLLAMA_TILES, MLLAMA_PATCHES, MLLAMA_WIDTH = 4, 1601, 7680  # Llama-3.2-Vision: 4 tiles, 5 layers concatenated
PHI4_TOKENS, PHI4_WIDTH = 7 * 256, 1152  # Phi-4-multimodal: 3x2 HD crops and the global image
HIDDEN_LENGTH, HIDDEN_WIDTH = 1100, 3584  # Qwen2.5-VL-7B: a prompt of ~1000 image tokens, one decoder layer


def qwen(batch: int):
    rows = [QWEN_PATCHES] * batch
    values = torch.randn(sum(rows), QWEN_WIDTH, dtype=torch.bfloat16)

    def old():
        return torch.stack([p.reshape(-1, QWEN_WIDTH).mean(dim=0) for p in torch.split(values.float(), rows)])

    pooled = PooledBatch({}, None, None, projector_rows=rows)
    return values, old, partial(adapter_for_family("qwen2_5_vl").pool_projector_input, values, pooled)


def mllama(batch: int):
    values = torch.randn(batch, 1, MLLAMA_TILES, MLLAMA_PATCHES, MLLAMA_WIDTH, dtype=torch.bfloat16)
    select = torch.zeros(batch, 1, MLLAMA_TILES, dtype=torch.bool)
    for i in range(batch):  # 1 to 4 real tiles
        select[i, 0, : 1 + i % MLLAMA_TILES] = True
    rows = select.flatten(1).sum(dim=1).tolist()

    def old():
        kept = values[select].float()
        return torch.stack([p.reshape(-1, MLLAMA_WIDTH).mean(dim=0) for p in torch.split(kept, rows)])

    pooled = PooledBatch({}, None, None, projector_rows=rows, projector_select=select)
    return values, old, partial(adapter_for_family("mllama").pool_projector_input, values, pooled)


def molmo(batch: int):
    values = torch.randn(batch, MOLMO_CROPS, MOLMO_TOKENS, MOLMO_WIDTH, dtype=torch.bfloat16)
    index = torch.arange(values[..., 0].numel()).reshape(values.shape[:-1])
    index[:, MOLMO_CROPS // 2 :] = -1  # padding crops
    valid = index.reshape(batch, -1) >= 0

    def old():
        weights = valid.unsqueeze(-1).float()
        return (values.float().reshape(batch, -1, MOLMO_WIDTH) * weights).sum(dim=1) / weights.sum(dim=1)

    pooled = SimpleNamespace(inputs={"image_input_idx": index})
    return values, old, partial(adapter_for_family("molmo").pool_projector_input, values, pooled)


def phi4(batch: int):
    values = [torch.randn(1, PHI4_TOKENS, PHI4_WIDTH, dtype=torch.bfloat16) for _ in range(batch)]

    def old():
        return torch.stack([x.reshape(-1, PHI4_WIDTH).float().mean(dim=0) for x in values])

    pooled = SimpleNamespace(input_ids=torch.zeros(batch, 1, dtype=torch.long))
    return values, old, partial(adapter_for_family("phi4_multimodal").pool_projector_input, values, pooled)


def capture(batch: int):
    hidden = torch.randn(batch, HIDDEN_LENGTH, HIDDEN_WIDTH, dtype=torch.bfloat16)
    attention_mask = torch.ones(batch, HIDDEN_LENGTH, dtype=torch.long)
    attention_mask[::2, : HIDDEN_LENGTH // 10] = 0  # left padding

    def old():
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1, dtype=torch.float32) / mask.sum(dim=1, dtype=torch.float32)

    return hidden, old, lambda: masked_means(hidden, attention_mask.bool())


CASES = {
    "Qwen2.5-VL projector input": qwen,
    "Llama-3.2-Vision projector input": mllama,
    "MolmoE projector input": molmo,
    "Phi-4 projector input": phi4,
    "capture multimodal mean, one layer": capture,
}


def status(field: str) -> int:
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run_one(case: str, formula: str, batch: int) -> None:
    values, old, new = CASES[case](batch)
    pool = old if formula == "old" else new
    torch.ones(8, 8, dtype=torch.bfloat16).sum(dim=0, dtype=torch.float32)  # torch's first-op setup, not measured
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
    before = status("VmRSS")
    start = time.perf_counter()
    result = pool()
    seconds = time.perf_counter() - start
    size = sum(v.untyped_storage().nbytes() for v in (values if isinstance(values, list) else [values]))
    print(json.dumps({"seconds": seconds, "peak_growth": status("VmHWM") - before, "input": size}))
    assert result.dtype == torch.float32


def measure(case: str, formula: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--one", case, formula, "--batch", str(batch)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "FORMULA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(*args.one, args.batch)
        return
    mib = 2**20
    print(f"batch {args.batch}, bf16 inputs, slices of {CHUNK_ELEMENTS} elements, torch {torch.__version__}, CPU\n")
    print("| pooled | input (MiB) | old: peak growth (MiB) | new: peak growth (MiB) | old: s | new: s |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        old, new = measure(case, "old", args.batch), measure(case, "new", args.batch)
        print(
            f"| {case} | {old['input'] / mib:.0f} | {old['peak_growth'] / mib:.0f} | {new['peak_growth'] / mib:.0f} "
            f"| {old['seconds']:.2f} | {new['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
