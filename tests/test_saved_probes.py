"""Saved probes and `vlmstates screen`: the probe rule keeps each trained probe, and scoring its own test
split gives back the test AUROC it recorded (synthetic embeddings with a planted signal, CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json

import h5py
import jsonschema
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO
from test_probes import FAST, SIGNAL_KEY, make_embeddings
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates.analysis.labels import TRUE, label_embeddings
from vlmstates.analysis.probes import stats as probe_stats
from vlmstates.analysis.probes.saved import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    ProbeSpec,
    SavedProbeError,
    load_probe,
    parse_probe_spec,
    read_index,
)
from vlmstates.analysis.probes.settings import ProbeSettings
from vlmstates.analysis.screen import score_embeddings, screening_settings, sidecar_path
from vlmstates.cli import main
from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import read_embeddings
from vlmstates.workflow.config_check import check_config

torch = pytest.importorskip("torch")
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One grouped run of both probe kinds on VF and QT: its inputs and the probe folder."""
    root = tmp_path_factory.mktemp("trained")
    make_embeddings(root / "embeddings.h5", failed=(5,))
    label_embeddings(root / "embeddings.h5", root / "labels.csv", "yesno")
    torch.set_num_threads(1)
    settings = ProbeSettings(**FAST, representations=["VF", "QT"])
    metrics = probe_stats.run_probes(root / "embeddings.h5", root / "labels.csv", root / "probes", settings)
    return root, metrics


def test_every_evaluated_probe_is_saved_in_a_versioned_index(trained):
    root, metrics = trained
    index = read_index(root / "probes" / "saved")
    assert (index["format"], index["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert index["family"] == "qwen2_5_vl" and index["split"] == "grouped"
    ok = metrics[metrics["status"] == "ok"]
    assert sorted(e["id"] for e in index["probes"]) == sorted(
        f"{r.representation}_{r.probe}" if pd.isna(r.layer) else f"{r.representation}_layer_{r.layer}_{r.probe}"
        for r in ok.itertuples()
    )
    for entry in index["probes"]:
        assert (root / "probes" / "saved" / entry["file"]).is_file()
        assert 0 < entry["threshold_risk"] < 1 and "validation" in entry["threshold_rule"]


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_scoring_the_test_split_reproduces_the_recorded_auroc_exactly(trained, tmp_path, kind):
    root, metrics = trained
    scores = score_embeddings(root / "probes" / "saved", f"QT/1/{kind}", root / "embeddings.h5", tmp_path / "s.csv")
    splits = pd.read_csv(root / "probes" / "splits.csv", dtype={"hallucinated": str})
    test = splits[splits["split"] == "test"]
    by_question = scores.set_index("question_id")
    y = (test["hallucinated"] == TRUE).to_numpy()
    recomputed = probe_stats.auroc(y, by_question.loc[test["question_id"], "logit"].to_numpy())
    recorded = pd.read_csv(root / "probes" / "metrics.csv")
    recorded = recorded[(recorded["key"] == SIGNAL_KEY) & (recorded["probe"] == kind)]["auroc"].item()
    assert recomputed == recorded
    about = json.loads(sidecar_path(tmp_path / "s.csv").read_text())
    assert about["test_auroc"] == recorded and about["probe"]["id"] == f"QT_layer_1_{kind}"
    # the failed question keeps its row, unscored
    failed = by_question.loc["q0005"]
    assert failed["status"] == "failed" and failed["predicted_hallucinated"] == "" and np.isnan(failed["logit"])


def test_a_saved_probe_round_trips(trained):
    root, _ = trained
    for kind in ("logreg", "mlp"):
        probe, _ = load_probe(root / "probes" / "saved", f"QT/1/{kind}")
        assert probe.key == SIGNAL_KEY and probe.dim == 8 and probe.kind == kind
        x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        again, _ = load_probe(root / "probes" / "saved", f"QT/1/{kind}")
        assert np.array_equal(probe.logits(x), again.logits(x))
        with np.load(root / "probes" / "saved" / f"{probe.id}.npz", allow_pickle=False) as arrays:
            assert np.array_equal(arrays["mean"], probe.mean)


def test_best_is_the_highest_validation_auroc(trained):
    root, _ = trained
    probe, index = load_probe(root / "probes" / "saved", "best")
    assert probe.metrics["val_auroc"] == max(e["metrics"]["val_auroc"] for e in index["probes"])
    assert probe.key == SIGNAL_KEY


VALID_SPECS = {
    "best": None,
    "VF/logreg": ProbeSpec("VF", None, "logreg"),
    "VF/mlp": ProbeSpec("VF", None, "mlp"),
    "VT/0/logreg": ProbeSpec("VT", 0, "logreg"),
    "VT/12/mlp": ProbeSpec("VT", 12, "mlp"),
    "VT_paper/3/logreg": ProbeSpec("VT_paper", 3, "logreg"),
    "QT/007/mlp": ProbeSpec("QT", 7, "mlp"),
    "MM/31/logreg": ProbeSpec("MM", 31, "logreg"),
}
INVALID_SPECS = [
    "", "Best", "best/", "VF", "VF/3/logreg", "VF/svm", "VT/logreg", "VT/-1/logreg", "VT/1.5/logreg", "VT/x/mlp",
    "VT/1/svm", "VT/1/logreg/", "/VT/1/logreg", "vt/1/logreg", "XX/1/logreg", "VT_PAPER/1/mlp", "VT/1", "QT-1",
    "VT//logreg", "VT/\u0663/logreg", " VT/1/logreg", "VT/1/logreg ", "MM/1/logreg,mlp",
]  # fmt: skip


@pytest.mark.parametrize("spec", [*VALID_SPECS, *INVALID_SPECS])
def test_the_schema_accepts_exactly_the_probe_names_the_parser_reads(spec):
    pattern = yaml.safe_load(SCHEMA.read_text())["properties"]["screen"]["properties"]["probe"]["pattern"]
    by_schema = jsonschema.Draft202012Validator({"type": "string", "pattern": pattern}).is_valid(spec)
    try:
        parsed, by_parser = parse_probe_spec(spec), True
    except SavedProbeError:
        by_parser = False
    assert by_schema == by_parser == (spec in VALID_SPECS)
    if by_parser:
        assert parsed == VALID_SPECS[spec]


def test_an_unknown_probe_names_the_index_and_what_it_holds(trained):
    root, _ = trained
    with pytest.raises(SavedProbeError, match=r"index.json has no probe 'VT/1/logreg'; it has: .*QT/1/logreg"):
        load_probe(root / "probes" / "saved", "VT/1/logreg")
    with pytest.raises(SavedProbeError, match="REPRESENTATION/LAYER/KIND"):
        load_probe(root / "probes" / "saved", "QT-1")
    with pytest.raises(SavedProbeError, match=f"{INDEX} does not exist"):
        load_probe(root / "probes", "best")


def test_a_missing_layer_or_another_width_is_refused_with_the_fix(trained, tmp_path):
    root, _ = trained
    make_embeddings(tmp_path / "narrow.h5", n_images=5, dim=4)
    with pytest.raises(SavedProbeError, match=r"narrow.h5: .*layer_1 has width 4, but probe QT_layer_1_logreg"):
        score_embeddings(root / "probes" / "saved", "QT/1/logreg", tmp_path / "narrow.h5", tmp_path / "s.csv")
    make_embeddings(tmp_path / "fewer.h5", n_images=5)
    with h5py.File(tmp_path / "fewer.h5", "a") as f:
        del f[SIGNAL_KEY]
    with pytest.raises(SavedProbeError, match=r"fewer.h5 has no vector .*layer_1.*layers including 1.*--dataset"):
        score_embeddings(root / "probes" / "saved", "QT/1/logreg", tmp_path / "fewer.h5", tmp_path / "s.csv")


def test_a_kfold_run_keeps_no_probe_and_says_why(tmp_path):
    make_embeddings(tmp_path / "e.h5", n_images=60)
    label_embeddings(tmp_path / "e.h5", tmp_path / "labels.csv", "yesno")
    settings = ProbeSettings(**FAST, split="kfold", folds=2, probes=["logreg"], representations=["VF"])
    probe_stats.run_probes(tmp_path / "e.h5", tmp_path / "labels.csv", tmp_path / "p", settings)
    assert read_index(tmp_path / "p" / "saved")["probes"] == []
    with pytest.raises(SavedProbeError, match="no probe is kept; use split grouped"):
        load_probe(tmp_path / "p" / "saved")


def test_without_validation_the_threshold_is_risk_one_half_and_best_goes_by_test_auroc(tmp_path):
    make_embeddings(tmp_path / "e.h5", n_images=60)
    label_embeddings(tmp_path / "e.h5", tmp_path / "labels.csv", "yesno")
    settings = ProbeSettings(**FAST, split="halp", probes=["logreg"], representations=["QT"])
    probe_stats.run_probes(tmp_path / "e.h5", tmp_path / "labels.csv", tmp_path / "p", settings)
    probe, index = load_probe(tmp_path / "p" / "saved")
    assert probe.threshold == 0.0 and "risk 0.5" in probe.threshold_rule and probe.metrics["val_auroc"] is None
    assert probe.metrics["test_auroc"] == max(e["metrics"]["test_auroc"] for e in index["probes"])


def test_screening_extracts_just_the_probes_layer_prefill_only(trained):
    root, _ = trained
    probe, _ = load_probe(root / "probes" / "saved", "QT/1/logreg")
    entry = ModelSettings.from_config("m", {"model": "x", "layers": "all", "multimodal_representation": True})
    screening = screening_settings(entry, probe)
    assert (screening.answers, screening.layers, screening.multimodal_representation) == (False, (1,), False)
    assert not screening.paper_positions
    # a probe of the paper's vision position needs those vectors recorded, and only then
    paper = dataclasses.replace(probe, representation="VT_paper", key="paper_vision_token_representation/layer_1")
    assert (
        screening_settings(entry, paper).paper_positions
        and not screening_settings(entry, paper).multimodal_representation
    )


def test_the_screen_command(trained, tmp_path, capsys):
    root, _ = trained
    out = tmp_path / "scores.csv"
    assert main(["screen", str(root / "probes" / "saved"), str(root / "embeddings.h5"), "-o", str(out)]) == 0
    assert "test AUROC" in capsys.readouterr().out
    assert list(pd.read_csv(out).columns)[-2:] == ["hallucination_risk", "predicted_hallucinated"]
    assert main(["screen", str(root / "probes" / "saved"), "-o", str(out), "--probe", "XX/1/logreg"]) == 1
    assert main(["screen", str(root / "probes" / "saved"), str(root / "embeddings.h5"), "-o", str(out),
                 "--probe", "XX/1/logreg"]) == 1  # fmt: skip
    assert "probe 'XX/1/logreg': give `best`" in capsys.readouterr().err
    assert main(["screen", str(root / "probes" / "saved"), str(root / "embeddings.h5"), "-o", str(out),
                 "--probe", "VT/1/logreg"]) == 1  # fmt: skip
    assert "has no probe 'VT/1/logreg'" in capsys.readouterr().err


# -- the config's `screen` key -------------------------------------------------------------------------
def screen_config(screen: dict, probes: dict | None = None) -> dict:
    config = {"dataset": {"csv": "q.csv", "images": "images"}, "models": {"mine": {"model": "org/model"}},
              "screen": {"csv": "new.csv", "images": "new_images", "model": "mine", **screen}}  # fmt: skip
    return config | ({"probes": probes} if probes else {})


def test_the_screen_key_is_checked_naming_the_key_and_the_fix():
    assert check_config(screen_config({}), SCHEMA)["screen"]["probe"] == "best"
    without = {"dataset": {"csv": "q.csv", "images": "i"}, "models": {"m": {"model": "x"}}}
    assert check_config(without, SCHEMA)["screen"] is None
    with pytest.raises(ConfigError, match=r"`screen\.model`: 'other' is not a model of `models` \(known: mine\)"):
        check_config(screen_config({"model": "other"}), SCHEMA)
    with pytest.raises(ConfigError, match=r"`screen\.probe`: 'VT-3' does not match"):
        check_config(screen_config({"probe": "VT-3"}), SCHEMA)
    with pytest.raises(ConfigError, match=r"`screen`: probes\.split kfold keeps no probe.*split: grouped"):
        check_config(screen_config({}, {"split": "kfold"}), SCHEMA)
    with pytest.raises(ConfigError, match=r"`screen\.probe`: VT/3/mlp is not trained .*add it there"):
        check_config(screen_config({"probe": "VT/3/mlp"}, {"probes": ["logreg"]}), SCHEMA)


# -- the workflow, end to end ------------------------------------------------------------------------
@pytest.mark.slow
def test_the_screen_target_scores_a_dataset_from_prefill_only_extraction(tmp_path):
    """One tiny model; `screen:` names the demo set again: its probe (chosen `best`) scores it from a
    prefill-only extraction of just its layer, and the scores carry the probe's recorded test AUROC."""
    data = tmp_path / "data"
    csv_path = write_demo_dataset(data)
    config = {
        "results": str(tmp_path / "results"),
        "dataset": {"csv": str(csv_path), "images": str(data / "images")},
        "models": {"mine": {"model": "resources/checkpoints/tiny-qwen2_5_vl", "batch_size": 4, "answers": False}},
        "labels": {"method": "file", "file": str(data / "labels.csv")},
        "probes": {"bootstrap": 10, "probes": ["logreg"], "representations": ["QT"], "shuffled_control": False},
        "screen": {"csv": str(csv_path), "images": str(data / "images"), "model": "mine"},
    }
    user_file = tmp_path / "user.yaml"
    user_file.write_text(yaml.safe_dump(config))
    workdir = workdir_with_config(tmp_path / "work", default_config())
    snakemake(workdir, "--cores", "2", "--configfile", str(user_file))
    results = tmp_path / "results" / "mine"
    probe, _ = load_probe(results / "probes" / "saved", "best")
    screened = read_embeddings(results / "screen" / "embeddings.h5")
    assert screened.layers == [probe.layer] and not screened.attrs["answers"]
    scores = pd.read_csv(results / "screen" / "scores.csv", dtype={"predicted_hallucinated": str})
    assert len(scores) == len(read_embeddings(results / "embeddings.h5").table)
    assert scores["hallucination_risk"].between(0, 1).all()
    metrics = pd.read_csv(results / "probes" / "metrics.csv")
    recorded = metrics.loc[(metrics["key"] == probe.key) & (metrics["probe"] == probe.kind), "auroc"].item()
    assert json.loads((results / "screen" / "scores.json").read_text())["test_auroc"] == recorded
