"""One GPU per extraction job when several run on one machine (`snakemake --resources gpu=K`).

A job takes the first GPU whose lock file it can lock and sets CUDA_VISIBLE_DEVICES before torch starts.
The lock is an flock held by the open file, so the kernel releases it when the process dies, however it
dies. A job started by a scheduler that already set CUDA_VISIBLE_DEVICES (SLURM does) keeps that.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_held = []  # open lock files: held for the life of the process


def count_gpus() -> int:
    """NVIDIA GPUs on this machine, counted without initialising CUDA."""
    devices = Path("/proc/driver/nvidia/gpus")
    return len(list(devices.iterdir())) if devices.is_dir() else 0


def default_lock_dir() -> Path:
    return Path(
        os.environ.get("VLMSTATES_GPU_LOCK_DIR", Path(tempfile.gettempdir()) / f"vlmstates-gpu-locks-{os.getuid()}")
    )


def lease_gpu(
    num_gpus: int | None = None, lock_dir: Path | None = None, env=os.environ, poll_seconds: float = 2.0
) -> str | None:
    """Set env["CUDA_VISIBLE_DEVICES"] to a GPU no other job holds and return it (None: no GPU here)."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        log.info("using CUDA_VISIBLE_DEVICES=%s as set by the scheduler or user", env["CUDA_VISIBLE_DEVICES"])
        return env["CUDA_VISIBLE_DEVICES"]
    num_gpus = count_gpus() if num_gpus is None else num_gpus
    if num_gpus == 0:
        return None
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(num_gpus):
            handle = open(lock_dir / f"gpu{index}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.append(handle)
            env["CUDA_VISIBLE_DEVICES"] = str(index)
            log.info("leased GPU %d (lock %s)", index, handle.name)
            return str(index)
        if not waited:
            log.info("all %d GPUs are leased by other jobs; waiting", num_gpus)
            waited = True
        time.sleep(poll_seconds)
