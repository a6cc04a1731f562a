"""Shards: contiguous slices of the validated dataset, each extracted by one job and merged in order.

A job saves its finished samples every few batches as part files in a progress folder that is not a
declared Snakemake output (Snakemake deletes the declared outputs of failed jobs); a rerun of the shard
continues from them when they were written under the same settings.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from pathlib import Path

import pandas as pd

from .dataset import read_validated_table
from .settings import AUTO_BATCH_SIZE
from .store import STATUS_FAILED, SampleResult, merge_shards, read_embeddings, read_results, write_embeddings

log = logging.getLogger(__name__)

# Attributes a progress part must share with the current run to be reused.
_RESUME_IDENTITY = ("config_hash", "shard", "shard_size", "shard_questions")


class ShardFailed(RuntimeError):
    """Too many samples of a shard failed; the message names the first errors."""


def count_shards(num_rows: int, shard_size: int) -> int:
    return max(1, math.ceil(num_rows / shard_size))


def shard_rows(table: pd.DataFrame, shard: int, shard_size: int) -> pd.DataFrame:
    if not 0 <= shard < count_shards(len(table), shard_size):
        raise ValueError(f"shard {shard} does not exist: {len(table)} rows make {count_shards(len(table), shard_size)} shards")
    return table.iloc[shard * shard_size : (shard + 1) * shard_size]


def questions_of(rows: pd.DataFrame) -> list:
    from .engine import Question

    return [Question(r.question_id, r.image_id, r.question, r.answer) for r in rows.itertuples(index=False)]


def batch_size_for_attempt(batch_size: int | str, attempt: int) -> int | str:
    """Halve the batch size with each retry of a job (Snakemake's --retries), down to one.

    `auto` stays auto: each attempt probes the GPU's memory afresh."""
    if batch_size == AUTO_BATCH_SIZE:
        return batch_size
    return max(1, batch_size >> max(0, attempt - 1))


class Progress:
    """Finished samples of one shard, saved as numbered part files (each written atomically)."""

    def __init__(self, folder: Path, identity: dict, vector_dims: dict[str, int], save_every: int):
        self.folder, self.identity, self.vector_dims, self.save_every = Path(folder), identity, vector_dims, save_every
        self._unsaved: list[SampleResult] = []
        self._parts = 0

    def load(self) -> dict[str, SampleResult]:
        parts = sorted(self.folder.glob("part_*.h5"))
        finished: dict[str, SampleResult] = {}
        for part in parts:
            attrs = read_embeddings(part).attrs
            different = [k for k in _RESUME_IDENTITY if attrs.get(k) != self.identity[k]]
            if different:
                log.warning("progress in %s was written with different %s; starting the shard over", self.folder, different)
                self.clear()
                return {}
            finished.update((r.question_id, r) for r in read_results(part))
        self._parts = len(parts)
        if finished:
            log.info("resuming: %d samples already done (%d progress parts)", len(finished), len(parts))
        return finished

    def add(self, results: list[SampleResult]) -> None:
        """Keep a batch's successful samples; failed ones are tried again when the shard resumes."""
        self._unsaved += [r for r in results if r.status != STATUS_FAILED]
        if len(self._unsaved) >= self.save_every:
            self.flush()

    def flush(self) -> None:
        if not self._unsaved:
            return
        write_embeddings(self.folder / f"part_{self._parts:04d}.h5", self._unsaved, self.vector_dims, self.identity)
        self._parts += 1
        self._unsaved = []

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def extract_shard(
    settings,
    table_path: str | Path,
    images_dir: str | Path,
    shard: int,
    shard_size: int,
    out_path: str | Path,
    max_failed_share: float = 0.05,
    progress_dir: str | Path | None = None,
    save_every: int = 64,
    attempt: int = 1,
    extractor=None,
) -> Path:
    """Extract one shard; `extractor` (an `engine.Extractor` of these settings) saves reloading the model
    when one process runs several shards, else the model is loaded here."""
    if extractor is None:
        from .engine import Extractor, load_model  # torch is imported only by jobs that extract

        extractor = Extractor(load_model(settings), batch_size=batch_size_for_attempt(settings.batch_size, attempt))
    rows = shard_rows(read_validated_table(table_path), shard, shard_size)
    log.info(
        "model %s (%s) on %s, %s, %s attention, layers %s, batch size %s; shard %d: %d questions",
        settings.model, extractor.adapter.family, extractor.loaded.device, extractor.loaded.dtype,
        extractor.loaded.attn_implementation, list(extractor.layers), extractor.batch_size, shard, len(rows),
    )
    questions = questions_of(rows)
    attrs = extractor.attributes() | {
        "shard": shard,
        "shard_size": shard_size,
        "shard_questions": hashlib.sha256("\n".join(q.question_id for q in questions).encode()).hexdigest()[:16],
    }
    progress_dir = Path(progress_dir or Path(out_path).with_suffix(".progress"))
    progress = Progress(progress_dir, attrs, extractor.vector_dims(), save_every)
    results = extractor.extract(questions, Path(images_dir), finished=progress.load(), on_batch=progress.add)
    failed = [r for r in results if r.status == STATUS_FAILED]
    if failed and len(failed) > max_failed_share * len(results):
        progress.flush()  # keep what was done; the failed samples are tried again by the next run
        first = "; ".join(f"{r.question_id}: {r.error}" for r in failed[:3])
        raise ShardFailed(
            f"{len(failed)} of {len(results)} samples failed (more than {max_failed_share:.0%}); first: {first}"
        )
    attrs["created"] = pd.Timestamp.now(tz="UTC").isoformat()
    write_embeddings(out_path, results, extractor.vector_dims(), attrs)
    progress.clear()
    return Path(out_path)


def merge_model_shards(table_path: str | Path, shard_paths: list[str | Path], out_path: str | Path) -> Path:
    expected = read_validated_table(table_path)["question_id"].tolist()
    return merge_shards(shard_paths, expected, out_path)
