"""`vlmstates extract` with the seed scripts' flags: the workflow's steps for one model, in one process.

Under --output-dir it writes what the workflow writes under results/, for a model named after the last
part of --model: dataset/questions.csv (with validation.json and validation.md),
<name>/shards/shard_NNNN.h5 and <name>/embeddings.h5; then the seed-layout parts in <name>/seed_layout/,
--checkpoint-interval questions each. Each step is the workflow's own function (validate_and_write,
extract_shard, merge_model_shards, export_seed_layout). A rerun skips every shard already finished for
the same settings and questions, and continues an unfinished one from its saved progress.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vlmstates.dataset import read_validated_table, validate_and_write
from vlmstates.extraction.shards import (
    BATCH_SIZE_RECORD,
    count_shards,
    extract_shard,
    merge_model_shards,
    progress_bar_wanted,
    shard_rows,
)
from vlmstates.inspection.seed_layout import DEFAULT_PART_SIZE, default_prefix, export_seed_layout
from vlmstates.settings import ConfigError, ExtractionSettings, ModelSettings
from vlmstates.sources import load_source_setting, validate_source_and_write
from vlmstates.store import CONFIG_HASH_ATTR, read_embeddings

log = logging.getLogger(__name__)

TEST_QUESTIONS = 3  # --test keeps the first 3 questions (the seeds' --test took 3 random ones)


@dataclass
class ExtractOutputs:
    table: Path
    shards: list[Path]
    embeddings: Path
    seed_parts: list[Path]


def default_model_key(checkpoint: str) -> str:
    """The model key (results/<key>/, the workflow's `models` key) that `vlmstates extract` gives a checkpoint:
    the last part of its hub id or local folder, e.g. Qwen2.5-VL-7B-Instruct."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(checkpoint.rstrip("/")).name).lstrip("._-")
    return name or "model"


def use_cache_dir(cache_dir: str | Path) -> None:
    """Point the Hugging Face hub cache at `cache_dir` (what the seeds' from_pretrained(cache_dir=...) did).

    HF_HUB_CACHE, not HF_HOME, so that a token saved by `huggingface-cli login` is still found. The
    hub library reads it once, when first imported.
    """
    cache = str(Path(cache_dir).expanduser().resolve())
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.HF_HUB_CACHE != cache:
        raise ConfigError(
            f"--cache-dir {cache_dir}: the hub library is already loaded; set HF_HUB_CACHE={cache} instead"
        )
    os.environ["HF_HUB_CACHE"] = cache


def run_extract(
    vqa_dataset: str | Path,
    images_dir: str | Path,
    output_dir: str | Path,
    model: str,
    cache_dir: str | Path | None = None,
    checkpoint_interval: int = DEFAULT_PART_SIZE,
    test: bool = False,
    shard_size: int = ExtractionSettings.shard_size,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    trust_remote_code: bool = False,
    source: str | None = None,
) -> ExtractOutputs:
    """The workflow's steps for one model; batch size and answer length default to the models config's.
    `source` (a dataset source: vlmstates.sources.load_source_setting) replaces the CSV and images folder."""
    for option, value in (("--checkpoint-interval", checkpoint_interval), ("--shard-size", shard_size)):
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if cache_dir:
        use_cache_dir(cache_dir)
    name = default_model_key(model)
    entry = {"model": model, "trust_remote_code": trust_remote_code}
    entry |= {k: v for k, v in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)) if v is not None}
    settings = ModelSettings.from_config(name, entry)
    out = Path(output_dir)
    limit = TEST_QUESTIONS if test else None
    if source:
        table, images_dir = _validate_source(source, out / "dataset", limit)
    else:
        table = _validate(vqa_dataset, images_dir, out / "dataset", limit=limit)
    shards = _extract_shards(settings, table, images_dir, out / name / "shards", shard_size, checkpoint_interval)
    embeddings = merge_model_shards(table, shards, out / name / "embeddings.h5")
    log.info("merged %d shards into %s", len(shards), embeddings)
    parts = export_seed_layout(embeddings, out / name / "seed_layout", default_prefix(model), checkpoint_interval)
    return ExtractOutputs(table=table, shards=shards, embeddings=embeddings, seed_parts=parts)


def _validate(vqa_dataset, images_dir, folder: Path, limit: int | None) -> Path:
    table = folder / "questions.csv"
    result = validate_and_write(
        vqa_dataset, images_dir, table, folder / "validation.json", folder / "validation.md", strict=True, limit=limit
    )
    log.info("%d questions validated into %s", len(result.table), table)
    return table


def _validate_source(source: str, folder: Path, limit: int | None) -> tuple[Path, Path]:
    """The source materialised (in dataset/source/, reused while unchanged) and validated."""
    table = folder / "questions.csv"
    result, materialised = validate_source_and_write(
        load_source_setting(source),
        folder / "source",
        table,
        folder / "validation.json",
        folder / "validation.md",
        strict=True,
        limit=limit,
    )
    log.info("%d questions validated into %s", len(result.table), table)
    return table, materialised.images


def _extract_shards(
    settings: ModelSettings, table: Path, images_dir, folder: Path, shard_size: int, save_every: int
) -> list[Path]:
    questions = read_validated_table(table)
    # loaded once, by the first shard with work
    extractor = functools.cache(lambda: _extractor(settings, folder / BATCH_SIZE_RECORD))
    shards = []
    for shard in range(count_shards(len(questions), shard_size)):
        path = folder / f"shard_{shard:04d}.h5"
        expected = shard_rows(questions, shard, shard_size)["question_id"].tolist()
        if shard_is_finished(path, settings, expected):
            log.info("shard %d is done (%s); skipped", shard, path)
        else:
            extract_shard(
                settings,
                table,
                images_dir,
                shard,
                shard_size,
                path,
                max_failed_share=ExtractionSettings.max_failed_share,
                save_every=save_every,
                get_extractor=extractor,
            )
        shards.append(path)
    return shards


def _extractor(settings: ModelSettings, batch_size_record: Path):
    from vlmstates.extraction.engine import Extractor, load_model  # torch is imported only once there is work

    return Extractor(load_model(settings), progress=progress_bar_wanted(), batch_size_record=batch_size_record)


def shard_is_finished(path: Path, settings: ModelSettings, question_ids: list[str]) -> bool:
    """Whether `path` holds exactly these questions, extracted under these settings (config hash)."""
    if not path.exists():
        return False
    try:
        shard = read_embeddings(path)
    except (OSError, ValueError) as error:
        log.warning("shard %s is unreadable (%s); extracting it again", path, error)
        return False
    same_settings = shard.attrs.get(CONFIG_HASH_ATTR) == settings.config_hash()
    return same_settings and shard.table["question_id"].tolist() == question_ids
