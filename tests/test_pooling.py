"""The poolings of every family and the capture's masked means: the old formula's numbers (a float32 copy of the
whole input, then the mean) without its copy. A dispatch spy records every tensor an aten op allocates during a
pooling call; none may be larger than one float32 slice of CHUNK_ELEMENTS (the old code's `.float()`,
`x * mask` and `x[select]` each allocate a copy of the whole input)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vlmstates.extraction import pooling
from vlmstates.extraction.adapters import adapter_for_family
from vlmstates.extraction.adapters.declarative import PooledBatch
from vlmstates.extraction.capture import PrefillCapture
from vlmstates.store import MULTIMODAL, VISION_ONLY, layer_key

CHUNK = 4096  # elements: small, so that every input below spans many slices
WIDTH = 64
DTYPES = [torch.bfloat16, torch.float32]
#: largest |new - old| over the largest |old|, float32 rounding of another order of additions: measured 0 to 2.3e-8
#: for bf16 inputs, 0 (unmasked: summed in one piece, as before) to 2.1e-7 (masked, in slices) for float32 inputs
TOLERANCE = 1e-6


class AllocationSpy(TorchDispatchMode):
    """The bytes of the largest storage that an aten op allocated (views of its inputs left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def activations(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """Values like a vision tower's: unit noise around per-channel offsets of a few units."""
    generator = torch.Generator().manual_seed(sum(shape))
    offsets = 4 * torch.randn(shape[-1], generator=generator)
    return (torch.randn(*shape, generator=generator) + offsets).to(dtype)


def assert_close(new: torch.Tensor, old: torch.Tensor) -> None:
    assert new.dtype == torch.float32 and new.shape == old.shape
    assert ((new - old).abs().max() / old.abs().max()).item() <= TOLERANCE


def declarative_case(dtype):
    """Qwen2.5-VL's layout: [patches of all images, Dv] split per sample by image_grid_thw."""
    rows = [700, 300, 1000]
    values = activations(sum(rows), WIDTH, dtype=dtype)
    old = torch.stack([piece.float().mean(dim=0) for piece in torch.split(values, rows)])
    batch = PooledBatch({}, None, None, projector_rows=rows)
    return adapter_for_family("qwen2_5_vl"), values, batch, old


def mllama_case(dtype):
    """Mllama's layout: [B, images, tiles, patches, Dv] with padding tiles that aspect_ratio_mask leaves out."""
    values = activations(3, 1, 4, 130, WIDTH, dtype=dtype)
    select = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 1]], [[1, 0, 0, 0]]], dtype=torch.bool)
    rows = [2, 4, 1]
    kept = values[select]
    old = torch.stack([p.float().reshape(-1, WIDTH).mean(dim=0) for p in torch.split(kept, rows)])
    batch = PooledBatch({}, None, None, projector_rows=rows, projector_select=select)
    return adapter_for_family("mllama"), values, batch, old


def molmo_case(dtype):
    """Molmo's layout: [B, crops, tokens, Dv], the unused tokens marked by image_input_idx < 0."""
    values = activations(3, 5, 144, WIDTH, dtype=dtype)
    index = torch.arange(3 * 5 * 144).reshape(3, 5, 144)
    index[0, 3:] = -1
    index[1, :, 100:] = -1
    weights = (index.reshape(3, -1) >= 0).unsqueeze(-1).float()
    old = (values.float().reshape(3, -1, WIDTH) * weights).sum(dim=1) / weights.sum(dim=1)
    batch = SimpleNamespace(inputs={"image_input_idx": index})
    return adapter_for_family("molmo"), values, batch, old


def phi4_case(dtype):
    """Phi-4's layout: one [tokens, Dv] tensor per image, one image per sample."""
    values = [activations(1, n, WIDTH, dtype=dtype) for n in (900, 1300)]
    old = torch.stack([x.reshape(-1, WIDTH).float().mean(dim=0) for x in values])
    batch = SimpleNamespace(input_ids=torch.zeros(2, 5, dtype=torch.long))
    return adapter_for_family("phi4_multimodal"), values, batch, old


CASES = {"qwen2_5_vl": declarative_case, "mllama": mllama_case, "molmo": molmo_case, "phi4_multimodal": phi4_case}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(pooling, "CHUNK_ELEMENTS", CHUNK)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", CASES)
def test_pooling_gives_the_float32_copys_means_without_copying_the_input(family, dtype):
    adapter, values, batch, old = CASES[family](dtype)
    spy = AllocationSpy()
    with spy:
        new = adapter.pool_projector_input(values, batch)
    assert_close(new, old)
    largest_input = max(v.untyped_storage().nbytes() for v in (values if isinstance(values, list) else [values]))
    assert spy.largest <= CHUNK * 4 < largest_input // 8, (family, spy.largest)


class Passthrough(torch.nn.Module):
    def forward(self, x):
        return x


def capture_multimodal_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The capture's MULTIMODAL vector of `hidden` (a block's output) and the largest allocation of its hook."""
    capture = PrefillCapture(blocks=torch.nn.ModuleList([Passthrough()]), layers=(0,), projector=Passthrough())
    rows = hidden.shape[0]
    last = torch.full((rows,), hidden.shape[1] - 1)
    spy = AllocationSpy()
    with capture.installed():
        capture.arm(last, last, attention_mask, multimodal=True, pool=pooling.mean_of_rows)
        capture.projector(hidden[0])
        with spy:
            capture.blocks[0](hidden)
        vectors = capture.collect()
    assert vectors[VISION_ONLY].shape == (hidden.shape[-1],)
    return vectors[layer_key(MULTIMODAL, 0)], spy.largest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_captures_masked_mean_copies_no_hidden_state(dtype):
    hidden = activations(3, 400, WIDTH, dtype=dtype)
    attention_mask = torch.ones(3, 400, dtype=torch.long)
    attention_mask[0, :150] = 0  # left padding
    attention_mask[2, :399] = 0
    mask = attention_mask.unsqueeze(-1).to(dtype)
    old = (hidden * mask).sum(dim=1, dtype=torch.float32) / mask.sum(dim=1, dtype=torch.float32)
    new, largest = capture_multimodal_mean(hidden, attention_mask)
    assert_close(new, old)
    assert largest <= CHUNK * 4 < hidden.untyped_storage().nbytes() // 8


def test_a_masked_out_nan_stays_out():
    """The capture skips padding positions, not multiplies them by zero (NaN * 0 is NaN)."""
    hidden = activations(2, 50, WIDTH, dtype=torch.bfloat16)
    hidden[0, :10] = float("nan")
    attention_mask = torch.ones(2, 50, dtype=torch.long)
    attention_mask[0, :10] = 0
    mean, _ = capture_multimodal_mean(hidden, attention_mask)
    assert torch.isfinite(mean).all()
    assert_close(mean[0], hidden[0, 10:].float().mean(dim=0))


def test_a_sample_without_rows_is_an_error():
    """Not a NaN vector: a pooling of no rows is an error."""
    batch = PooledBatch({}, None, None, projector_rows=[3, 0])
    with pytest.raises(RuntimeError, match="no rows to average"):
        adapter_for_family("qwen2_5_vl").pool_projector_input(torch.ones(3, WIDTH, dtype=torch.bfloat16), batch)
