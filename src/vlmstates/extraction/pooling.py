"""Means in float32 over a model's bf16/fp16 activations, never widening or masking the whole tensor at once.

`x.float().mean()` first makes a float32 copy of all of `x`: for the projector input of a batch of 64
1024x768 images in Qwen2.5-VL that is 1.3 GB of device memory, ~20 GB for 12 MP photographs, and a masked
mean `(x * mask).sum()` makes a copy of `x` too. Here every sum reads `x` in slices of at most
CHUNK_ELEMENTS elements and accumulates in float32 (`sum(dtype=torch.float32)`): on CUDA such a sum reads
bf16/fp16 as it is; on the CPU it widens its input first, so there the slice bounds the copy. bf16 and fp16
widen exactly, so the means are the float32 copy's up to the order of the float32 additions; an unmasked
float32 input is summed in one piece, as before.
"""

from __future__ import annotations

import torch

#: elements read per float32 sum (a 64 MiB float32 slice): what a pooling may widen or mask at once
CHUNK_ELEMENTS = 1 << 24


def mean_of_rows(values: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [D] float32: the mean over every leading dimension."""
    rows = values.reshape(-1, values.shape[-1])  # a view of a contiguous tensor
    if rows.shape[0] == 0:
        raise RuntimeError(f"no rows to average in a tensor of shape {tuple(values.shape)}")
    step = rows.shape[0] if values.dtype == torch.float32 else max(1, CHUNK_ELEMENTS // rows.shape[1])
    parts = [rows[start : start + step].sum(dim=0, dtype=torch.float32) for start in range(0, rows.shape[0], step)]
    return torch.stack(parts).sum(dim=0) / rows.shape[0]


def segment_means(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[N, ..., D] -> [len(counts), D] float32: the mean of each run of `counts[i]` consecutive rows over all
    their patches."""
    return torch.stack([mean_of_rows(piece) for piece in torch.split(values, counts, dim=0)])


def masked_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] and a bool [B, T] on the same device -> [B, D] float32: each row's mean over its positions
    where `mask` is true. Masked-out positions are skipped, not multiplied by zero (a NaN there stays out)."""
    batch, length, width = values.shape
    step = max(1, CHUNK_ELEMENTS // (batch * width))  # even in float32: the masked slice is a copy
    total = torch.zeros(batch, width, dtype=torch.float32, device=values.device)
    for start in range(0, length, step):
        keep = mask[:, start : start + step, None]
        total += torch.where(keep, values[:, start : start + step], 0).sum(dim=1, dtype=torch.float32)
    return total / mask.sum(dim=1, dtype=torch.float32).unsqueeze(-1)
