"""Named points where the fault-injection tests kill the process, as a crash or a pre-emption would.

VLMSTATES_FAILPOINT=<name> makes the process SIGKILL itself on reaching <name>: `batch:<k>` after its k-th
computed batch, `rename:<file name>` after writing a file's temporary copy, before renaming it into place,
`preprocess-worker` in a preprocessing worker process as it takes a batch.
`stall:<name>` makes it wait there instead, until a test kills it: a kill from outside then lands at a known
point, not wherever a busy machine's timing puts it. `oom_above:<n>` makes the model's forward raise
torch.OutOfMemoryError whenever its batch has more than n rows (0: every forward), as a GPU that is too
small would (`oom_above_rows`; the engine raises it). Unset (always, outside the tests) a failpoint is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    chosen = os.environ.get("VLMSTATES_FAILPOINT")
    if chosen == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif chosen == f"stall:{name}":
        while True:
            time.sleep(1)


def oom_above_rows() -> int | None:
    """n of `VLMSTATES_FAILPOINT=oom_above:<n>`, None when that failpoint is not chosen."""
    chosen = os.environ.get("VLMSTATES_FAILPOINT", "")
    name, _, rows = chosen.partition(":")
    return int(rows) if name == "oom_above" else None
