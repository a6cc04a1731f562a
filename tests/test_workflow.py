"""The workflow itself: the demo run end to end in a temporary folder, config errors before any job, lint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, astuple, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO

from vlmstates.analysis.probes.settings import PROBE_OUTPUTS, ProbeSettings
from vlmstates.dataset import read_validated_table
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.settings import ExtractionSettings, ModelSettings
from vlmstates.store import STATUS_OK, read_embeddings
from vlmstates.workflow.config_check import check_config
from vlmstates.workflow.run_summary import run_summary


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


DEMO_OUTPUT = "snakemake-output.txt"  # what the demo run printed, kept for the tests of its closing lines


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = workdir_with_config(tmp_path_factory.mktemp("run"), default_config())
    result = snakemake(workdir, "--cores", "2")
    (workdir / DEMO_OUTPUT).write_text(result.stdout + result.stderr)
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
        # one extraction job at a time (the profile's gpu=1): the first loads the model and extracts every
        # shard; the other shards' jobs put theirs in place without loading it (extraction.reuse_loaded_model)
        logs = [path.read_text() for path in (demo_run / "logs" / "extract" / model).glob("shard_*.log")]
        assert len(logs) == emb.attrs["num_shards"] > 1
        assert sum(text.count("loading model ") for text in logs) == 1, model
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
        for name in astuple(PROBE_OUTPUTS):
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
        results = Extractor(load_model(settings), progress=False).extract(
            questions, demo_run / config["dataset"]["images"]
        )
        emb = read_embeddings(demo_run / "results" / model / "embeddings.h5")
        assert emb.table["answer"].iloc[rows].tolist() == [r.answer for r in results]
        for key in emb.representation_keys():
            stored = emb.load(key)[rows]
            expected = np.stack([r.vectors[key] for r in results])
            np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5, err_msg=f"{model} {key}")


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
        (
            {"model": "resources/checkpoints/tiny-gemma3", "attn_implementation": "flash_attention_2"},
            "flash_attention_2 is refused for the text model of the gemma3 family",
        ),
        ({"model": "resources/checkpoints/tiny-gemma3", "max_pixels": 1003520}, "gemma3 family has no pixel budget"),
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


def test_schema_extraction_settings_match_extraction_settings():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    section = schema["properties"]["extraction"]
    assert section["additionalProperties"] is False
    properties = section["properties"]
    assert {key: spec["default"] for key, spec in properties.items()} == asdict(ExtractionSettings())
    for key, spec in properties.items():
        assert spec.get("type") and spec.get("description"), key
    assert ExtractionSettings(**{key: spec["default"] for key, spec in properties.items()}) == ExtractionSettings()


def test_lint_and_format_are_clean():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0 and "good condition" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    snakefmt = shutil.which("snakefmt")
    fmt = subprocess.run([snakefmt, "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    ruff = shutil.which("ruff")
    for check in (["format", "--check"], ["check"]):
        python = subprocess.run([ruff, *check, "src", "tests", "scripts"], cwd=REPO, capture_output=True, text=True)
        assert python.returncode == 0, python.stdout + python.stderr


# --- every label method, each run on the demo's extraction -------------------------------------------------

SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
# The methods run end to end below: every one the schema allows (file is the demo's own).
LABEL_METHODS = ("file", "halp_paper", "difflib_lenient", "yesno", "exact")


def with_defaults(config: dict) -> dict:
    return check_config(config, SCHEMA_PATH)


def test_label_methods_run_below_cover_the_schema_and_what_configs_choose():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert set(schema["properties"]["labels"]["properties"]["method"]["enum"]) == set(LABEL_METHODS)
    without_labels = {k: v for k, v in default_config().items() if k != "labels"}
    seed = yaml.safe_load((REPO / "config" / "all-seed-models.yaml").read_text())
    chosen = [with_defaults(config)["labels"]["method"] for config in (without_labels, seed, default_config())]
    assert chosen == [
        "halp_paper",
        "halp_paper",
        "file",
    ]  # the schema's default, the seed models' and the demo's choice
    assert set(chosen) <= set(LABEL_METHODS)


def label_outputs(workdir: Path) -> dict:
    """model -> its labels table, labels summary and probe metrics, as a run left them."""
    outputs = {}
    for model in default_config()["models"]:
        folder = workdir / "results" / model
        outputs[model] = {
            "labels": pd.read_csv(folder / "labels.csv", dtype=str, keep_default_na=False),
            "summary": json.loads((folder / "labels.summary.json").read_text()),
            "metrics": pd.read_csv(folder / "probes" / "metrics.csv", dtype={"reason": str}),
            "log": (workdir / "logs" / "label" / f"{model}.log").read_text(),
        }
    return outputs


@pytest.fixture(scope="module")
def label_method_runs(demo_run, tmp_path_factory):
    """method -> (model -> outputs, probe summary). The demo's own run is method file; every other method
    reruns a copy of it with `--config labels={method: ...}` alone: the labels and what follows them.
    (--forcerun label with mtime triggers: code edited meanwhile must not rerun the extraction.)"""
    runs = {"file": (label_outputs(demo_run), pd.read_csv(demo_run / "results" / "summary" / "probes.csv"))}
    workdir = tmp_path_factory.mktemp("label_methods") / "run"
    shutil.copytree(demo_run, workdir, symlinks=True)  # copy2: mtimes kept
    for method in LABEL_METHODS[1:]:
        override = f"labels={{method: {method}}}"
        snakemake(workdir, "--cores", "2", "--config", override, "--forcerun", "label", "--rerun-triggers", "mtime")
        runs[method] = (label_outputs(workdir), pd.read_csv(workdir / "results" / "summary" / "probes.csv"))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("method", LABEL_METHODS)
def test_every_label_method_runs_end_to_end(demo_run, label_method_runs, method):
    """Labels, their summary and probes for every demo model; --config alone changed the demo config (all
    three demo models ran). Random models' answers may give one class only: the probes are then skipped,
    with the reason, and the run still completes."""
    question_ids = read_validated_table(demo_run / "results" / "dataset" / "questions.csv")["question_id"].tolist()
    outputs, summary = label_method_runs[method]
    for model, out in outputs.items():
        assert out["summary"]["method"] == method, model
        assert out["labels"]["question_id"].tolist() == question_ids
        assert set(out["labels"]["hallucinated"]) <= {"true", "false", ""}
        counts = out["summary"]
        assert counts["n_judged"] == counts["n_hallucinated"] + counts["n_not_hallucinated"] <= len(question_ids)
        assert (counts.get("labels_file") is not None) == (method == "file")  # only method file reads one
        metrics = out["metrics"]
        assert len(metrics) and set(metrics["status"]) <= {"ok", "skipped"}, metrics["status"]
        assert metrics.loc[metrics["status"] == "skipped", "reason"].str.len().gt(0).all()
        if min(counts["n_hallucinated"], counts["n_not_hallucinated"]) < 2:
            assert (metrics["status"] == "skipped").all(), (model, method)
    assert set(summary.loc[summary["source"] == "ours", "model"]) <= set(outputs)
    assert (summary["source"] == "published").any()


# --- the run's closing lines ------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_run_ends_with_the_run_summary(demo_run):
    printed = (demo_run / DEMO_OUTPUT).read_text()
    closing = printed[printed.rindex("vlmstates: finished") :]
    rows = len(read_validated_table(demo_run / "results" / "dataset" / "questions.csv"))
    assert f"dataset: {rows} rows read, {rows} kept, 0 dropped by validation" in closing
    for model in default_config()["models"]:
        assert f"{model}: {rows} questions ok, 0 failed -> results/{model}/embeddings.h5" in closing
    assert "--report report.html" in closing


@pytest.mark.slow
def test_run_summary_of_the_demo_files(demo_run, tmp_path, monkeypatch):
    """Counts from the merged files and the validation report; on failure the steps of this run that left
    a log but no output, with the log's path."""
    workdir = tmp_path / "copy"
    shutil.copytree(demo_run, workdir, symlinks=True)
    monkeypatch.chdir(workdir)
    config = with_defaults(default_config())
    model = next(iter(config["models"]))
    # one sample failed: the summary counts the status column, not the table's length
    embeddings = workdir / "results" / model / "embeddings.h5"
    with h5py.File(embeddings, "r+") as f:
        f["status"][0] = "failed"
    done = run_summary(config, succeeded=True, argv=["snakemake", "--cores", "2"])
    assert f"{model}: 35 questions ok, 1 failed -> results/{model}/embeddings.h5" in done
    assert "Next, the report" in done and "snakemake --cores 2 --report report.html" in done
    assert "Failed" not in done

    started = time.time()
    (workdir / "results" / model / "shards" / "shard_0001.h5").unlink()
    embeddings.unlink()
    (workdir / "logs" / "extract" / model / "shard_0001.log").write_text("killed\n")  # written in this run
    failed = run_summary(config, succeeded=False, started=started, argv=["snakemake", "--cores", "2"])
    assert f"extract_shard {model} shard_0001: logs/extract/{model}/shard_0001.log\n      killed\n" in failed
    assert f"merge_shards {model}" not in failed  # its log is an earlier run's: it did not fail here
    assert f"{model}: not merged yet" in failed
    assert failed.rstrip().endswith("run the same command again (only what is missing runs): snakemake --cores 2")
    assert len(failed.splitlines()) < 12


@pytest.mark.slow
def test_demo_run_report_and_partial_rerun(demo_run):
    """Last in this file (tests run in file order): it deletes outputs of the shared demo run."""
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
