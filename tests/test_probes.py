"""Probes on synthetic embeddings with a planted signal in one layer (CPU, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from vlmstates.analysis import summary as probe_summary
from vlmstates.analysis.labels import label_embeddings
from vlmstates.analysis.probes import settings as probe_settings
from vlmstates.analysis.probes import stats as probe_stats
from vlmstates.cli import main
from vlmstates.store import SampleResult, write_embeddings

torch = pytest.importorskip("torch")

SIGNAL_KEY = "query_token_representation/layer_1"
LAYERS = (0, 1, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny MLPs run fastest on one thread, and the tests must not take the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_embeddings(path, n_images=200, per_image=4, dim=8, rate=0.3, seed=0, signal=2.0, failed=()):
    """Questions grouped 4 per image; hallucinated ones (answer 'no' to a 'yes' question) get a shift
    in the first features of SIGNAL_KEY only. Returns the labels."""
    rng = np.random.default_rng(seed)
    dims = {"vision_only_representation": dim}
    for representation in ("vision_token_representation", "query_token_representation"):
        for layer in LAYERS:
            dims[f"{representation}/layer_{layer}"] = dim
    results, y = [], []
    for i in range(n_images * per_image):
        qid, image = f"q{i:04d}", f"img{i // per_image:03d}"
        if i in failed:
            results.append(SampleResult.failed(qid, image, "Is there a cat?", "yes", "out of memory"))
            y.append(0)
            continue
        hallucinated = bool(rng.random() < rate)
        vectors = {key: rng.normal(size=d).astype(np.float32) for key, d in dims.items()}
        if hallucinated:
            vectors[SIGNAL_KEY][:3] += signal
        results.append(
            SampleResult(
                qid, image, "Is there a cat?", "yes", answer="No." if hallucinated else "Yes.", vectors=vectors
            )
        )
        y.append(int(hallucinated))
    attrs = {"model": "Qwen/Qwen2.5-VL-7B-Instruct", "family": "qwen2_5_vl", "layers": list(LAYERS)}
    write_embeddings(path, results, dims, attrs)
    return np.array(y)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    make_embeddings(root / "embeddings.h5", failed=(5,))
    label_embeddings(root / "embeddings.h5", root / "labels.csv", "yesno")
    return root


FAST = dict(mlp_max_epochs=4, bootstrap=200, mlp_hidden=[64, 32, 16])


# ---------------------------------------------------------------------------------------------
# Splits


def test_grouped_split_keeps_images_together_and_stratifies():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"img{i}" for i in range(300)], rng.integers(1, 6, size=300))
    y = (rng.random(len(groups)) < 0.15).astype(int)
    part = probe_stats.grouped_assignment(y, groups, [0.7, 0.1, 0.2], seed=0)
    owners = pd.DataFrame({"g": groups, "p": part}).groupby("g")["p"].nunique()
    assert (owners == 1).all(), "an image appears in two splits"
    for k, target in enumerate([0.7, 0.1, 0.2]):
        assert np.mean(part == k) == pytest.approx(target, abs=0.02)
        assert y[part == k].mean() == pytest.approx(y.mean(), abs=0.03)


@pytest.mark.parametrize("split", ["grouped", "kfold"])
def test_no_image_in_two_splits(planted, tmp_path, split):
    settings = probe_settings.ProbeSettings(split=split, folds=3, probes=["logreg"], representations=["VF"], **FAST)
    probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path, settings)
    splits = pd.read_csv(tmp_path / "splits.csv", dtype=str)
    for _, fold in splits.groupby("fold"):
        assert (fold.groupby("image_id")["split"].nunique() == 1).all()
        assert fold["question_id"].is_unique
    if split == "kfold":
        tests = splits[splits["split"] == "test"]
        assert tests["question_id"].is_unique and len(tests) == 799  # every usable question tested once
        assert (tests.groupby("image_id")["fold"].nunique() == 1).all()


@pytest.mark.parametrize("split", ["grouped", "kfold", "halp"])
def test_shuffled_control_keeps_class_counts_per_split(split):
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 2)
    y = (rng.random(80) < 0.3).astype(int)
    folds = probe_stats.make_folds(y, groups, probe_settings.ProbeSettings(split=split, folds=4))
    shuffled = probe_stats.shuffled_labels(y, folds, seed=1)
    assert not np.array_equal(shuffled, y)
    for fold in folds:
        parts = [fold.train, fold.val, fold.test]
        if split == "kfold":  # test folds keep their counts, so does each fold's rest (train and val together)
            parts = [np.r_[fold.train, fold.val], fold.test]
        for part in parts:
            assert shuffled[part].sum() == y[part].sum(), split


def test_halp_split_is_random_by_question():
    y = np.array([0, 1] * 50)
    groups = np.repeat(np.arange(25), 4)
    (fold,) = probe_stats.make_folds(y, groups, probe_settings.ProbeSettings(split="halp"))
    assert len(fold.val) == 0 and len(fold.test) == 20 and len(fold.train) == 80
    split_of = np.empty(100, dtype=object)
    split_of[fold.train], split_of[fold.test] = "train", "test"
    assert pd.Series(split_of).groupby(groups).nunique().max() == 2  # images do straddle the split


# ---------------------------------------------------------------------------------------------
# Metrics


def test_bootstrap_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + y, 1)  # many ties
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    ends = np.r_[starts[1:] - 1, len(s) - 1]
    weights = np.ones((1, len(s)))
    value = probe_stats._weighted_auroc(y[order].astype(float), starts[group], ends[group], weights)[0]
    assert value == pytest.approx(roc_auc_score(y, scores))
    assert probe_stats.auroc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    low, high = probe_stats.bootstrap_auroc(y, scores, 500, 0.95, seed=0)
    assert low < roc_auc_score(y, scores) < high and high - low < 0.2


def test_bootstrap_undefined_for_one_class():
    assert all(math.isnan(v) for v in probe_stats.bootstrap_auroc(np.ones(10), np.arange(10.0), 100, 0.95, 0))


# ---------------------------------------------------------------------------------------------
# The planted signal


def test_planted_layer_found_and_controls_near_chance(planted, tmp_path):
    settings = probe_settings.ProbeSettings(probes=["logreg"], **FAST)
    metrics = probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path, settings)
    assert len(metrics) == 7 and (metrics["status"] == "ok").all()
    signal = metrics["key"] == SIGNAL_KEY
    assert metrics.loc[signal, "auroc"].item() > 0.9
    assert metrics.loc[signal, "auroc_ci_low"].item() > 0.8
    assert (metrics.loc[~signal, "auroc"] - 0.5).abs().max() < 0.15
    assert (metrics["control_auroc"] - 0.5).abs().max() < 0.15
    row = metrics[signal].iloc[0]
    assert row["n_train"] + row["n_val"] + row["n_test"] == 799  # one failed extraction left out
    assert row["n_test"] == pytest.approx(160, abs=12) and row["n_val"] == pytest.approx(80, abs=12)
    assert 0.2 < row["pos_rate_test"] < 0.4 and row["selected"].startswith("C=")
    for name in ("metrics.csv", "metrics.json", "splits.csv", "heatmap.png", "auroc_by_layer.png"):
        assert (tmp_path / name).stat().st_size > 0
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["n_usable"] == 799 and document["n_failed"] == 1 and len(document["metrics"]) == 7
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlp_probe_finds_the_planted_layer(planted, tmp_path):
    settings = probe_settings.ProbeSettings(probes=["mlp"], representations=["QT"], layers=[0, 1], **FAST)
    metrics = probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path, settings)
    by_key = metrics.set_index("key")
    assert by_key.loc[SIGNAL_KEY, "auroc"] > 0.9
    assert abs(by_key.loc["query_token_representation/layer_0", "auroc"] - 0.5) < 0.15
    assert abs(by_key.loc[SIGNAL_KEY, "control_auroc"] - 0.5) < 0.15
    assert by_key.loc[SIGNAL_KEY, "selected"].startswith("epoch=")
    assert by_key.loc[SIGNAL_KEY, "device"] == "cpu"


def test_mlp_is_reproducible(planted, tmp_path):
    settings = probe_settings.ProbeSettings(
        probes=["mlp"], representations=["QT"], layers=[1], shuffled_control=False, **FAST
    )
    first = probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path / "a", settings)
    second = probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path / "b", settings)
    assert first["auroc"].tolist() == second["auroc"].tolist()


def test_kfold_and_halp_splits_find_the_signal(planted, tmp_path):
    for split in ("kfold", "halp"):
        settings = probe_settings.ProbeSettings(
            split=split, folds=3, probes=["logreg"], representations=["QT"], layers=[1], **FAST
        )
        metrics = probe_stats.run_probes(planted / "embeddings.h5", planted / "labels.csv", tmp_path / split, settings)
        row = metrics.iloc[0]
        assert row["auroc"] > 0.9, split
        if split == "kfold":
            assert row["n_test"] == 799 and np.isfinite(row["auroc_fold_std"]) and row["selected"].count("|") == 2
        else:
            assert row["n_val"] == 0 and row["selected"] == "C=1" and math.isnan(row["val_auroc"])


# ---------------------------------------------------------------------------------------------
# Too little data: NaN with a reason, never a crash


def test_tiny_dataset_is_handled(tmp_path):
    make_embeddings(tmp_path / "embeddings.h5", n_images=9, per_image=4, rate=0.1, seed=3)
    label_embeddings(tmp_path / "embeddings.h5", tmp_path / "labels.csv", "yesno")
    settings = probe_settings.ProbeSettings(probes=["logreg", "mlp"], representations=["VF", "QT"], layers=[1], **FAST)
    metrics = probe_stats.run_probes(tmp_path / "embeddings.h5", tmp_path / "labels.csv", tmp_path / "out", settings)
    assert len(metrics) == 4
    for row in metrics.itertuples():
        assert (row.status == "ok" and np.isfinite(row.auroc)) or (math.isnan(row.auroc) and row.reason)
    assert (tmp_path / "out" / "heatmap.png").exists()


def test_one_class_everywhere(tmp_path):
    make_embeddings(tmp_path / "embeddings.h5", n_images=5, rate=0.0)
    label_embeddings(tmp_path / "embeddings.h5", tmp_path / "labels.csv", "yesno")
    settings = probe_settings.ProbeSettings(probes=["logreg"], representations=["VF"], **FAST)
    metrics = probe_stats.run_probes(tmp_path / "embeddings.h5", tmp_path / "labels.csv", tmp_path / "out", settings)
    assert metrics["status"].tolist() == ["skipped"]
    assert "0 hallucinated" in metrics["reason"].item()


def test_labels_from_another_file_are_rejected(planted, tmp_path):
    labels = pd.read_csv(planted / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[0, "question_id"] = "elsewhere"
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match="not in"):
        probe_stats.run_probes(
            planted / "embeddings.h5", tmp_path / "labels.csv", tmp_path / "out", probe_settings.ProbeSettings()
        )


# ---------------------------------------------------------------------------------------------
# Answer types, dataset columns and the question-only baseline, on labels as the paper's rule makes them

TYPE_CUE_KEY, SIGNAL_KEY_TYPED = "query_token_representation/layer_0", "query_token_representation/layer_1"
TYPED_QUESTIONS = {  # answer type: (question, ground truth, category)
    "yes/no": ("Is there a cat in the picture?", "yes", "existence"),
    "number": ("How many cats are there?", "2", "counting"),
    "other": ("What colour is the cat?", "black", "colour"),
}


def make_typed_run(root, n_images=150, rate=0.4, seed=0):
    """One question of each answer type per image; as under the paper's rule, only yes/no questions are ever
    hallucinated. TYPE_CUE_KEY marks yes/no questions (a question-type cue, no hallucination signal),
    SIGNAL_KEY_TYPED carries the hallucination itself. Writes the embeddings, labels.csv with its summary
    (method halp_paper) and the validated dataset table, whose extra columns are `dataset` and `category`."""
    rng = np.random.default_rng(seed)
    dims = {TYPE_CUE_KEY: 4, SIGNAL_KEY_TYPED: 4}
    results, labels, dataset = [], [], []
    for i in range(n_images * 3):
        kind = list(TYPED_QUESTIONS)[i % 3]
        question, truth, category = TYPED_QUESTIONS[kind]
        qid, image = f"q{i:04d}", f"img{i // 3:03d}"
        hallucinated = kind == "yes/no" and bool(rng.random() < rate)
        vectors = {key: rng.normal(size=d).astype(np.float32) for key, d in dims.items()}
        vectors[TYPE_CUE_KEY][0] += 3.0 * (kind == "yes/no")
        vectors[SIGNAL_KEY_TYPED][0] += 1.5 * hallucinated
        results.append(SampleResult(qid, image, question, truth, answer="an answer", vectors=vectors))
        labels.append({"question_id": qid, "image_id": image, "hallucinated": "true" if hallucinated else "false"})
        part = "A" if i < n_images * 3 // 2 else "B"
        dataset.append({"question_id": qid, "image_id": image, "question": question, "answer": truth})
        dataset[-1].update(dataset=part, category=category)
    write_embeddings(root / "embeddings.h5", results, dims, {"model": "org/Model-7B", "family": "qwen2_5_vl"})
    pd.DataFrame(labels).to_csv(root / "labels.csv", index=False)
    (root / "labels.summary.json").write_text(json.dumps({"method": "halp_paper"}))
    pd.DataFrame(dataset).to_csv(root / "questions.csv", index=False)


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    """One probe run on the typed questions, broken down by both dataset columns."""
    root = tmp_path_factory.mktemp("typed")
    make_typed_run(root)
    settings = probe_settings.ProbeSettings(
        probes=["logreg"], representations=["QT"], breakdown=["dataset", "category"], **FAST
    )
    metrics = probe_stats.run_probes(
        root / "embeddings.h5", root / "labels.csv", root / "probes", settings, dataset_csv=root / "questions.csv"
    )
    return root, metrics.set_index("key")


def test_stratified_auroc_compares_within_strata_only():
    y = np.array([1, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.5])
    strata = np.array(["a", "a", "a", "b", "b", "b"])
    # a: the positive beats both negatives (2 of 2 pairs); b: it beats one of two (1 of 2)
    assert probe_stats.stratified_auroc(y, scores, strata) == pytest.approx(3 / 4)
    assert probe_stats.auroc(y, scores) == pytest.approx(5 / 8)  # across strata 0.3 also loses to 0.8 and 0.7
    # a score that only tells the strata apart is at chance within them
    assert probe_stats.stratified_auroc(y, (strata == "a").astype(float), strata) == 0.5
    assert math.isnan(probe_stats.stratified_auroc(np.zeros(3), np.arange(3.0), np.array(["a", "b", "c"])))


def test_a_question_type_cue_scores_overall_but_not_within_answer_types(typed):
    root, metrics = typed
    cue, signal = metrics.loc[TYPE_CUE_KEY], metrics.loc[SIGNAL_KEY_TYPED]
    assert cue["auroc"] > 0.75 and abs(cue["auroc_within_answer_type"] - 0.5) < 0.12
    assert signal["auroc"] > 0.75 and signal["auroc_within_answer_type"] > 0.75
    # the question text alone tells yes/no questions apart (well above chance) and nothing within them
    assert (metrics["baseline_auroc"] > 0.75).all()
    assert (metrics["baseline_auroc_within_answer_type"] == 0.5).all()
    document = json.loads((root / "probes" / "metrics.json").read_text())
    assert document["label_method"] == "halp_paper" and document["positive_rate"] == pytest.approx(cue["pos_rate"])
    assert document["question_baseline"]["auroc"] == pytest.approx(cue["baseline_auroc"])
    assert document["answer_types"] == {"yes/no": 150, "number": 150, "other": 150}


def test_subsets_count_both_classes_and_say_too_few_positives(typed):
    root, metrics = typed
    subsets = pd.read_csv(root / "probes" / "subsets.csv", keep_default_na=False, na_values=[""])
    signal = subsets[subsets["key"] == SIGNAL_KEY_TYPED].set_index(["subset", "value"])
    assert list(signal.index) == [
        ("answer_type", "yes/no"), ("answer_type", "number"), ("answer_type", "other"),
        ("dataset", "A"), ("dataset", "B"), ("category", "colour"), ("category", "counting"),
        ("category", "existence"),
    ]  # fmt: skip
    assert (signal["n_pos"] + signal["n_neg"] == signal["n_test"]).all()
    by_type = signal.loc["answer_type"]
    assert by_type["n_test"].sum() == metrics.loc[SIGNAL_KEY_TYPED, "n_test"]
    for kind in ("number", "other"):
        assert by_type.loc[kind, "status"] == "too few positives" and math.isnan(by_type.loc[kind, "auroc"])
        assert by_type.loc[kind, "n_pos"] == 0 and by_type.loc[kind, "n_neg"] > 0
    yes_no = by_type.loc["yes/no"]
    assert yes_no["status"] == "ok" and yes_no["auroc_ci_low"] < yes_no["auroc"] < yes_no["auroc_ci_high"]
    # only yes/no questions have both classes, so the AUROC within answer types is theirs
    assert yes_no["auroc"] == pytest.approx(metrics.loc[SIGNAL_KEY_TYPED, "auroc_within_answer_type"])
    assert signal.loc[("category", "counting"), "status"] == "too few positives"
    assert (signal.loc["dataset", "status"] == "ok").all()
    baseline = subsets[subsets["representation"] == probe_stats.BASELINE_REPRESENTATION]
    assert len(baseline) == len(signal) and baseline["probe"].eq(probe_stats.BASELINE_PROBE).all()
    page = (root / "probes" / "subsets.html").read_text()
    # the baseline and the best layer (not the type cue's): answer types number and other, categories colour and counting
    assert page.count("<td>too few positives</td>") == 2 * 4
    assert "query_token_representation/layer_0" not in page  # the type cue is not the best layer


def test_cli_takes_the_dataset_table_and_the_labels_summary_as_the_rule_passes_them(typed, tmp_path):
    root, _ = typed
    (tmp_path / "elsewhere.json").write_text(json.dumps({"method": "file"}))
    code = main(
        [
            "probe", str(root / "embeddings.h5"), str(root / "labels.csv"), "-o", str(tmp_path / "p"),
            "--labels-summary", str(tmp_path / "elsewhere.json"), "--dataset", str(root / "questions.csv"),
            "--breakdown", "category", "--probes", "logreg", "--representations", "QT", "--layers", "1",
            "--bootstrap", "0", "--no-control", "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0
    assert pd.read_csv(tmp_path / "p" / "metrics.csv")["label_method"].tolist() == ["file"]
    subsets = pd.read_csv(tmp_path / "p" / "subsets.csv")
    assert set(subsets["subset"]) == {"answer_type", "category"}


def test_a_breakdown_column_the_dataset_lacks_is_a_config_error(typed, tmp_path):
    root, _ = typed
    settings = probe_settings.ProbeSettings(probes=["logreg"], representations=["QT"], breakdown=["source"], **FAST)
    with pytest.raises(probe_settings.ProbeError, match=r"probes.breakdown names source.*its columns: .*category"):
        probe_stats.run_probes(root / "embeddings.h5", root / "labels.csv", tmp_path, settings, root / "questions.csv")
    with pytest.raises(probe_settings.ProbeError, match="no dataset table was given"):
        probe_stats.run_probes(root / "embeddings.h5", root / "labels.csv", tmp_path, settings)
    with pytest.raises(probe_settings.ProbeError, match="always broken down"):
        probe_settings.ProbeSettings.from_mapping({"breakdown": ["answer_type"]})


# ---------------------------------------------------------------------------------------------
# Settings, summary, command line


def test_settings_validation():
    assert probe_settings.ProbeSettings.from_mapping({"split": "kfold", "folds": 3}).folds == 3
    with pytest.raises(ValueError, match="unknown probe setting"):
        probe_settings.ProbeSettings.from_mapping({"epochs": 3})
    with pytest.raises(ValueError, match="sum to 1"):
        probe_settings.ProbeSettings.from_mapping({"train_fraction": 0.5})
    with pytest.raises(ValueError, match="split"):
        probe_settings.ProbeSettings.from_mapping({"split": "random"})


def test_published_reference_data():
    published = probe_summary.published_auroc()
    qt = published[published["representation"] == "QT"].set_index("model")["auroc"]
    assert qt.to_dict() == {"Gemma-3-12B": 0.935, "Molmo-7B": 0.919, "Qwen2.5-VL-7B": 0.915, "Phi-4": 0.903}
    assert published.loc[published["representation"] != "QT", "auroc"].isna().all()
    assert published["citation"].str.contains("EACL 2026").all()


def probe_with_label_method(planted, folder, method: str, **settings):
    """The planted run with its labels' summary naming `method`; returns the summary of that one model."""
    folder.mkdir()
    (folder / "labels.csv").write_bytes((planted / "labels.csv").read_bytes())
    summary_json = json.loads((planted / "labels.summary.json").read_text())
    (folder / "labels.summary.json").write_text(json.dumps({**summary_json, "method": method}))
    settings = probe_settings.ProbeSettings(probes=["logreg"], **settings, **FAST)
    metrics = probe_stats.run_probes(planted / "embeddings.h5", folder / "labels.csv", folder / "probes", settings)
    assert (metrics["label_method"] == method).all()
    assert json.loads((folder / "probes" / "metrics.json").read_text())["label_method"] == method
    summary = probe_summary.summarise_models(
        {"model_a": folder / "probes" / "metrics.csv"}, folder / "summary.csv", folder / "summary.png"
    )
    return summary[summary["source"] == "ours"].set_index("representation"), summary


def test_summary_sets_published_numbers_beside_ours_only_on_the_papers_labels(planted, tmp_path):
    """The labels' summary names their method; only the paper's rule (halp_paper) is compared like for like."""
    ours, summary = probe_with_label_method(
        planted, tmp_path / "paper", "halp_paper", representations=["VF", "QT"], shuffled_control=False
    )
    assert ours.loc["QT", "layer"] == 1 and ours.loc["QT", "layer_selected_by"] == "validation AUROC"
    assert ours.loc["QT", "pos_rate"] == pytest.approx(237 / 799)  # the share of positives among usable questions
    assert ours.loc["QT", "paper_model"] == "Qwen2.5-VL-7B" and ours.loc["QT", "published_auroc"] == 0.915
    assert ours.loc["QT", "difference"] == pytest.approx(ours.loc["QT", "auroc"] - 0.915)
    assert ours.loc["QT", "comparison"].startswith("like for like")
    assert "<th>difference</th>" in (tmp_path / "paper" / "summary.html").read_text()
    assert math.isnan(ours.loc["VF", "published_auroc"])
    assert (summary["source"] == "published").sum() == len(probe_summary.published_auroc())
    assert (tmp_path / "paper" / "summary.png").stat().st_size > 0

    ours, _ = probe_with_label_method(
        planted, tmp_path / "own", "yesno", representations=["QT"], layers=[1], shuffled_control=False
    )
    assert ours.loc["QT", "label_method"] == "yesno" and ours.loc["QT", "paper_model"] == "Qwen2.5-VL-7B"
    assert ours[["published_auroc", "difference"]].isna().all().all()
    assert ours.loc["QT", "comparison"].startswith("not compared: labels by yesno")
    page = (tmp_path / "own" / "summary.html").read_text()
    assert "<th>difference</th>" not in page and "<td>yesno</td>" in page


def test_labels_without_their_summary_have_an_unknown_method(planted, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_bytes((planted / "labels.csv").read_bytes())
    settings = probe_settings.ProbeSettings(
        probes=["logreg"], representations=["QT"], layers=[1], **{**FAST, "bootstrap": 0}, shuffled_control=False
    )
    metrics = probe_stats.run_probes(planted / "embeddings.h5", labels, tmp_path / "out", settings)
    assert (metrics["label_method"] == probe_settings.UNKNOWN_LABEL_METHOD).all()
    with pytest.raises(probe_settings.ProbeError, match="no such file"):
        probe_stats.run_probes(planted / "embeddings.h5", labels, tmp_path / "out", settings, None, tmp_path / "x.json")


def test_cli(planted, tmp_path):
    code = main(
        [
            "probe", str(planted / "embeddings.h5"), str(planted / "labels.csv"), "-o", str(tmp_path / "p"),
            "--settings-json", json.dumps({"probes": ["logreg"], "representations": ["QT"], "layers": [1]}),
            "--bootstrap", "50", "--no-control", "--threads", "1",
        ]
    )  # fmt: skip
    assert code == 0
    metrics = pd.read_csv(tmp_path / "p" / "metrics.csv")
    assert metrics["control_auroc"].isna().all() and metrics["auroc"].item() > 0.9
    code = main(
        [
            "probe-summary",
            f"m={tmp_path / 'p' / 'metrics.csv'}",
            "-o",
            str(tmp_path / "s.csv"),
            "--plot",
            str(tmp_path / "s.png"),
        ]
    )
    assert code == 0 and (tmp_path / "s.png").exists()
