"""Forward hooks that take the needed vectors from the prefill step of generate().

Hooks return None (a returned value would replace the module's output). `arm()` installs them for the next
prefill, and each removes itself once it has taken its vectors (its module's first call after `arm()`), so
the decoding steps that follow run without any capture hook.
Only the needed positions are copied off the hidden states, never whole sequences; the position indices go
to the device once per batch, and the batch's vectors leave it in one copy, in `collect()`. Prefill-only
(`arm(..., stop_after_last_layer=True)`): once the last recorded block has given its vectors, its hook raises
`PrefillDone`, so no later block, no LM head and no decoding step is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.hooks import RemovableHandle

from vlmstates.extraction.pooling import masked_means
from vlmstates.store import MULTIMODAL, PAPER_VISION_TOKEN, QUERY_TOKEN, VISION_ONLY, VISION_TOKEN, layer_key


class PrefillDone(Exception):
    """Raised by the last recorded block's hook in a prefill-only run: every vector is taken, the rest of
    the forward is not needed. The engine ends generate() with it; it is never an error."""


@dataclass
class _Targets:
    vision_positions: torch.Tensor  # [B] indices into the padded batch
    query_positions: torch.Tensor  # [B]
    attention_mask: torch.Tensor  # [B, L]
    multimodal: bool
    paper_vision_positions: torch.Tensor | None  # [B], the paper code's vision positions, when recorded
    stop_after_last_layer: bool = False


@dataclass
class PrefillCapture:
    """Hooks a model for one prefill: `arm()` before each generate(), `collect()` after it, inside `installed()`."""

    blocks: torch.nn.ModuleList
    layers: tuple[int, ...]
    projector: torch.nn.Module
    #: a decoder block's output -> its hidden states [B, L, D] (the adapter's `block_hidden_states`)
    block_hidden_states: Callable[[object], torch.Tensor] | None = None
    _pool: Callable[[torch.Tensor], torch.Tensor] | None = None
    _targets: _Targets | None = None
    _captured: dict[str, torch.Tensor] = field(default_factory=dict)
    #: (what, device) -> the armed batch's index tensor or mask there, copied once per batch
    _on_device: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)
    #: key of the vector a hook takes -> the hook, while it waits for the armed prefill
    _hooks: dict[str, RemovableHandle] = field(default_factory=dict)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The scope of the capture's hooks: whatever hook is still waiting when it ends is removed."""
        try:
            yield
        finally:
            self._remove_hooks()

    def arm(
        self,
        vision_positions,
        query_positions,
        attention_mask,
        multimodal: bool,
        pool,
        paper_vision_positions=None,
        stop_after_last_layer: bool = False,
    ) -> None:
        """Target the next prefill; `pool` turns the projector's input into one vector per sample;
        `paper_vision_positions` also takes each block's output there (PAPER_VISION_TOKEN);
        `stop_after_last_layer`: raise PrefillDone once the last recorded block is captured."""
        self._targets = _Targets(
            vision_positions, query_positions, attention_mask, multimodal, paper_vision_positions, stop_after_last_layer
        )
        self._pool = pool
        self._captured = {}
        self._on_device = {}
        self._remove_hooks()
        self._hooks[VISION_ONLY] = self.projector.register_forward_pre_hook(self._projector_hook)
        for k in self.layers:
            self._hooks[layer_key(QUERY_TOKEN, k)] = self.blocks[k].register_forward_hook(self._block_hook(k))

    def disarm(self) -> None:
        """Drop the targets, the hooks and whatever a failed prefill captured (device tensors of the failed
        attempt)."""
        self._remove_hooks()
        self._targets, self._pool, self._captured, self._on_device = None, None, {}, {}

    def collect(self) -> dict[str, torch.Tensor]:
        """The captured vectors ([B, D] float32 on the CPU), keyed as in the HDF5 file."""
        self._remove_hooks()  # those of vectors that the prefill did not reach
        expected = {VISION_ONLY} | {layer_key(QUERY_TOKEN, k) for k in self.layers}
        missing = expected - set(self._captured)
        if missing:
            raise RuntimeError(f"the prefill step did not reach {sorted(missing)}")
        captured, self._captured, self._targets, self._on_device = self._captured, {}, None, {}
        return _to_host_in_one_copy(captured)

    def _block_hook(self, layer: int):
        def hook(module, args, output):
            targets = self._targets
            key = layer_key(QUERY_TOKEN, layer)
            self._hooks.pop(key).remove()  # the prefill's call; no decoding step calls this hook
            if self.block_hidden_states is not None:
                hidden = self.block_hidden_states(output)  # [B, L, D]
            else:
                hidden = output[0] if isinstance(output, tuple) else output  # [B, L, D]
            rows = self._there("rows", hidden.device, lambda: torch.arange(hidden.shape[0]))
            self._store(key, hidden[rows, self._there("query", hidden.device, lambda: targets.query_positions)])
            vision = self._there("vision", hidden.device, lambda: targets.vision_positions)
            self._store(layer_key(VISION_TOKEN, layer), hidden[rows, vision])
            if targets.paper_vision_positions is not None:
                paper = self._there("paper", hidden.device, lambda: targets.paper_vision_positions)
                self._store(layer_key(PAPER_VISION_TOKEN, layer), hidden[rows, paper])
            if targets.multimodal:
                mask = self._there("mask", hidden.device, lambda: targets.attention_mask.bool())
                self._store(layer_key(MULTIMODAL, layer), masked_means(hidden, mask))
            if targets.stop_after_last_layer and layer == max(self.layers):
                raise PrefillDone
            return None

        return hook

    def _projector_hook(self, module, args):
        self._hooks.pop(VISION_ONLY).remove()
        self._store(VISION_ONLY, self._pool(args[0]))
        return None

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def _there(self, what: str, device: torch.device, tensor: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The armed batch's `what` on `device`, copied there on first use (blocks may sit on several devices)."""
        if (what, device) not in self._on_device:
            self._on_device[what, device] = tensor().to(device)
        return self._on_device[what, device]

    def _store(self, key: str, value: torch.Tensor) -> None:
        # float32 on the device: bf16 and fp16 widen exactly, and collect() copies everything at once
        self._captured[key] = value.detach().to(torch.float32)


def _to_host_in_one_copy(captured: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vectors on the CPU, copied off the device in one transfer (one sync) instead of one per vector."""
    if not captured:
        return {}
    keys = list(captured)
    device = captured[keys[0]].device
    flat = torch.cat([captured[k].to(device).reshape(-1) for k in keys]).cpu()
    sizes = [captured[k].numel() for k in keys]
    return {k: part.view(captured[k].shape) for k, part in zip(keys, flat.split(sizes))}
