"""Forward hooks installed for the duration of a `with` block, and removed however it ends."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

#: hook(module, args) -> None, run when the module is called (it sees the module's input)
PreHook = Callable[[torch.nn.Module, tuple], None]
#: hook(module, args, output) -> None, run when the module's forward returns
PostHook = Callable[[torch.nn.Module, tuple, object], None]


@contextlib.contextmanager
def forward_hooks(
    before: Iterable[tuple[torch.nn.Module, PreHook]] = (),
    after: Iterable[tuple[torch.nn.Module, PostHook]] = (),
) -> Iterator[None]:
    """(module, hook) pairs hooked while the block runs. Hooks must return None: a returned value would
    replace the module's input or output."""
    handles = []
    try:
        handles += [module.register_forward_pre_hook(hook) for module, hook in before]
        handles += [module.register_forward_hook(hook) for module, hook in after]
        yield
    finally:
        for handle in handles:
            handle.remove()
