"""Shards: contiguous slices of the validated dataset, each extracted by one job and merged in order."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from .dataset import read_validated_table
from .settings import ModelSettings
from .store import STATUS_FAILED, merge_shards, write_embeddings

log = logging.getLogger(__name__)


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


def extract_shard(
    settings: ModelSettings,
    table_path: str | Path,
    images_dir: str | Path,
    shard: int,
    shard_size: int,
    out_path: str | Path,
    max_failed_share: float = 0.05,
) -> Path:
    from .engine import Extractor, load_model  # torch is imported only by jobs that extract

    rows = shard_rows(read_validated_table(table_path), shard, shard_size)
    extractor = Extractor(load_model(settings))
    log.info(
        "model %s (%s) on %s, %s, layers %s; shard %d: %d questions",
        settings.model, extractor.adapter.family, extractor.loaded.device, extractor.loaded.dtype,
        list(extractor.layers), shard, len(rows),
    )
    results = extractor.extract(questions_of(rows), Path(images_dir))
    attrs = extractor.attributes() | {
        "shard": shard,
        "shard_size": shard_size,
        "created": pd.Timestamp.now(tz="UTC").isoformat(),
    }
    write_embeddings(out_path, results, extractor.vector_dims(), attrs)
    failed = [r for r in results if r.status == STATUS_FAILED]
    if failed and len(failed) > max_failed_share * len(results):
        first = "; ".join(f"{r.question_id}: {r.error}" for r in failed[:3])
        raise ShardFailed(
            f"{len(failed)} of {len(results)} samples failed (more than {max_failed_share:.0%}); first: {first}"
        )
    return Path(out_path)


def merge_model_shards(table_path: str | Path, shard_paths: list[str | Path], out_path: str | Path) -> Path:
    expected = read_validated_table(table_path)["question_id"].tolist()
    return merge_shards(shard_paths, expected, out_path)
