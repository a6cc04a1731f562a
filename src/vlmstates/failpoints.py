"""Named points where the fault-injection tests kill the process, as a crash or a pre-emption would.

VLMSTATES_FAILPOINT=<name> makes the process SIGKILL itself on reaching <name>: `batch:<k>` after its k-th
computed batch, `rename:<file name>` after writing a file's temporary copy, before renaming it into place.
Unset (always, outside the tests) a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("VLMSTATES_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
