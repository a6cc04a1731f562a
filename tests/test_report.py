"""What the workflow's report shows: plots (scales, ticks, titles), table pages, the inspection page, and the
published numbers matched to every family. Small synthetic inputs; the figures are inspected, not their pixels."""

from __future__ import annotations

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from vlmstates.analysis import summary as probe_summary
from vlmstates.analysis.labels import label_embeddings
from vlmstates.analysis.probes import plots as probe_plots
from vlmstates.analysis.probes import settings as probe_settings
from vlmstates.analysis.probes import stats as probe_stats
from vlmstates.dataset import validate_and_write
from vlmstates.inspection.report import example_answers, norms_by_representation, norms_figure, write_inspection_report
from vlmstates.store import SampleResult, read_embeddings, write_embeddings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYERS = (0, 3, 7)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def metrics_table(aurocs: dict, model: str = "org/Some-Checkpoint-7B", label_method="halp_paper") -> pd.DataFrame:
    """A metrics table as `probe` writes it, from {(representation, layer, probe): auroc}."""
    rows = []
    for (code, layer, probe), value in aurocs.items():
        rows.append(
            {
                "model": model, "representation": code, "layer": layer, "probe": probe, "split": "grouped",
                "label_method": label_method, "pos_rate": 0.25, "n_test": 20, "auroc": value, "auroc_ci_low": value - 0.1, "auroc_ci_high": value + 0.1,
                "val_auroc": value, "control_auroc": 0.5, "status": "ok", "reason": "",
            }
        )  # fmt: skip
    table = pd.DataFrame(rows, columns=list(probe_stats.METRIC_COLUMNS))
    table["layer"] = table["layer"].astype("Int64")
    return table


def spread_metrics(model: str = "org/Some-Checkpoint-7B") -> pd.DataFrame:
    """AUROCs over the whole 0-1 range, VF without a layer, both probes."""
    aurocs = {("VF", None, probe): 0.1 for probe in probe_settings.PROBES}
    for probe in probe_settings.PROBES:
        for i, layer in enumerate(LAYERS):
            aurocs[("VT", layer, probe)] = 0.05 + 0.1 * i
            aurocs[("QT", layer, probe)] = 0.95 - 0.1 * i
    return metrics_table(aurocs, model)


def tick_texts(ax) -> list[str]:
    ax.figure.canvas.draw()  # tick labels from a locator are only set when drawn
    return [label.get_text().replace("\u2212", "-") for label in ax.get_xticklabels() if label.get_text()]


def is_integer_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


# ---------------------------------------------------------------------------------------------
# Per-model plots


def test_heatmap_colours_span_zero_to_one_with_integer_layers_and_the_model_name():
    fig = probe_plots.heatmap_figure(spread_metrics(), "tiny-qwen: split grouped")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(probe_settings.PROBES)
    for ax in panels:
        norm = ax.images[0].norm
        assert (norm.vmin, norm.vmax) == (0.0, 1.0)  # low AUROCs get their own colours
        labels = tick_texts(ax)
        assert labels[0] == "VF" and labels[1:] == [str(layer) for layer in LAYERS]
    assert "tiny-qwen" in fig.get_suptitle()


def test_heatmap_labels_every_kth_layer_when_there_are_many():
    many = metrics_table({("QT", layer, "logreg"): 0.6 for layer in range(60)})
    labels = tick_texts(probe_plots.heatmap_figure(many).axes[0])
    assert 0 < len(labels) <= probe_plots.MAX_LABELLED_COLUMNS and all(is_integer_text(t) for t in labels)


def test_auroc_by_layer_has_integer_layer_ticks():
    fig = probe_plots.by_layer_figure(spread_metrics(), "tiny-qwen: split grouped")
    for ax in fig.axes:
        labels = tick_texts(ax)
        assert labels and all(is_integer_text(t) for t in labels), labels
    assert "tiny-qwen" in fig.get_suptitle()


def every_layer_metrics(num_layers: int) -> pd.DataFrame:
    """A `layers: all` run of a deep model with paper positions: VF, and VT, VT_paper, QT, MM at every layer."""
    aurocs = {("VF", None, probe): 0.6 for probe in probe_settings.PROBES}
    for probe in probe_settings.PROBES:
        for layer in range(num_layers):
            for i, code in enumerate(("VT", "VT_paper", "QT", "MM")):
                aurocs[(code, layer, probe)] = 0.5 + 0.4 * layer / num_layers - 0.05 * i
    return metrics_table(aurocs)


def tick_boxes(ax):
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    return [label.get_window_extent(renderer) for label in ax.get_xticklabels() if label.get_text()]


@pytest.mark.parametrize("num_layers", [28, 36, 48])
def test_plots_of_every_layer_of_a_deep_model_have_few_ticks_apart_and_the_legend_below(num_layers, tmp_path):
    metrics = every_layer_metrics(num_layers)
    heatmap = probe_plots.heatmap_figure(metrics, "deep: split grouped")
    by_layer = probe_plots.by_layer_figure(metrics, "deep: split grouped")
    for fig in (heatmap, by_layer):
        panels = [ax for ax in fig.axes if ax.get_xticklabels()]
        for ax in [ax for ax in fig.axes if ax.images or ax.lines]:
            boxes = tick_boxes(ax)
            assert 5 <= len(boxes) <= 25, len(boxes)  # a label every few layers, not 48 crammed ones
            assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), "tick labels touch"
        assert panels
    assert heatmap.get_size_inches()[0] <= 14  # a page wide, not a banner
    panel = by_layer.axes[0]
    renderer = by_layer.canvas.get_renderer()
    legend = by_layer.legends[0].get_window_extent(renderer)
    assert legend.y1 <= min(ax.get_tightbbox(renderer).y0 for ax in by_layer.axes) + 1  # below the panels
    names = [text.get_text() for text in by_layer.legends[0].get_texts()]
    assert {"VT", "VT_paper", "QT", "MM"} <= set(names)
    # pixels per layer (at 100 dpi): the 3-point markers a few of their widths apart, not a smear
    assert panel.get_window_extent(renderer).width / num_layers >= 14
    probe_plots.plot_heatmap(metrics, tmp_path / "heatmap.png")
    probe_plots.plot_by_layer(metrics, tmp_path / "by_layer.png")
    assert (tmp_path / "heatmap.png").stat().st_size and (tmp_path / "by_layer.png").stat().st_size


def test_probe_plots_are_titled_with_the_models_folder_not_its_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    write_synthetic_embeddings(folder / "embeddings.h5", checkpoint="/ckpts/qwen2.5-vl-7b-instruct")
    label_embeddings(folder / "embeddings.h5", folder / "labels.csv", "yesno")
    titles = []
    for name in ("heatmap_figure", "by_layer_figure"):
        real = getattr(probe_plots, name)
        monkeypatch.setattr(
            probe_plots, name, lambda metrics, title, real=real: titles.append(title) or real(metrics, title)
        )
    settings = probe_settings.ProbeSettings(probes=["logreg"], bootstrap=0, shuffled_control=False)
    probe_stats.run_probes(folder / "embeddings.h5", folder / "labels.csv", folder / "probes", settings)
    assert len(titles) == 2
    assert all(t.startswith("my-model:") and "ckpts" not in t for t in titles), titles


def test_norms_vision_only_panel_has_no_x_axis_and_layers_are_integers(tmp_path):
    write_synthetic_embeddings(tmp_path / "m" / "embeddings.h5")
    by_representation = norms_by_representation(read_embeddings(tmp_path / "m" / "embeddings.h5"))
    assert by_representation["vision_only_representation"][0][0] is None
    fig = norms_figure(by_representation, "m: vector norms")
    vision, *layered = fig.axes
    assert vision.get_title().startswith("vision only")
    assert list(vision.get_xticks()) == [] and "no layer" in vision.get_xlabel()
    for ax in layered:
        labels = tick_texts(ax)
        assert labels and all(is_integer_text(t) for t in labels), labels
        assert ax.get_xlabel() == "decoder layer"
    assert fig.get_suptitle().startswith("m:")


# ---------------------------------------------------------------------------------------------
# Published numbers


def published_families() -> pd.DataFrame:
    published = probe_summary.published_auroc()
    return published[published["auroc"].notna()].drop_duplicates("family")


# the hub checkpoint of each family's paper model, as config/all-seed-models.yaml names them
HUB_IDS = {
    "gemma3": "google/gemma-3-12b-it",
    "molmo": "allenai/Molmo-7B-O-0924",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "phi4_multimodal": "microsoft/Phi-4-multimodal-instruct",
}


def test_every_published_family_has_a_known_hub_id():
    assert set(published_families()["family"]) == set(HUB_IDS)


def write_metrics(folder, family: str, checkpoint: str, label_method: str = "halp_paper"):
    """metrics.csv and metrics.json as `probe` writes them, for a model of `family` on labels by `label_method`."""
    folder.mkdir(parents=True)
    aurocs = {("VF", None, "mlp"): 0.6, ("QT", 1, "mlp"): 0.8, ("QT", 2, "mlp"): 0.7}
    metrics_table(aurocs, checkpoint, label_method).to_csv(folder / "metrics.csv", index=False)
    document = {"model": checkpoint, "family": family, "label_method": label_method}
    (folder / "metrics.json").write_text(json.dumps(document))
    return folder / "metrics.csv"


@pytest.mark.parametrize("checkpoint", ["hub", "tiny"])
def test_every_family_in_the_published_table_gets_its_number(tmp_path, checkpoint):
    """Config names are the user's own ('model_a'); the family recorded in the embeddings decides."""
    metrics = {}
    for i, family in enumerate(published_families()["family"]):
        ref = HUB_IDS[family] if checkpoint == "hub" else f"resources/checkpoints/tiny-{family}"
        metrics[f"model_{i}"] = write_metrics(tmp_path / f"model_{i}" / "probes", family, ref)
    summary = probe_summary.summarise_models(metrics, tmp_path / "s.csv", tmp_path / "s.png")
    ours = summary[(summary["source"] == "ours") & (summary["representation"] == "QT")].set_index("family")
    for row in published_families().itertuples():
        assert ours.loc[row.family, "paper_model"] == row.model
        assert ours.loc[row.family, "published_auroc"] == row.auroc
        assert math.isclose(ours.loc[row.family, "difference"], 0.8 - row.auroc)
    # every paper model has one of ours beside it: no group of the plot is the paper's alone
    assert all(model for model, _ in probe_summary.summary_groups(summary))


@pytest.mark.parametrize(
    "family, checkpoint, expected",
    [
        ("molmo", "allenai/MolmoE-1B-0924", None),  # same family, another size: another model
        ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", None),
        ("qwen2_5_vl", "/scratch/7b-models/qwen", "Qwen2.5-VL-7B"),  # only the checkpoint's own name counts
        ("gemma3", "google/gemma-3-12b-it", "Gemma-3-12B"),
        ("phi4_multimodal", "microsoft/Phi-4-multimodal-instruct", "Phi-4"),
        ("", "Qwen/Qwen2.5-VL-7B-Instruct", None),  # no family recorded: no comparison
    ],
)
def test_published_model_for(family, checkpoint, expected):
    assert probe_summary.published_model_for(family, checkpoint, probe_summary.published_auroc()) == expected


def test_summary_plot_groups_and_legend(tmp_path):
    metrics = {
        "tiny-qwen": write_metrics(tmp_path / "a" / "probes", "qwen2_5_vl", "resources/checkpoints/tiny-qwen2_5_vl"),
        "molmoe": write_metrics(tmp_path / "b" / "probes", "molmo", "allenai/MolmoE-1B-0924"),
        # the paper's model, on labels of another rule: not set beside the paper's number
        "gemma": write_metrics(tmp_path / "c" / "probes", "gemma3", "google/gemma-3-12b-it", "halp_lenient"),
    }
    summary = probe_summary.summarise_models(metrics, tmp_path / "s.csv", tmp_path / "s.png")
    groups = probe_summary.summary_groups(summary)
    assert groups[:3] == [("tiny-qwen", "Qwen2.5-VL-7B"), ("molmoe", ""), ("gemma", "")]
    assert {paper for model, paper in groups if not model} == {"Gemma-3-12B", "Molmo-7B", "Phi-4"}
    fig = probe_summary.summary_figure(summary, "HALP, EACL 2026")
    labels = tick_texts(fig.axes[-1])
    assert labels[0] == "tiny-qwen\nvs Qwen2.5-VL-7B" and labels[1] == "molmoe\nlabels: halp_paper"
    assert labels[2] == "gemma\nlabels: halp_lenient"
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)  # one legend, outside the bars


# ---------------------------------------------------------------------------------------------
# Table pages


def test_tables_are_written_as_pages_too(tmp_path):
    metrics = {"tiny-qwen": write_metrics(tmp_path / "a" / "probes", "qwen2_5_vl", "org/ckpt")}
    probe_summary.summarise_models(metrics, tmp_path / "summary" / "probes.csv", tmp_path / "summary" / "probes.png")
    page = (tmp_path / "summary" / "probes.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and '<table class="data">' in page
    assert "tiny-qwen" in page and "Qwen2.5-VL-7B" in page and "0.915" in page
    assert "<td>nan</td>" not in page.lower()  # unknown values are empty cells
    header = page[page.index("<tr>") : page.index("</tr>")]
    assert header.index("<th>model</th>") < header.index("<th>auroc</th>") < header.index("<th>model_id</th>")


def test_probe_run_writes_its_metrics_page_and_the_subsets_of_each_best_layer(tmp_path):
    folder = tmp_path / "m"
    write_synthetic_embeddings(folder / "embeddings.h5")
    label_embeddings(folder / "embeddings.h5", folder / "labels.csv", "yesno")
    settings = probe_settings.ProbeSettings(probes=["logreg"], bootstrap=0, shuffled_control=False)
    metrics = probe_stats.run_probes(folder / "embeddings.h5", folder / "labels.csv", folder / "probes", settings)
    page = (folder / "probes" / "metrics.html").read_text()
    assert page.count("<tr>") == len(metrics) + 1
    assert f"{metrics['auroc'].dropna().iloc[0]:.3f}" in page
    assert "(method yesno)" in page
    # the subsets page: the best layer of each representation (every layer: subsets.csv)
    every_layer = pd.read_csv(folder / "probes" / "subsets.csv")
    assert len(every_layer) == len(metrics) + 1  # one answer type (yes/no), every layer and the baseline
    best = probe_summary.best_rows(metrics)
    page = (folder / "probes" / "subsets.html").read_text()
    rows = [row.split("</td>")[0].removeprefix("<td>") for row in page.split("<tr>")[2:]]  # first cells
    assert rows == [probe_stats.BASELINE_REPRESENTATION, *best["representation"]] == ["question", "VF", "VT", "QT"]
    for row in best.itertuples():
        if pd.notna(row.layer):
            assert f'{row.representation}</td><td class="n">{row.layer}</td>' in page


# ---------------------------------------------------------------------------------------------
# The inspection page


def write_synthetic_embeddings(path, n=40, checkpoint="org/Checkpoint-7B", family="qwen2_5_vl"):
    """n questions, two per image, answered yes or no at random, plus one failed sample."""
    rng = np.random.default_rng(1)
    dims = {"vision_only_representation": 4}
    dims.update(
        {f"{r}/layer_{k}": 6 for r in ("vision_token_representation", "query_token_representation") for k in LAYERS}
    )
    results = []
    for i in range(n):
        vectors = {key: rng.normal(size=d).astype(np.float32) for key, d in dims.items()}
        answer = "Yes." if rng.random() < 0.6 else "No."
        results.append(
            SampleResult(f"q{i:03d}", f"img{i // 2}", f"Is object {i} red?", "yes", answer=answer, vectors=vectors)
        )
    results.append(SampleResult.failed(f"q{n:03d}", "imgX", "Is it blue?", "no", "image truncated"))
    attrs = {"model": checkpoint, "family": family, "layers": list(LAYERS)}
    write_embeddings(path, results, dims, attrs)


@pytest.fixture
def inspected(tmp_path):
    """Inspection page of a model whose dataset lost one row in (lenient) validation."""
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    csv = tmp_path / "vqa.csv"
    csv.write_text("question_id,image_id,question,answer\nq1,a.png,Is it red?,yes\nq2,missing.png,Is it blue?,no\n")
    validate_and_write(
        csv, images, tmp_path / "questions.csv", tmp_path / "validation.json", tmp_path / "v.md", strict=False
    )
    model = tmp_path / "results" / "tiny-model"
    write_synthetic_embeddings(model / "embeddings.h5")
    label_embeddings(model / "embeddings.h5", model / "labels.csv", "yesno")
    out = model / "inspection"
    write_inspection_report(
        model / "embeddings.h5", out / "summary.html", out / "norms.png", out / "summary.json",
        validation_json=tmp_path / "validation.json", labels_csv=model / "labels.csv",
        labels_summary_json=model / "labels.summary.json",
    )  # fmt: skip
    return tmp_path, model, (out / "summary.html").read_text()


def test_inspection_page_shows_the_validation_summary(inspected):
    root, _, page = inspected
    report = json.loads((root / "validation.json").read_text())
    assert report["counts"]["rows_kept"] == 1 and report["counts"]["rows_dropped"] == 1
    assert '<td>rows kept</td><td class="n">1</td>' in page
    assert '<td>rows dropped</td><td class="n">1</td>' in page
    assert 'class="warn">ok, 1 row(s) with errors dropped' in page
    problem = report["problems"][0]
    assert problem["kind"] in page and problem["message"].split("'")[0] in page


def test_inspection_page_shows_the_label_summary_and_example_answers(inspected):
    _, model, page = inspected
    summary = json.loads((model / "labels.summary.json").read_text())
    labels = pd.read_csv(model / "labels.csv", dtype=str, keep_default_na=False)
    assert f'<td>hallucinated</td><td class="n">{summary["n_hallucinated"]}</td>' in page
    assert f'<td>unjudged</td><td class="n">{summary["n_unjudged"]}</td>' in page
    for rule, count in summary["decided_by"].items():
        assert f'<td>{rule}</td><td class="n">{count}</td>' in page
    first_hallucinated = labels[labels["hallucinated"] == "true"].iloc[0]
    assert f"Is object {int(first_hallucinated['question_id'][1:])} red?" in page
    assert "<h1>tiny-model</h1>" in page  # the model's folder name, not its checkpoint


def test_example_answers_take_a_few_of_each_label():
    table = pd.DataFrame(
        {
            "question_id": [f"q{i}" for i in range(9)], "question": "Q?", "ground_truth_answer": "yes",
            "answer": "A", "status": ["ok"] * 8 + ["failed"],
        }
    )  # fmt: skip
    labels = pd.DataFrame(
        {
            "question_id": table["question_id"],
            "hallucinated": ["true"] * 5 + ["false"] * 2 + [""] * 2,
            "decided_by": "x",
        }
    )
    examples = example_answers(table, labels, per_class=2)
    assert list(examples["question_id"]) == ["q0", "q1", "q5", "q6", "q7"]  # the failed q8 gave no answer
    assert list(examples["label"]) == ["hallucinated"] * 2 + ["not hallucinated"] * 2 + ["unjudged"]
