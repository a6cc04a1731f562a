"""Shards: contiguous slices of the validated dataset, each extracted by one job and merged in order.

A job saves its finished samples every few batches as part files in a progress folder that is not a
declared Snakemake output (Snakemake deletes the declared outputs of failed jobs); a rerun of the shard
continues from them when they were written under the same settings. Ctrl-C and SIGTERM save the samples
not yet saved before the job exits.

The finished shard is written into the progress folder too, and the declared output is a second hard link
to it. Snakemake throws away the output of a job it did not see finish (its own Ctrl-C waits for the
running job but records it as incomplete, and --rerun-incomplete deletes the output): the rerun then
links the output back from the progress folder without loading the model. Merging the shards, the step
that consumes them, removes their progress folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from vlmstates.atomic import atomic_path
from vlmstates.dataset import read_source_record, read_validated_table
from vlmstates.errors import OutOfDeviceMemory, RestartJob, VlmstatesError
from vlmstates.settings import AUTO_BATCH_SIZE, ExtractionSettings
from vlmstates.store import (
    CONFIG_HASH_ATTR,
    CREATED_ATTR,
    DATASET_SOURCE_ATTR,
    SHARD_ATTR,
    SHARD_QUESTIONS_ATTR,
    SHARD_SIZE_ATTR,
    STATUS_FAILED,
    SampleResult,
    merge_shards,
    read_embeddings,
    read_results,
    write_embeddings,
)

log = logging.getLogger(__name__)

# Attributes a progress part (or a finished shard kept in the progress folder) must share with the
# current run to be reused.
_RESUME_IDENTITY = (CONFIG_HASH_ATTR, SHARD_ATTR, SHARD_SIZE_ATTR, SHARD_QUESTIONS_ATTR)
FINISHED = "finished.h5"  # the finished shard in its progress folder, kept until the shards are merged
#: Beside a model's shards: the batch sizes `auto` found, per GPU type (vlmstates.extraction.batch_size_record).
BATCH_SIZE_RECORD = "batch_sizes.json"
#: In the progress folder: the batch size that ran out of device memory, for the job's retry to halve.
OUT_OF_MEMORY_RECORD = "out_of_memory.json"


class ShardFailed(VlmstatesError, RuntimeError):
    """Too many samples of a shard failed; the message names the first errors."""


def count_shards(num_rows: int, shard_size: int) -> int:
    return max(1, math.ceil(num_rows / shard_size))


def shard_rows(table: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    if not 0 <= shard < count_shards(len(table), shard_size):
        raise ValueError(
            f"shard {shard} does not exist: {len(table)} rows make {count_shards(len(table), shard_size)} shards"
        )
    return table.iloc[shard * shard_size : (shard + 1) * shard_size]


def questions_of(rows: pd.DataFrame) -> list:
    from vlmstates.dataset import Question

    return [Question(r.question_id, r.image_id, r.question, r.answer) for r in rows.itertuples(index=False)]


def batch_size_for_attempt(batch_size: int | str, attempt: int, ran_out_at: int | None = None) -> int | str:
    """Halve the batch size with each retry of a job (Snakemake's --retries), down to one; after an
    attempt ran out of device memory in a batch of `ran_out_at` rows, at most half of that.

    `auto` stays auto (each attempt searches for the batch size that fits the GPU afresh) unless an
    attempt ran out of memory: then half the size it ran out at, since the search would find it again."""
    halved = batch_size if batch_size == AUTO_BATCH_SIZE else max(1, batch_size >> max(0, attempt - 1))
    if ran_out_at is None:
        return halved
    below = max(1, ran_out_at // 2)
    return below if halved == AUTO_BATCH_SIZE else min(halved, below)


def record_out_of_memory(folder: Path, batch_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUT_OF_MEMORY_RECORD).write_text(json.dumps({"batch_size": batch_size}))


def ran_out_of_memory_at(folder: Path) -> int | None:
    """The batch size an earlier attempt of this job ran out of device memory at, if one did."""
    try:
        return int(json.loads((folder / OUT_OF_MEMORY_RECORD).read_text())["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def progress_folder(out_path: str | Path) -> Path:
    """Where a shard's progress is saved unless told otherwise: shard_NNNN.h5 -> shard_NNNN.progress/."""
    return Path(out_path).with_suffix(".progress")


def resume_identity(settings, questions: list, shard: int, shard_size: int) -> dict:
    """What saved progress must match to be reused; known before the model is loaded."""
    return {
        CONFIG_HASH_ATTR: settings.config_hash(),
        SHARD_ATTR: shard,
        SHARD_SIZE_ATTR: shard_size,
        SHARD_QUESTIONS_ATTR: hashlib.sha256("\n".join(q.question_id for q in questions).encode()).hexdigest()[:16],
    }


def _differences(attrs: dict, identity: dict) -> list[str]:
    return [k for k in _RESUME_IDENTITY if attrs.get(k) != identity[k]]


class Progress:
    """Finished samples of one shard, saved as numbered part files (each written atomically); each save
    logs a line with the count, the rate of this run and the time left."""

    def __init__(
        self, folder: Path, identity: dict, vector_dims: dict[str, int], save_every: int, label: str, total: int
    ):
        self.folder, self.identity, self.vector_dims, self.save_every = Path(folder), identity, vector_dims, save_every
        self.label, self.total = label, total
        self._unsaved: list[SampleResult] = []
        self._parts = 0
        self._saved: set[str] = set()  # question ids in the part files
        self._failed: set[str] = set()  # failed in this run (not saved: a rerun tries them again)
        self._computed = 0  # samples computed by this run, for its rate
        self._started = time.monotonic()

    def load(self) -> dict[str, SampleResult]:
        parts = sorted(self.folder.glob("part_*.h5"))
        finished: dict[str, SampleResult] = {}
        for part in parts:
            different = _differences(read_embeddings(part).attrs, self.identity)
            if different:
                log.warning(
                    "progress in %s was written with different %s; starting the shard over", self.folder, different
                )
                self.clear()
                return {}
            finished.update((r.question_id, r) for r in read_results(part))
        self._parts = len(parts)
        self._saved = set(finished)
        self._started = time.monotonic()  # the rate counts this run's samples, from here
        if finished:
            log.info("resuming: %d samples already done (%d progress parts)", len(finished), len(parts))
        return finished

    def add(self, results: list[SampleResult]) -> None:
        """Keep a batch's successful samples; failed ones are tried again when the shard resumes."""
        self._computed += len(results)
        self._failed.update(r.question_id for r in results if r.status == STATUS_FAILED)
        self._unsaved += [r for r in results if r.status != STATUS_FAILED]
        if len(self._unsaved) >= self.save_every:
            self.flush()

    def flush(self) -> None:
        if not self._unsaved:
            return
        write_embeddings(self.folder / f"part_{self._parts:04d}.h5", self._unsaved, self.vector_dims, self.identity)
        self._parts += 1
        self._saved.update(r.question_id for r in self._unsaved)
        self._unsaved = []
        log.info(self.status())

    def save_interrupted(self) -> None:
        """On Ctrl-C or SIGTERM: save what is not saved yet, then say how to continue."""
        with interrupts_deferred():
            self.flush()
        log.warning(
            "%s: interrupted; %d/%d samples are saved in %s, and running the shard again continues from there",
            self.label,
            len(self._saved),
            self.total,
            self.folder,
        )

    def status(self) -> str:
        """e.g. `shard 0003: 128/500 samples saved (2 failed), 3.1 samples/s, ~2 min left`"""
        line = f"{self.label}: {len(self._saved)}/{self.total} samples saved ({len(self._failed)} failed)"
        elapsed = time.monotonic() - self._started
        if self._computed and elapsed > 0:
            rate = self._computed / elapsed
            left = max(0, self.total - len(self._saved) - len(self._failed) - len(self._unsaved))
            line += f", {rate:.1f} samples/s, ~{_duration(left / rate)} left"
        return line

    def keep_finished(self, results: list[SampleResult], attrs: dict) -> Path:
        """Write the finished shard into the progress folder (all of it, failed samples too, so that a
        recovered shard equals this one) and drop the parts it replaces."""
        finished = write_embeddings(self.folder / FINISHED, results, self.vector_dims, attrs)
        for path in self.folder.iterdir():
            if path != finished:  # parts, and temporary files of a writer killed mid-save
                path.unlink()
        return finished

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def interrupts_deferred():
    """Ctrl-C or SIGTERM arriving during a save is acted on once the save is done, so a second Ctrl-C
    does not lose the samples the first one was saving. Python-level handlers, not a signal mask: the
    kernel would hand a masked signal to another thread (torch's, the prefetcher) and Python would still
    run the handler in the main thread."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    pending: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda received, frame: pending.append(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])  # handled now as it would have been: KeyboardInterrupt, or the CLI's


def finished_fits(folder: Path, identity: dict) -> bool:
    """Whether `folder` holds the shard finished under these settings and questions; one that does not
    fit is removed."""
    finished = Path(folder) / FINISHED
    if not finished.exists():
        return False
    try:
        different = _differences(read_embeddings(finished).attrs, identity)
    except (OSError, ValueError) as error:
        different = [f"an unreadable file ({error})"]
    if different:
        log.warning("finished shard %s does not fit (%s); extracting the shard again", finished, different)
        finished.unlink(missing_ok=True)
        return False
    return True


def output_fits(out_path: str | Path, identity: dict) -> bool:
    """Whether a shard's declared output exists, written under these settings and questions (a shard
    finished by its own job whose progress folder its merge has removed)."""
    try:
        return Path(out_path).exists() and not _differences(read_embeddings(out_path).attrs, identity)
    except (OSError, ValueError):
        return False


def recover_finished(folder: Path, identity: dict, out_path: str | Path) -> bool:
    """Put in place the shard finished earlier into `folder` (by this shard's job, whose output was thrown
    away since, or by another job: vlmstates.extraction.turns); False when there is none, or it was written
    under other settings or questions (then it is removed)."""
    if not finished_fits(folder, identity):
        return False
    finished = Path(folder) / FINISHED
    place_shard(finished, out_path)
    log.info("shard %d was finished before; put in place from %s, nothing recomputed", identity["shard"], finished)
    return True


def place_shard(finished: Path, out_path: str | Path) -> Path:
    """Give the finished shard its declared name as a second hard link (no copy, and the progress folder's
    name survives the output's deletion), renamed into place; a copy where links are refused."""
    with atomic_path(out_path) as tmp:
        try:
            os.link(finished, tmp)
        except OSError:  # another filesystem (a --progress-dir elsewhere), or one without hard links
            shutil.copyfile(finished, tmp)
        os.utime(tmp)  # the output is new now, for Snakemake's comparison with its inputs' times
    return Path(out_path)


def extract_shard(
    settings,
    table_path: str | Path,
    images_dir: str | Path,
    shard: int,
    shard_size: int,
    out_path: str | Path,
    max_failed_share: float = ExtractionSettings.max_failed_share,
    progress_dir: str | Path | None = None,
    save_every: int = ExtractionSettings.save_every,
    attempt: int = 1,
    get_extractor: Callable[[], object] | None = None,
    preprocess_workers: int = 0,
    place_output: bool = True,
    batch_size_record: str | Path | None = None,
) -> Path:
    """Extract one shard into `out_path`, continuing from its saved progress; `preprocess_workers` worker
    processes prepare its batches (vlmstates.extraction.preparing; 0: one thread of this process);
    `batch_size_record`: the file of the batch sizes `auto` found (vlmstates.extraction.batch_size_record).

    `get_extractor` returns an `engine.Extractor` of these settings, so that one process running several
    shards loads the model once; it is called only when the shard has work. Without it the model is
    loaded here. `place_output` False (another job's shard: vlmstates.extraction.turns): nothing is done
    when it is finished already, in its progress folder or as its output; else it is left finished in
    its progress folder, for its own job to put in place."""
    questions = questions_of(shard_rows(read_validated_table(table_path), shard, shard_size))
    identity = resume_identity(settings, questions, shard, shard_size)
    folder = Path(progress_dir) if progress_dir else progress_folder(out_path)
    if not place_output and (finished_fits(folder, identity) or output_fits(out_path, identity)):
        return Path(out_path)
    if place_output and recover_finished(folder, identity, out_path):
        return Path(out_path)
    load = get_extractor or extractor_loader(settings, folder, attempt, preprocess_workers, batch_size_record)
    extractor = load()
    log.info(
        "model %s (%s) on %s, %s, %s attention, layers %s, batch size %s; shard %d: %d questions",
        settings.model,
        extractor.adapter.family,
        extractor.loaded.device,
        extractor.loaded.dtype,
        extractor.loaded.attn_implementation,
        list(extractor.layers),
        extractor.batch_size,
        shard,
        len(questions),
    )
    # the questions' provenance, recorded beside the validated table (vlmstates.dataset.source_record_path)
    attrs = extractor.attributes() | identity | {DATASET_SOURCE_ATTR: json.dumps(read_source_record(table_path))}
    progress = Progress(folder, attrs, extractor.vector_dims(), save_every, f"shard {shard:04d}", len(questions))
    try:
        results = extractor.extract(questions, Path(images_dir), finished=progress.load(), on_batch=progress.add)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the CLI raises it
        progress.save_interrupted()
        raise
    except RestartJob as error:  # out of device memory, or a poisoned device: a fresh process continues
        progress.flush()
        if isinstance(error, OutOfDeviceMemory):
            record_out_of_memory(folder, error.batch_size)
        raise
    _check_failures(results, max_failed_share, progress)
    attrs[CREATED_ATTR] = pd.Timestamp.now(tz="UTC").isoformat()
    failed = sum(r.status == STATUS_FAILED for r in results)
    with interrupts_deferred():
        finished = progress.keep_finished(results, attrs)
        if not place_output:
            log.info("%s: %d samples finished in %s (%d failed)", progress.label, len(results), finished, failed)
            return finished
        place_shard(finished, out_path)
    log.info("%s: %d samples written to %s (%d failed)", progress.label, len(results), out_path, failed)
    return Path(out_path)


def extractor_loader(
    settings, folder: Path, attempt: int, preprocess_workers: int, batch_size_record: str | Path | None = None
) -> Callable[[], object]:
    """What loads the model for a shard whose progress folder is `folder`, when called: an `engine.Extractor`
    at this attempt's batch size. Only a retry halves it: a later run's first attempt (maybe on a larger
    GPU) starts from the config's size."""

    def load():
        ran_out_at = ran_out_of_memory_at(folder) if attempt > 1 else None
        return _load_extractor(settings, attempt, ran_out_at, preprocess_workers, batch_size_record)

    return load


def _load_extractor(
    settings, attempt: int, ran_out_at: int | None, preprocess_workers: int, batch_size_record: str | Path | None
):
    from vlmstates.extraction.engine import Extractor, load_model  # torch is imported only by jobs that extract

    batch_size = batch_size_for_attempt(settings.batch_size, attempt, ran_out_at)
    return Extractor(
        load_model(settings),
        batch_size=batch_size,
        progress=progress_bar_wanted(),
        preprocess_workers=preprocess_workers,
        batch_size_record=Path(batch_size_record) if batch_size_record else None,
    )


def progress_bar_wanted() -> bool:
    """The engine's live bar on a terminal only: a job's log (stderr redirected to a file) gets Progress's
    lines instead of the bar's carriage-return updates."""
    return sys.stderr.isatty()


def _check_failures(results: list[SampleResult], max_failed_share: float, progress: Progress) -> None:
    failed = [r for r in results if r.status == STATUS_FAILED]
    if failed and len(failed) > max_failed_share * len(results):
        progress.flush()  # keep what was done; the failed samples are tried again by the next run
        first = "; ".join(f"{r.question_id}: {r.error}" for r in failed[:3])
        raise ShardFailed(
            f"{len(failed)} of {len(results)} samples failed (more than {max_failed_share:.0%}); first: {first}"
        )


def merge_model_shards(table_path: str | Path, shard_paths: list[str | Path], out_path: str | Path) -> Path:
    """Merge the shards in order; then their progress folders (the finished shards kept there) are no
    longer needed and are removed."""
    expected = read_validated_table(table_path)["question_id"].tolist()
    merged = merge_shards(shard_paths, expected, out_path)
    for shard in shard_paths:
        shutil.rmtree(progress_folder(shard), ignore_errors=True)
    return merged
