"""What tests share besides fixtures: the repository's paths and the commands' command lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: `vlmstates` run by this Python, as a job runs it (the arguments follow)
VLMSTATES = [sys.executable, "-m", "vlmstates"]


def extract_shard_args(settings: dict, table, images, out, shard_size: int, shard: int = 0, **options) -> list[str]:
    """The arguments of `vlmstates extract-shard` for one shard, as rule extract_shard passes them; `options`
    add flags by name (save_every=4 gives --save-every 4)."""
    args = ["extract-shard", "--settings", json.dumps(settings), "--table", str(table), "--images", str(images)]
    args += ["--shard", f"{shard:04d}", "--shard-size", str(shard_size), "--out", str(out)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


class LoadWatch:
    """What a model load does with the device (`watch_the_load`): the `device_map` each from_pretrained
    call was given, outermost first, and the `Module.to` calls on the model it returned, after it returned."""

    def __init__(self):
        self.device_maps: list = []
        self.models: list = []
        self.later_moves: list[tuple] = []


def watch_the_load(monkeypatch) -> LoadWatch:
    """Spy on transformers' from_pretrained and on torch's Module.to for the rest of the test."""
    import torch
    from transformers import PreTrainedModel

    watch = LoadWatch()
    from_pretrained = PreTrainedModel.from_pretrained.__func__
    to = torch.nn.Module.to

    def spied_from_pretrained(cls, *args, **kwargs):
        watch.device_maps.append(kwargs.get("device_map"))
        model = from_pretrained(cls, *args, **kwargs)
        watch.models.append(model)
        return model

    def spied_to(self, *args, **kwargs):
        if any(self is model for model in watch.models):
            watch.later_moves.append((args, kwargs))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spied_from_pretrained))
    monkeypatch.setattr(torch.nn.Module, "to", spied_to)
    return watch
