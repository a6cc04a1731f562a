"""Runs with a user's own config, as the README says (`snakemake --cores 2 --configfile my.yaml`): it stands
alone, and errors that a retry would repeat are printed once."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import yaml
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.demo.tiny import TINY_FAMILIES
from vlmstates.store import read_embeddings

QUESTIONS = 12


def own_dataset(folder, rows: int = QUESTIONS):
    """A user's CSV and images in their own folder: the first rows of a generated set."""
    csv_path = write_demo_dataset(folder)
    lines = csv_path.read_text().splitlines(keepends=True)
    mine = folder / "vqa.csv"
    mine.write_text("".join(lines[: rows + 1]))
    return mine, folder / "images"


def user_workdir(tmp_path):
    """A working folder that also holds the demo's config/config.yaml, which must not join in."""
    return workdir_with_config(tmp_path / "work", default_config())


@pytest.fixture(scope="module")
def own_config_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    data_csv, images = own_dataset(root / "mydata")
    config = {
        "results": str(root / "my-results"),
        "dataset": {"csv": str(data_csv), "images": str(images)},
        "extraction": {"shard_size": 8},
        "models": {"mine": {"model": "resources/checkpoints/tiny-qwen2_5_vl", "batch_size": 4, "max_new_tokens": 4}},
        "labels": {"method": "halp_paper"},
        "probes": {"mlp_max_epochs": 2, "bootstrap": 10},
    }
    user_file = root / "user.yaml"
    user_file.write_text(yaml.safe_dump(config))
    workdir = user_workdir(root)
    result = snakemake(workdir, "--cores", "2", "--configfile", str(user_file))
    return workdir, root / "my-results", result.stdout + result.stderr


@pytest.mark.slow
def test_own_config_stands_alone(own_config_run):
    workdir, results, printed = own_config_run
    assert sorted(p.name for p in results.iterdir()) == ["dataset", "mine", "summary"]
    assert not (workdir / "results").exists()  # the chosen results folder, not the default
    assert [p.name for p in (workdir / "logs" / "merge").iterdir()] == ["mine.log"]  # no demo model ran
    assert "model=tiny-" not in printed  # nor was any job of one scheduled
    assert not (workdir / "resources" / "demo").exists()  # the demo's data and labels file were not made
    assert sorted(p.name for p in (workdir / "resources" / "checkpoints").iterdir()) == ["tiny-qwen2_5_vl"]


@pytest.mark.slow
def test_own_config_runs_through_probes_and_summary(own_config_run):
    _, results, printed = own_config_run
    emb = read_embeddings(results / "mine" / "embeddings.h5")
    assert len(emb.table) == QUESTIONS
    summary = json.loads((results / "mine" / "labels.summary.json").read_text())
    assert summary["method"] == "halp_paper" and summary["n_total"] == QUESTIONS
    metrics = pd.read_csv(results / "mine" / "probes" / "metrics.csv", dtype={"reason": str})
    assert len(metrics) and set(metrics["status"]) <= {"ok", "skipped"}
    assert (results / "summary" / "probes.csv").stat().st_size > 0
    assert (results / "mine" / "inspection" / "summary.html").exists()
    ok = int((emb.table["status"] == "ok").sum())
    assert f"mine: {ok} questions ok, {QUESTIONS - ok} failed -> {results}/mine/embeddings.h5" in printed
    assert "--configfile" in printed[printed.rindex("Next, the report") :]  # the report reads the same config


def bad_row_config(tmp_path) -> dict:
    data_csv, images = own_dataset(tmp_path / "data", rows=6)
    with data_csv.open("a", newline="") as f:
        csv.writer(f).writerow(["q_bad", "no_such_image.png", "Is there a circle?", "yes"])
    checkpoint = tmp_path / "never-loaded"  # validation fails first; a config.json is all the DAG reads
    checkpoint.mkdir()
    # a family without rule image_budget, so that a bad checkpoint first fails in the extraction job
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llava"}))
    return {"dataset": {"csv": str(data_csv), "images": str(images)}, "models": {"m": {"model": str(checkpoint)}}}


@pytest.mark.slow
def test_a_bad_row_is_reported_once(tmp_path):
    """The default profile retries failed jobs (restart-times: 1); validation is not retried."""
    user_file = tmp_path / "user.yaml"
    user_file.write_text(yaml.safe_dump(bad_row_config(tmp_path)))
    result = snakemake(user_workdir(tmp_path), "--cores", "2", "--configfile", str(user_file), check=False)
    printed = result.stdout + result.stderr
    assert result.returncode != 0
    assert printed.count("Error in rule validate_dataset") == 1, printed
    assert "Trying to restart" not in printed
    assert printed.count("no_such_image.png") == 1, printed  # once, in the closing lines
    closing = printed[printed.rindex("vlmstates: stopped with failures") :]
    assert "dataset: validation failed with 1 error(s) in 7 rows read" in closing
    assert "validate_dataset: logs/validate_dataset.log, every problem in" in closing
    assert "'no_such_image.png' not found" in closing  # what went wrong, from the log
    assert len(printed.splitlines()) < 90, printed  # neither log nor reports printed whole


@pytest.mark.slow
def test_a_bad_checkpoint_is_not_retried(tmp_path):
    """An extraction attempt that cannot load its checkpoint is not repeated: the retry ends in one line."""
    config = bad_row_config(tmp_path)
    config["dataset"]["csv"] = str(own_dataset(tmp_path / "good", rows=4)[0])
    config["dataset"]["images"] = str(tmp_path / "good" / "images")
    config["extraction"] = {"shard_size": 4}
    user_file = tmp_path / "user.yaml"
    user_file.write_text(yaml.safe_dump(config))
    workdir = user_workdir(tmp_path)
    result = snakemake(workdir, "--cores", "2", "--configfile", str(user_file), check=False)
    printed = result.stdout + result.stderr
    assert result.returncode != 0
    assert printed.count("Trying to restart") == 1  # the profile's one retry ...
    assert "not retried: attempt 1 failed with an error that a retry repeats (OSError:" in printed  # ... ends at once
    marker = workdir / "logs" / "extract" / "m" / "shard_0000.no-retry.log"
    assert "Traceback" in marker.read_text()
    closing = printed[printed.rindex("vlmstates: stopped with failures") :]
    assert "extract_shard m shard_0000: logs/extract/m/shard_0000.log (not retried" in closing
    assert "OSError: Can't load" in closing  # the first attempt's error, from the retry's one line


@pytest.mark.slow
def test_a_config_naming_every_tiny_family_runs(tmp_path):
    """`snakemake --cores 2` with one model of every family that has a tiny checkpoint, up to each model's merged
    file (the demo run covers the later stages; Molmo's checkpoint needs its own transformers: tests/test_molmo.py):
    every file has every question, extracted by its family."""
    data_csv, images = own_dataset(tmp_path / "mydata", rows=2)
    models = {
        f"tiny_{family}": {"model": f"resources/checkpoints/tiny-{family}", "max_new_tokens": 2}
        for family in TINY_FAMILIES
    }
    results = tmp_path / "results"
    config = {"results": str(results), "dataset": {"csv": str(data_csv), "images": str(images)}, "models": models}
    user_file = tmp_path / "families.yaml"
    user_file.write_text(yaml.safe_dump(config))
    targets = [str(results / name / "embeddings.h5") for name in models]
    snakemake(
        user_workdir(tmp_path), *targets, "--cores", "2", "--configfile", str(user_file)
    )  # targets first: --configfile takes a list
    for name, family in zip(models, TINY_FAMILIES):
        emb = read_embeddings(results / name / "embeddings.h5")
        assert emb.attrs["family"] == family and json.loads(emb.attrs["semantics"])["family"]
        assert list(emb.table["status"]) == ["ok"] * 2, (name, list(emb.table["error"]))
