"""The workflow itself: the demo run end to end in a temporary folder, config errors before any job, lint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from vlmstates.dataset import read_validated_table
from vlmstates.engine import Extractor, load_model
from vlmstates.settings import ModelSettings
from vlmstates.shards import questions_of
from vlmstates.store import STATUS_OK, read_embeddings


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def workdir_with_config(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config").mkdir(parents=True, exist_ok=True)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = workdir_with_config(tmp_path_factory.mktemp("run"), default_config())
    snakemake(workdir, "--cores", "2")
    return workdir


@pytest.mark.slow
def test_demo_run_merges_every_question_in_order(demo_run):
    config = default_config()
    table = read_validated_table(demo_run / "results" / "dataset" / "questions.csv")
    shard_size = config["extraction"]["shard_size"]
    assert len(table) > shard_size  # the demo really exercises several shards
    for model in config["models"]:
        emb = read_embeddings(demo_run / "results" / model / "embeddings.h5")
        assert emb.table["question_id"].tolist() == table["question_id"].tolist()
        assert (emb.table["status"] == STATUS_OK).all()
        assert emb.table["ground_truth_answer"].tolist() == table["answer"].tolist()
        assert emb.attrs["num_shards"] == -(-len(table) // shard_size)
        summary = json.loads((demo_run / "results" / model / "inspection" / "summary.json").read_text())
        assert summary["samples"] == len(table) and summary["failed"] == 0
        assert (demo_run / "results" / model / "inspection" / "norms.png").stat().st_size > 0
        labels = pd.read_csv(demo_run / "results" / model / "labels.csv", dtype=str, keep_default_na=False)
        assert labels["question_id"].tolist() == table["question_id"].tolist()
        metrics = pd.read_csv(demo_run / "results" / model / "probes" / "metrics.csv")
        assert set(metrics["representation"]) >= {"VF", "VT", "QT"}
        # random tiny models answer wrongly, so a probe may have one class only: then it says why
        assert (metrics["auroc"].notna() | metrics["reason"].fillna("").str.len().gt(0)).all()
    summary = pd.read_csv(demo_run / "results" / "summary" / "probes.csv")
    assert (summary["source"] == "published").any()


@pytest.mark.slow
def test_demo_run_vectors_equal_an_in_process_extraction(demo_run):
    """The merged file holds what the engine gives for the same questions, one at a time."""
    config = default_config()
    table = read_validated_table(demo_run / "results" / "dataset" / "questions.csv")
    rows = [0, len(table) // 2, len(table) - 1]  # first, middle and last shard
    questions = [questions_of(table)[i] for i in rows]
    for model, entry in config["models"].items():
        entry = entry | {"model": str(demo_run / entry["model"])}
        settings = replace(ModelSettings.from_config(model, entry), batch_size=1)
        results = Extractor(load_model(settings), progress=False).extract(questions, demo_run / config["dataset"]["images"])
        emb = read_embeddings(demo_run / "results" / model / "embeddings.h5")
        assert emb.table["answer"].iloc[rows].tolist() == [r.answer for r in results]
        for key in emb.representation_keys():
            stored = emb.load(key)[rows]
            expected = np.stack([r.vectors[key] for r in results])
            np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5, err_msg=f"{model} {key}")


@pytest.mark.slow
def test_demo_run_report_and_partial_rerun(demo_run):
    snakemake(demo_run, "--report", "report.html")
    report = (demo_run / "report.html").read_text(errors="replace")
    assert "norms.png" in report and "summary.html" in report
    assert "Nothing to be done" in snakemake(demo_run, "-n").stdout + snakemake(demo_run, "-n").stderr
    # a failed shard leaves no shard file and no merged file: a rerun extracts that shard alone
    model = next(iter(default_config()["models"]))
    (demo_run / "results" / model / "shards" / "shard_0001.h5").unlink()
    (demo_run / "results" / model / "embeddings.h5").unlink()
    dry = snakemake(demo_run, "-n", "--quiet", "rules")
    counts = dict(line.split() for line in dry.stdout.splitlines() if len(line.split()) == 2)
    assert counts["extract_shard"] == "1" and counts["merge_shards"] == "1", dry.stdout


def _config_with_model(entry: dict) -> dict:
    config = default_config()
    config["models"] = {"bad": entry}
    return config


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"model": "/nonexistent/checkpoint"}, "no such local folder"),
        ({"model": "resources/checkpoints/tiny-qwen2_5_vl", "batchsize": 4}, "batchsize"),
        ({"model": "resources/checkpoints/tiny-qwen2_5_vl", "dtype": "int8"}, "int8"),
        ({"model": "UNKNOWN_FAMILY"}, "model_type 'llama' is not supported"),
    ],
)
def test_bad_model_config_fails_before_any_job(tmp_path, entry, message):
    if entry["model"] == "UNKNOWN_FAMILY":
        folder = tmp_path / "llama"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        entry = {"model": str(folder)}
    workdir = workdir_with_config(tmp_path / "w", _config_with_model(entry))
    result = snakemake(workdir, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert "bad" in output  # the message names the config key
    assert not (workdir / "results").exists()


def test_schema_defaults_match_model_settings():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    properties = schema["properties"]["models"]["additionalProperties"]["properties"]
    defaults = ModelSettings(name="x", model="y")
    for key, spec in properties.items():
        if key != "model":
            expected = getattr(defaults, key)
            assert spec["default"] == (list(expected) if isinstance(expected, tuple) else expected), key
    assert set(properties) == set(ModelSettings.__dataclass_fields__) - {"name"}


def test_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    snakefmt = shutil.which("snakefmt")
    fmt = subprocess.run([snakefmt, "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
