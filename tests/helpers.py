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
