"""Jobs take turns at a model's shards, so that the model is loaded once per job that holds a GPU, not once
per shard (config key `extraction.reuse_loaded_model`).

A job extracts its own shard, then, with the model it has loaded, every shard of the same model that no
job has claimed, while its time limit leaves room for one more; it leaves each finished in the shard's
progress folder (vlmstates.extraction.shards). The shard's own job, when Snakemake runs it, finds it there
and only puts it in place, without loading the model. So each shard keeps its declared output, its resume
from saved progress and its rerun, and SLURM still runs one job per shard; only the work moves to the job
that already has the model on its GPU. A job whose own shard another job is extracting helps with the
others meanwhile, then waits for it.

Who extracts a shard is said by a claim file beside its output (shard_NNNN.claim), created exclusively and
touched every HEARTBEAT_S seconds while held. A claim is a dead job's, and is taken over, when its process
is gone (same host) or it has not been touched for STALE_AFTER_S seconds (any host: a shared filesystem).

What a turn's failure does: too many failed samples, or running out of device memory, leaves that shard,
with its saved progress, to its own job (which fails or retries as it would have) and, for memory, ends
this job's turns; a Ctrl-C or SIGTERM saves the progress and releases the claim.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vlmstates.dataset import read_validated_table
from vlmstates.errors import RestartJob
from vlmstates.extraction.shards import (
    ShardFailed,
    count_shards,
    extract_shard,
    extractor_loader,
    progress_folder,
)

log = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"
HEARTBEAT_S = 30.0
#: A claim untouched this long belongs to a job that died on another host (ten missed heartbeats).
STALE_AFTER_S = 10 * HEARTBEAT_S
#: How often a job waiting for its own shard looks again.
WAIT_POLL_S = 5.0
#: Room kept below a job's time limit beyond the expected duration of one more shard.
TIME_MARGIN_S = 120.0


def shard_path(own_out: str | Path, shard: int) -> Path:
    """Another shard's declared output, beside this job's (shard_NNNN.h5)."""
    return Path(own_out).with_name(f"shard_{shard:04d}.h5")


def claim_path(out_path: str | Path) -> Path:
    return Path(out_path).with_suffix(CLAIM_SUFFIX)


@dataclass
class Claim:
    """This job's claim on a shard: the file, held and touched by a heartbeat thread until released."""

    path: Path
    token: str
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def take(cls, path: Path, label: str) -> Claim | None:
        """The claim, or None while a live job holds it (a dead job's claim is taken over)."""
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job": label, "token": token}
        for _ in range(2):  # a second try after removing a dead job's claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _remove_if_dead(path):
                    return None
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(record, file)
            claim = cls(path, token)
            threading.Thread(target=claim._beat, name="vlmstates-claim", daemon=True).start()
            return claim
        return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed as stale after all: the job holding it now says so in its log
                return

    def release(self) -> None:
        self._stop.set()
        if (_holder(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def holder_line(path: Path) -> str:
    holder = _holder(path) or {}
    return f"{holder.get('job', 'a job')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"


def _remove_if_dead(path: Path) -> bool:
    """Remove a dead job's claim; False while its job is alive. A claim being written (no content yet)
    counts as alive unless it is stale by its age."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True  # released meanwhile
    holder = _holder(path)
    dead = age > STALE_AFTER_S
    if holder and holder.get("host") == socket.gethostname():
        dead = dead or not _process_alive(int(holder.get("pid", 0)))
    if not dead:
        return False
    # renamed before removal, so that of two jobs finding it dead only one takes it over
    grave = path.with_name(f"{path.name}.dead-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True
    log.warning("claim %s of %s was left by a job that is gone; taking it over", path, holder_line(grave))
    grave.unlink(missing_ok=True)
    return True


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class TimeBudget:
    """Whether a job's time limit (seconds; None: none) leaves room for one more shard, judged by the
    seconds per question of the shards this job has extracted."""

    def __init__(self, limit_s: float | None):
        self.limit_s, self.started = limit_s, time.monotonic()
        self.computed_s, self.questions = 0.0, 0

    def add(self, seconds: float, questions: int) -> None:
        self.computed_s += seconds
        self.questions += questions

    def allows(self, questions: int) -> bool:
        if self.limit_s is None:
            return True
        expected = self.computed_s / self.questions * questions if self.questions else 0.0
        return time.monotonic() - self.started + expected + TIME_MARGIN_S <= self.limit_s


def extract_shard_taking_turns(
    settings,
    table_path: str | Path,
    images_dir: str | Path,
    shard: int,
    shard_size: int,
    out_path: str | Path,
    attempt: int = 1,
    preprocess_workers: int = 0,
    time_limit_s: float | None = None,
    batch_size_record: str | Path | None = None,
    **shard_options,
) -> Path:
    """This job's shard into `out_path`, and turns at the model's unclaimed shards (module docstring);
    `shard_options` go to shards.extract_shard. The model is loaded once, by the first shard with work."""
    num_rows = len(read_validated_table(table_path))
    budget = TimeBudget(time_limit_s)
    loader = functools.cache(
        extractor_loader(settings, progress_folder(out_path), attempt, preprocess_workers, batch_size_record)
    )
    label = f"job of shard {shard:04d}"
    options = shard_options | {"attempt": attempt, "preprocess_workers": preprocess_workers}

    def rows(k: int) -> int:
        return min(shard_size, num_rows - k * shard_size)

    def turn(k: int, own: bool) -> bool:
        """Shard k extracted here, or found finished; False while another job holds its claim."""
        path = out_path if own else shard_path(out_path, k)
        claim = Claim.take(claim_path(path), label)
        if claim is None:
            return False
        used = []  # whether the shard had work: extract_shard asks for the model only then

        def get_extractor():
            used.append(True)
            return loader()

        started = time.monotonic()
        try:
            extract_shard(
                settings,
                table_path,
                images_dir,
                k,
                shard_size,
                path,
                get_extractor=get_extractor,
                place_output=own,
                **options,
            )
        finally:
            claim.release()
        if used:
            budget.add(time.monotonic() - started, rows(k))
            if not own:
                log.info("%s: extracted shard %04d, its own job will find it finished", label, k)
        return True

    own_done = turn(shard, own=True)
    if not own_done:
        log.info("shard %04d is claimed by %s; taking other shards meanwhile", shard, holder_line(claim_path(out_path)))
    for k in _other_shards(shard, count_shards(num_rows, shard_size)):
        if not budget.allows(rows(k)):
            log.info("%s: its time limit (%.0f s) leaves no room for another shard", label, time_limit_s)
            break
        try:
            turn(k, own=False)
        except ShardFailed as error:
            log.warning("shard %04d: %s; left to its own job", k, error)
        except RestartJob as error:  # out of device memory (recorded for the shard's own job), a failed device
            if not own_done:
                raise
            log.warning("shard %04d: %s; left to its own job, and this job takes no more turns", k, error)
            break
    while not own_done:
        time.sleep(WAIT_POLL_S)
        own_done = turn(shard, own=True)
    return Path(out_path)


def _other_shards(own: int, count: int) -> list[int]:
    """The model's other shards, last first: jobs Snakemake has yet to start are more likely the later ones."""
    return [k for k in reversed(range(count)) if k != own]
