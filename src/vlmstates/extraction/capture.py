"""Forward hooks that take the needed vectors from the prefill step of generate().

Hooks return None (a returned value would replace the module's output). Each hook fires once per
armed batch: the first call after `arm()` is the prefill; the decoding steps that follow are ignored.
Only the needed positions are copied off the hidden states, never whole sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmstates.extraction.hooks import forward_hooks
from vlmstates.store import MULTIMODAL, PAPER_VISION_TOKEN, QUERY_TOKEN, VISION_ONLY, VISION_TOKEN, layer_key


@dataclass
class _Targets:
    vision_positions: torch.Tensor  # [B] indices into the padded batch
    query_positions: torch.Tensor  # [B]
    attention_mask: torch.Tensor  # [B, L]
    multimodal: bool
    paper_vision_positions: torch.Tensor | None  # [B], the paper code's vision positions, when recorded


@dataclass
class PrefillCapture:
    """Hooks a model while `installed()`; `arm()` before each generate(), `collect()` after it."""

    blocks: torch.nn.ModuleList
    layers: tuple[int, ...]
    projector: torch.nn.Module
    #: a decoder block's output -> its hidden states [B, L, D] (the adapter's `block_hidden_states`)
    block_hidden_states: Callable[[object], torch.Tensor] | None = None
    _pool: Callable[[torch.Tensor], torch.Tensor] | None = None
    _targets: _Targets | None = None
    _captured: dict[str, torch.Tensor] = field(default_factory=dict)

    def installed(self) -> contextlib.AbstractContextManager[None]:
        return forward_hooks(
            before=[(self.projector, self._projector_hook)],
            after=[(self.blocks[k], self._block_hook(k)) for k in self.layers],
        )

    def arm(
        self, vision_positions, query_positions, attention_mask, multimodal: bool, pool, paper_vision_positions=None
    ) -> None:
        """Target the next prefill; `pool` turns the projector's input into one vector per sample;
        `paper_vision_positions` also takes each block's output there (PAPER_VISION_TOKEN)."""
        self._targets = _Targets(vision_positions, query_positions, attention_mask, multimodal, paper_vision_positions)
        self._pool = pool
        self._captured = {}

    def disarm(self) -> None:
        """Drop the targets and whatever a failed prefill captured (device tensors of the failed attempt)."""
        self._targets, self._pool, self._captured = None, None, {}

    def collect(self) -> dict[str, torch.Tensor]:
        """The captured vectors ([B, D] float32 on the CPU), keyed as in the HDF5 file."""
        expected = {VISION_ONLY} | {layer_key(QUERY_TOKEN, k) for k in self.layers}
        missing = expected - set(self._captured)
        if missing:
            raise RuntimeError(f"the prefill step did not reach {sorted(missing)}")
        captured, self._captured, self._targets = self._captured, {}, None
        return captured

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            targets = self._targets
            key = layer_key(QUERY_TOKEN, layer)
            if targets is None or key in self._captured:
                return None
            if self.block_hidden_states is not None:
                hidden = self.block_hidden_states(output)  # [B, L, D]
            else:
                hidden = output[0] if isinstance(output, tuple) else output  # [B, L, D]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            self._store(key, hidden[rows, targets.query_positions.to(hidden.device)])
            self._store(layer_key(VISION_TOKEN, layer), hidden[rows, targets.vision_positions.to(hidden.device)])
            if targets.paper_vision_positions is not None:
                paper = targets.paper_vision_positions.to(hidden.device)
                self._store(layer_key(PAPER_VISION_TOKEN, layer), hidden[rows, paper])
            if targets.multimodal:
                mask = targets.attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
                mean = (hidden * mask).sum(dim=1, dtype=torch.float32) / mask.sum(dim=1, dtype=torch.float32)
                self._store(layer_key(MULTIMODAL, layer), mean)
            return None

        return hook

    def _projector_hook(self, module, args):
        if self._targets is None or VISION_ONLY in self._captured:
            return None
        self._store(VISION_ONLY, self._pool(args[0]))
        return None

    def _store(self, key: str, value: torch.Tensor) -> None:
        self._captured[key] = value.detach().to(device="cpu", dtype=torch.float32)
