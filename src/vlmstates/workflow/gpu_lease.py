"""One GPU per extraction job when several run on one machine (`snakemake --resources gpu=K`).

A job takes the first GPU whose lock file it can lock and sets CUDA_VISIBLE_DEVICES before torch starts.
The lock is an flock held by the open file, so the kernel releases it when the process dies, however it
dies. The GPUs leased are those an inherited CUDA_VISIBLE_DEVICES lists (`salloc` handing the whole run
0,1,2,3: each job takes one of them), else all of the machine's; a scheduler that gives each job its own
single GPU (SLURM does) is kept as it is.

An explicit device index (`device: cuda:N`) names the N-th of those GPUs, as it would without a lease: the
job then leases that one (waiting while another job holds it), and the model runs on `cuda`, the one GPU
the job sees (`device_after_lease`). The index never counts among a set the lease has already narrowed.

A job that was given a GPU and cannot use one stops (`check_gpu_usable`) instead of loading the model on the
CPU, in fp32, at twice the planned memory and a hundred times the time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from vlmstates.errors import VlmstatesError

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


class GpuUnavailable(VlmstatesError, RuntimeError):
    """The job was given a GPU (or asked for one) and torch cannot use it; the message says why and the fix."""


#: Oldest Linux driver for each CUDA major version (the minor-version compatibility floor; CUDA 13.0's
#: release notes, 12.x's and 11.x's): a driver older than this makes torch.cuda.is_available() false.
MINIMUM_DRIVER = {"13": "580", "12": "525", "11": "450"}


def visible_devices(env=os.environ) -> list[str] | None:
    """The devices an inherited CUDA_VISIBLE_DEVICES lists (ids or UUIDs), None when it is not set."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def cuda_index(device: str) -> int | None:
    """N of `cuda:N`; None for any other device setting."""
    kind, _, index = device.partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else None


def device_after_lease(device: str, leased: str | None) -> str:
    """The device the model runs on once the job leased one GPU: that GPU is the only one it sees."""
    return "cuda" if leased is not None and cuda_index(device) is not None else device


def lease_gpu(
    num_gpus: int | None = None,
    lock_dir: Path | None = None,
    env=os.environ,
    poll_seconds: float = 2.0,
    wanted: int | None = None,
) -> str | None:
    """Set env["CUDA_VISIBLE_DEVICES"] to a GPU no other job holds and return it (None: no GPU here).

    The GPUs are those an inherited CUDA_VISIBLE_DEVICES lists, else the machine's `num_gpus`; `wanted`
    (N of `device: cuda:N`) leases the N-th of them only."""
    inherited = visible_devices(env)
    if inherited is None:
        candidates = [str(i) for i in range(count_gpus() if num_gpus is None else num_gpus)]
    elif not inherited:
        return None  # CUDA_VISIBLE_DEVICES="": no GPU for this job
    else:
        candidates = inherited
    if not candidates:
        return None
    if wanted is not None:
        if wanted >= len(candidates):
            seen = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if inherited else "on this machine"
            raise GpuUnavailable(
                f"device: cuda:{wanted} names GPU number {wanted} (from 0), but {len(candidates)} are visible "
                f"({seen}); name one of cuda:0 to cuda:{len(candidates) - 1}, or device: auto"
            )
        candidates = [candidates[wanted]]
    if inherited is not None and len(inherited) == 1:
        log.info("using CUDA_VISIBLE_DEVICES=%s as set by the scheduler or user", inherited[0])
        return inherited[0]
    return _lock_one(candidates, Path(lock_dir or default_lock_dir()), env, poll_seconds)


def _lock_one(candidates: list[str], lock_dir: Path, env, poll_seconds: float) -> str:
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in candidates:
            # named by the device's own id, so that jobs given different lists agree on each GPU's lock
            handle = open(lock_dir / f"gpu{re.sub(r'[^A-Za-z0-9-]', '_', device)}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.append(handle)
            env["CUDA_VISIBLE_DEVICES"] = device
            log.info("leased GPU %s (lock %s)", device, handle.name)
            return device
        if not waited:
            log.info("GPUs %s are leased by other jobs; waiting", ",".join(candidates))
            waited = True
        time.sleep(poll_seconds)


def was_given_gpu(device: str, leased: str | None) -> bool:
    """Whether the job should run on a GPU: it asked for one (device: cuda*), leased one, or runs on a
    machine with NVIDIA GPUs without saying `device: cpu` (CUDA_VISIBLE_DEVICES="" there hides them)."""
    if device == "cpu" or device.startswith("mps"):
        return False
    return device.startswith("cuda") or leased is not None or count_gpus() > 0


def check_gpu_usable(device: str, leased: str | None, env=os.environ) -> None:
    """Stop when the job was given a GPU that torch cannot use, naming torch's CUDA and the driver it needs."""
    import torch

    if not was_given_gpu(device, leased) or torch.cuda.is_available():
        return
    cuda = torch.version.cuda
    if cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build; install a CUDA build of the pinned torch"
    else:
        needed = MINIMUM_DRIVER.get(cuda.split(".")[0])
        driver = installed_driver()
        why = (
            f"torch {torch.__version__} was built for CUDA {cuda}, which needs an NVIDIA driver "
            f"{f'>= {needed}' if needed else 'recent enough for it'}; this node's driver: {driver or 'none found'}"
        )
    visible = env.get("CUDA_VISIBLE_DEVICES")
    raise GpuUnavailable(
        f"the job was given a GPU (device: {device}, leased: {leased}, CUDA_VISIBLE_DEVICES="
        f"{visible if visible is not None else '(unset)'}) but torch cannot use it: {why}. "
        f"To run on the CPU on purpose, set the model's device: cpu"
    )


def installed_driver() -> str | None:
    """The NVIDIA kernel driver's version, read without CUDA (None where there is none)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", text)
    return found[1] if found else text.splitlines()[0].strip()
