"""`vlmstates extract` with the seed scripts' flags: the workflow's files, in one process, resumable."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import vlmstates.extraction.command as extract_command
from vlmstates.cli import main
from vlmstates.dataset import validate_and_write
from vlmstates.extraction import engine
from vlmstates.extraction.engine import load_model
from vlmstates.extraction.shards import extract_shard, merge_model_shards
from vlmstates.inspection.seed_layout import read_seed_layout
from vlmstates.settings import ModelSettings
from vlmstates.store import VISION_ONLY, read_embeddings, read_results, write_embeddings

SETTINGS = {"batch_size": 2, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")


def extract(qwen, demo, out):
    table, images = demo  # a validated table is a valid input CSV too
    return main(
        [
            "extract",
            "--vqa-dataset",
            str(table),
            "--images-dir",
            str(images),
            "--output-dir",
            str(out),
            "--model",
            str(qwen),
            "--test",
            "--checkpoint-interval",
            "2",
            "--shard-size",
            "2",
            "--batch-size",
            str(SETTINGS["batch_size"]),
            "--max-new-tokens",
            str(SETTINGS["max_new_tokens"]),
        ]
    )


@pytest.fixture(scope="module")
def extracted(qwen, demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract")
    assert extract(qwen, demo, out) == 0
    return out


def reference_run(qwen, demo, folder):
    """The workflow's steps by hand: validate (limit 3), extract-shard per shard, merge."""
    csv, images = demo
    table = folder / "questions.csv"
    validate_and_write(csv, images, table, folder / "v.json", folder / "v.md", limit=3)
    settings = ModelSettings.from_config("reference", {"model": str(qwen), **SETTINGS})
    shards = [extract_shard(settings, table, images, k, 2, folder / f"shard_{k:04d}.h5") for k in (0, 1)]
    return merge_model_shards(table, shards, folder / "embeddings.h5")


def test_writes_the_workflows_files_and_the_seed_layout(extracted, qwen):
    name = qwen.name
    assert (extracted / "dataset" / "questions.csv").is_file()
    assert (extracted / "dataset" / "validation.json").is_file()
    assert sorted(p.name for p in (extracted / name / "shards").glob("*.h5")) == ["shard_0000.h5", "shard_0001.h5"]
    parts = sorted(p.name for p in (extracted / name / "seed_layout").iterdir())
    assert parts == ["tiny_qwen2_5_vl_embeddings_part_001.h5", "tiny_qwen2_5_vl_embeddings_part_002.h5"]
    embeddings = read_embeddings(extracted / name / "embeddings.h5")
    assert len(embeddings.table) == 3  # --test
    seed = read_seed_layout(extracted / name / "seed_layout")
    np.testing.assert_array_equal(seed.load(VISION_ONLY), embeddings.load(VISION_ONLY))


def test_equals_extract_shard_and_merge(extracted, qwen, demo, tmp_path):
    got = read_results(extracted / qwen.name / "embeddings.h5")
    expected = read_results(reference_run(qwen, demo, tmp_path))
    assert [(r.question_id, r.answer, r.status) for r in got] == [(r.question_id, r.answer, r.status) for r in expected]
    for a, b in zip(got, expected):
        assert a.vectors.keys() == b.vectors.keys()
        for key in a.vectors:
            np.testing.assert_array_equal(a.vectors[key], b.vectors[key])


def test_rerun_extracts_only_unfinished_shards(qwen, demo, tmp_path, monkeypatch):
    assert extract(qwen, demo, tmp_path) == 0
    before = read_results(tmp_path / qwen.name / "embeddings.h5")
    calls = []

    def counting_extract_shard(settings, table, images, shard, *args, **kwargs):
        calls.append(shard)
        return extract_shard(settings, table, images, shard, *args, **kwargs)

    monkeypatch.setattr(extract_command, "extract_shard", counting_extract_shard)
    (tmp_path / qwen.name / "shards" / "shard_0001.h5").unlink()
    assert extract(qwen, demo, tmp_path) == 0
    assert calls == [1]
    after = read_results(tmp_path / qwen.name / "embeddings.h5")
    assert [r.answer for r in after] == [r.answer for r in before]
    np.testing.assert_array_equal(after[2].vectors[VISION_ONLY], before[2].vectors[VISION_ONLY])


def test_the_model_is_loaded_once_for_all_shards(qwen, demo, tmp_path, monkeypatch):
    loads = []

    def counting_load_model(settings):
        loads.append(settings.model)
        return load_model(settings)

    monkeypatch.setattr(engine, "load_model", counting_load_model)
    assert extract(qwen, demo, tmp_path) == 0
    assert len(list((tmp_path / qwen.name / "shards").glob("shard_*.h5"))) == 2 and loads == [str(qwen)]


def test_a_line_per_saved_progress_part(qwen, demo, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert extract(qwen, demo, tmp_path) == 0
    saved = [m.split(",")[0] for m in caplog.messages if "samples saved" in m]
    # --checkpoint-interval 2: shard 0000's two samples make a part; shard 0001's one does not
    assert saved == ["shard 0000: 2/2 samples saved (0 failed)"]


def test_a_finished_shard_whose_output_was_removed_is_put_back_without_the_model(qwen, demo, tmp_path, monkeypatch):
    assert extract(qwen, demo, tmp_path) == 0
    shards = tmp_path / qwen.name / "shards"
    before = read_results(shards / "shard_0001.h5")
    # as an extraction job leaves it when Snakemake throws its output away (shards.py); merging removed it
    (shards / "shard_0001.progress").mkdir()
    (shards / "shard_0001.h5").rename(shards / "shard_0001.progress" / "finished.h5")

    def no_model(settings):
        raise AssertionError("the model was loaded, yet no shard needed it")

    monkeypatch.setattr(engine, "load_model", no_model)
    assert extract(qwen, demo, tmp_path) == 0
    assert [r.answer for r in read_results(shards / "shard_0001.h5")] == [r.answer for r in before]
    assert not (shards / "shard_0001.progress").exists()  # merged: removed


def test_a_shard_of_other_settings_or_questions_is_not_finished(tmp_path):
    settings = ModelSettings.from_config("m", {"model": "org/model"})
    shard = write_embeddings(tmp_path / "shard.h5", [], {}, {"config_hash": settings.config_hash()})
    assert extract_command.shard_is_finished(shard, settings, [])
    assert not extract_command.shard_is_finished(shard, settings, ["q1"])
    other = ModelSettings.from_config("m", {"model": "org/model", "max_new_tokens": 5})
    assert not extract_command.shard_is_finished(shard, other, [])
    assert not extract_command.shard_is_finished(tmp_path / "missing.h5", settings, [])


def test_bad_checkpoint_interval_is_refused(demo, tmp_path, capsys):
    table, images = demo
    code = main(
        [
            "extract",
            "--vqa-dataset",
            str(table),
            "--images-dir",
            str(images),
            "--output-dir",
            str(tmp_path),
            "--model",
            "org/model",
            "--checkpoint-interval",
            "0",
        ]
    )
    assert code == 1
    assert "--checkpoint-interval must be at least 1, got 0" in capsys.readouterr().err


def test_cache_dir_becomes_the_hub_cache(tmp_path):
    code = (
        "from vlmstates.extraction.command import use_cache_dir\n"
        f"use_cache_dir({str(tmp_path)!r})\n"
        "from huggingface_hub import constants\n"
        "print(constants.HF_HUB_CACHE)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(tmp_path.resolve())
