"""The workflow itself: the demo run end to end in a temporary folder, config errors before any job, lint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from vlmstates.dataset import read_validated_table
from vlmstates.engine import Extractor, load_model
from vlmstates.probes import OUTPUT_FILES, ProbeSettings
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
    summary = pd.read_csv(demo_run / "results" / "summary" / "probes.csv")
    assert (summary["source"] == "published").any()


@pytest.mark.slow
def test_demo_run_labels_and_probes(demo_run):
    """Stand-in labels of both classes, and every VF, VT and QT probe evaluated; no signal is expected."""
    table = read_validated_table(demo_run / "results" / "dataset" / "questions.csv")
    for model in default_config()["models"]:
        labels = pd.read_csv(demo_run / "results" / model / "labels.csv", dtype=str, keep_default_na=False)
        assert labels["question_id"].tolist() == table["question_id"].tolist()
        assert {"true", "false"} <= set(labels["hallucinated"]), model
        probes = demo_run / "results" / model / "probes"
        metrics = pd.read_csv(probes / "metrics.csv")
        layers = read_embeddings(demo_run / "results" / model / "embeddings.h5").attrs["layers"]
        for code, expected in (("VF", [None]), ("VT", list(layers)), ("QT", list(layers))):
            for probe in ("logreg", "mlp"):
                rows = metrics[(metrics["representation"] == code) & (metrics["probe"] == probe)]
                found = [None if pd.isna(layer) else int(layer) for layer in rows["layer"]]
                assert found == expected, (model, code, probe)
                assert (rows["status"] == "ok").all(), rows[["key", "status", "reason"]]
                for column in ("auroc", "control_auroc"):
                    assert all(math.isfinite(v) and 0 <= v <= 1 for v in rows[column]), (model, code, column)
        for name in OUTPUT_FILES:
            assert (probes / name).stat().st_size > 0, name
    for name in ("probes.csv", "probes.png"):
        assert (demo_run / "results" / "summary" / name).stat().st_size > 0


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
    for name in ("norms.png", "summary.html", "heatmap.png", "auroc_by_layer.png", "probes.png"):
        assert name in report, name
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


# A job must import only what its conda environment holds: script:, notebook:, wrapper: and cwl: would run
# with Snakemake's own site-packages on sys.path (or outside the package), run: inside Snakemake itself.
RULE_ACTIONS = """
import json, sys
from pathlib import Path
from snakemake.api import OutputSettings, ResourceSettings, SnakemakeApi

def action(rule):
    for kind in ("script", "notebook", "wrapper", "cwl", "template_engine"):
        if getattr(rule, kind):
            return kind
    if rule.shellcmd:
        return "shell"
    return "none" if rule.norun else "run"

snakefile, workdir, out = map(Path, sys.argv[1:])
with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(ResourceSettings(), snakefile=snakefile, workdir=workdir)._workflow
    out.write_text(json.dumps({rule.name: [action(rule), rule.shellcmd] for rule in workflow.rules}))
"""


def rule_actions(snakefile: Path, workdir: Path, out: Path) -> dict:
    """rule name -> [how it runs (shell, script, run, ...), its shell command], from the loaded workflow."""
    command = [sys.executable, "-c", RULE_ACTIONS, str(snakefile), str(workdir), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_job_runs_the_package_command_line(tmp_path):
    actions = rule_actions(REPO / "Snakefile", REPO, tmp_path / "actions.json")
    assert {"label", "probe", "probe_summary", "extract_shard"} <= set(actions)
    for name, (action, command) in actions.items():
        if name == "all":
            assert action == "none"
        else:
            assert action == "shell" and command.startswith("{params.cli} "), (name, action, command)


def test_rule_check_sees_a_script_rule(tmp_path):
    """The check above would fail on a script: or run: rule."""
    (tmp_path / "Snakefile").write_text(
        'rule by_script:\n    output: "a"\n    script: "make_a.py"\n\n'
        'rule by_run:\n    output: "b"\n    run:\n        pass\n\n'
        'rule by_shell:\n    output: "c"\n    shell: "touch {output}"\n'
    )
    actions = rule_actions(tmp_path / "Snakefile", tmp_path, tmp_path / "actions.json")
    assert {name: action for name, (action, _) in actions.items()} == {
        "by_script": "script",
        "by_run": "run",
        "by_shell": "shell",
    }


def test_schema_probe_settings_match_probe_settings():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    section = schema["properties"]["probes"]
    assert section["additionalProperties"] is False
    properties = section["properties"]
    assert {key: spec["default"] for key, spec in properties.items()} == asdict(ProbeSettings())
    for key, spec in properties.items():
        assert spec.get("type") and spec.get("description"), key
    assert ProbeSettings.from_mapping({key: spec["default"] for key, spec in properties.items()}) == ProbeSettings()


def test_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    snakefmt = shutil.which("snakefmt")
    fmt = subprocess.run([snakefmt, "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
