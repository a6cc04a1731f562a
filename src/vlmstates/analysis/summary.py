"""Probe results across models, each model's best layer beside the HALP paper's published AUROCs."""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from vlmstates.analysis.labels import HALP_PAPER
from vlmstates.analysis.probes.plots import REPRESENTATION_COLOURS, pyplot, save_png, write_table_html
from vlmstates.analysis.probes.settings import CODE_ORDER, PROBE_OUTPUTS, PROBES, UNKNOWN_LABEL_METHOD
from vlmstates.atomic import write_atomic

# the summary page's first columns (the CSV keeps its own order)
SUMMARY_PAGE_COLUMNS = (
    "source", "model", "representation", "probe", "layer", "label_method", "pos_rate", "auroc", "auroc_ci_low",
    "auroc_ci_high", "auroc_within_answer_type", "baseline_auroc", "baseline_auroc_within_answer_type",
    "control_auroc", "published_auroc", "paper_model", "difference", "n_test",
)  # fmt: skip
#: The label method whose labels are the paper's (the HALP code's semantic_review): only probes on these
#: labels learn the paper's task, so only they are set beside its published AUROCs.
PAPER_LABEL_METHOD = HALP_PAPER


def published_auroc(path=None) -> pd.DataFrame:
    """The HALP paper's published AUROCs shipped with the package (empty auroc = not available)."""
    if path is not None:
        table = pd.read_csv(path, comment="#", dtype={"family": str})
    else:
        packaged = resources.files("vlmstates").joinpath("data/halp_published_auroc.csv")
        with resources.as_file(packaged) as real:
            table = pd.read_csv(real, comment="#", dtype={"family": str})
    table["auroc"] = pd.to_numeric(table["auroc"], errors="coerce")
    return table


#: Our representation -> the paper's column it reproduces. The paper's VT was measured at its code's
#: position, which VT_paper records, so both sit against the published VT: VT_paper's difference is
#: the reproduction, VT's what the exact position changes.
PUBLISHED_AS = {"VT_paper": "VT"}


def published_code(code: str) -> str:
    return PUBLISHED_AS.get(code, code)


# a parameter count in a model name: the 7b of Qwen2.5-VL-7B-Instruct, the 12b of gemma-3-12b-it (not 2.5, not 8bit)
_SIZE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)b(?![a-z0-9])")


def model_size(name) -> str | None:
    """The size a model's name states ('7b'), or None; only the last path part counts (a hub id's name)."""
    found = _SIZE.search(str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower())
    return found.group(0) if found else None


def published_model_for(family: str | None, checkpoint: str, published: pd.DataFrame) -> str | None:
    """The paper's model that a probed model is compared with, or None.

    The adapter family recorded in the embeddings decides (config names are the user's own and
    checkpoint folders can be called anything); a checkpoint id that names a size other than the paper
    model's is another model of the family (MolmoE-1B beside Molmo-7B) and is not compared.
    """
    if not family:
        return None
    size = model_size(checkpoint)
    for model, row_family in dict.fromkeys(zip(published["model"], published["family"])):
        if row_family == family and (size is None or model_size(model) in (None, size)):
            return model
    return None


def _run_document(metrics_csv) -> dict:
    """metrics.json, which `probe` writes beside a metrics.csv ({} if absent)."""
    document = Path(metrics_csv).with_name(PROBE_OUTPUTS.metrics_json)
    return json.loads(document.read_text()) if document.exists() else {}


def recorded_label_method(metrics: pd.DataFrame, document: dict) -> str:
    """The label method a run recorded (its metrics table, else its metrics.json; older runs: neither)."""
    if "label_method" in metrics.columns and metrics["label_method"].notna().any():
        return str(metrics["label_method"].dropna().iloc[0])
    return str(document.get("label_method") or UNKNOWN_LABEL_METHOD)


def comparison_note(label_method: str, paper_model: str | None) -> str:
    """Why a row has (or lacks) the paper's number beside it."""
    if not paper_model:
        return "no paper model of this family and size"
    if label_method != PAPER_LABEL_METHOD:
        return f"not compared: labels by {label_method}, not the paper's rule ({PAPER_LABEL_METHOD})"
    return f"like for like: labels by the paper's rule ({PAPER_LABEL_METHOD})"


def best_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per representation and probe, the layer with the best validation AUROC (test AUROC where there is no
    validation), in CODE_ORDER (VT_paper beside VT)."""
    chosen = []
    for (_, _), rows in metrics.groupby(["representation", "probe"], sort=False):
        rows = rows[np.isfinite(rows["auroc"].astype(float))]
        if rows.empty:
            continue
        by_val = np.isfinite(rows["val_auroc"].astype(float)).any()
        criterion = rows["val_auroc" if by_val else "auroc"].astype(float).fillna(-np.inf)
        row = rows.loc[criterion.idxmax()].copy()
        row["layer_selected_by"] = "validation AUROC" if by_val else "test AUROC (no validation split: optimistic)"
        chosen.append(row)
    order = {code: i for i, code in enumerate(CODE_ORDER)}
    return pd.DataFrame(sorted(chosen, key=lambda row: order.get(row["representation"], len(order))))


def summarise_models(metrics_csvs: dict, out_csv, out_png, published_csv=None) -> pd.DataFrame:
    """One row per model x representation x probe (best layer), with the paper's number beside ours;
    writes `out_csv`, its page (`summary_html_path`) and the plot `out_png`."""
    published = published_auroc(published_csv)
    citation = published["citation"].iloc[0] if len(published) else ""
    rows = []
    for name, path in metrics_csvs.items():
        metrics = pd.read_csv(path, dtype={"selected": str, "reason": str, "model": str, "label_method": str})
        document = _run_document(path)
        model_id = str(metrics["model"].dropna().iloc[0]) if metrics["model"].notna().any() else ""
        family = document.get("family") or None
        label_method = recorded_label_method(metrics, document)
        paper_model = published_model_for(family, model_id, published)
        compared = bool(paper_model) and label_method == PAPER_LABEL_METHOD
        for _, row in best_rows(metrics).iterrows():
            reference = published[
                (published["model"] == paper_model)
                & (published["representation"] == published_code(row["representation"]))
                & published["auroc"].notna()
            ]
            value = float(reference["auroc"].iloc[0]) if len(reference) and compared else math.nan
            rows.append(
                {
                    "source": "ours",
                    "model": name,
                    "model_id": model_id,
                    "family": family or "",
                    "representation": row["representation"],
                    "probe": row["probe"],
                    "layer": row["layer"],
                    "layer_selected_by": row["layer_selected_by"],
                    "split": row["split"],
                    "label_method": label_method,
                    "pos_rate": row.get("pos_rate", math.nan),
                    "n_test": row["n_test"],
                    "auroc": row["auroc"],
                    "auroc_ci_low": row["auroc_ci_low"],
                    "auroc_ci_high": row["auroc_ci_high"],
                    "auroc_within_answer_type": row.get("auroc_within_answer_type", math.nan),
                    "baseline_auroc": row.get("baseline_auroc", math.nan),
                    "baseline_auroc_within_answer_type": row.get("baseline_auroc_within_answer_type", math.nan),
                    "control_auroc": row["control_auroc"],
                    "paper_model": paper_model or "",
                    "comparison": comparison_note(label_method, paper_model),
                    "published_auroc": value,
                    "published_probe": reference["probe"].iloc[0] if len(reference) and compared else "",
                    "difference": row["auroc"] - value if np.isfinite(value) else math.nan,
                    "citation": reference["citation"].iloc[0] if len(reference) and compared else "",
                }
            )
    for record in published.itertuples(index=False):
        rows.append(
            {
                "source": "published",
                "model": record.model,
                "family": record.family,
                "representation": record.representation,
                "probe": record.probe,
                "split": record.protocol,
                "auroc": record.auroc,
                "paper_model": record.model,
                "published_auroc": record.auroc,
                "published_probe": record.probe,
                "citation": record.citation,
            }
        )
    columns = [
        "source", "model", "model_id", "family", "representation", "probe", "layer", "layer_selected_by", "split",
        "label_method", "pos_rate", "n_test", "auroc", "auroc_ci_low", "auroc_ci_high", "auroc_within_answer_type",
        "baseline_auroc", "baseline_auroc_within_answer_type", "control_auroc", "paper_model", "comparison",
        "published_auroc", "published_probe", "difference", "citation",
    ]  # fmt: skip
    summary = pd.DataFrame(rows, columns=columns)
    for column in ("layer", "n_test"):
        summary[column] = pd.to_numeric(summary[column], errors="coerce").astype("Int64")
    write_atomic(Path(out_csv), lambda p: summary.to_csv(p, index=False))
    write_atomic(summary_html_path(out_csv), lambda p: write_summary_page(summary, p, citation))
    write_atomic(Path(out_png), lambda p: plot_summary(summary, p, citation))
    return summary


def write_summary_page(summary: pd.DataFrame, path, citation: str = "") -> None:
    """The summary as a page; without a model on the paper's labels, our rows stand without the paper's
    numbers and differences beside them (the published rows still list the paper's own)."""
    ours = summary[summary["source"] == "ours"]
    compared = ours["published_auroc"].notna().any()
    shown = summary if compared else summary.drop(columns=["difference"])
    note = (
        f"best layer per model, representation and probe; the paper's AUROC ({citation or 'published'}) beside "
        f"ours only where our labels come from the paper's rule ({PAPER_LABEL_METHOD}); label methods here: "
        f"{', '.join(dict.fromkeys(ours['label_method'].astype(str))) or 'none'}"
    )
    write_table_html(shown, path, "Probes across models", note, SUMMARY_PAGE_COLUMNS)


def summary_html_path(out_csv) -> Path:
    """The page of the summary table: probes.csv -> probes.html, beside it."""
    return Path(out_csv).with_suffix(".html")


def plot_summary(summary: pd.DataFrame, path, citation: str = "") -> None:
    save_png(summary_figure(summary, citation), path)


def summary_groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The plot's groups as (our model or '', paper model or ''): our models in order, each with the paper's
    model it is compared with (labels by the paper's rule only), then the paper's models none of ours is set
    beside."""
    ours = summary[summary["source"] == "ours"]
    compared = ours["label_method"] == PAPER_LABEL_METHOD
    paper_for = {model: paper or "" for model, paper in zip(ours["model"], ours["paper_model"].where(compared, ""))}
    published = summary[(summary["source"] == "published") & summary["auroc"].notna()]
    alone = [m for m in dict.fromkeys(published["model"]) if m not in set(paper_for.values())]
    return list(paper_for.items()) + [("", model) for model in alone]


def _group_label(model: str, paper_model: str, label_method: str) -> str:
    if not model:
        return f"{paper_model}\n(paper only)"
    return f"{model}\nvs {paper_model}" if paper_model else f"{model}\nlabels: {label_method}"


def _our_bar(ax, x: float, width: float, row: pd.Series, colour: str) -> None:
    value, low, high = (float(row[k]) for k in ("auroc", "auroc_ci_low", "auroc_ci_high"))
    error = [[max(value - low, 0)], [max(high - value, 0)]] if np.isfinite(low) and np.isfinite(high) else None
    ax.bar(x, value, width=width * 0.9, color=colour, yerr=error, capsize=2, error_kw={"lw": 0.8})
    # the number sits on the bar it belongs to, on white so that the error bar through it leaves it legible
    box = {"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85}
    ax.text(x, value + 0.02, f"{value:.2f}", ha="center", va="bottom", fontsize=7, rotation=90, bbox=box)


def _published_mark(ax, x: float, width: float, value: float) -> None:
    ax.hlines(value, x - width / 2, x + width / 2, colors="black", lw=2.5)
    ax.text(x + width / 2, value, f" {value:.3f}", ha="left", va="center", fontsize=7)


def summary_figure(summary: pd.DataFrame, citation: str = ""):
    """Bars: our best-layer AUROC per model and representation (error bars: bootstrap CI), one panel per
    probe; a black line on a bar's slot: the paper's published AUROC of the matched model."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    ours = summary[summary["source"] == "ours"]
    published = summary[(summary["source"] == "published") & summary["auroc"].notna()]
    probes = [p for p in PROBES if p in set(ours["probe"])] or ["mlp"]
    groups = summary_groups(summary)
    codes = [c for c in CODE_ORDER if c in set(ours["representation"]) | set(published["representation"])]
    width = 0.8 / max(len(codes), 1)
    fig, axes = plt.subplots(
        len(probes), 1, figsize=(max(7.0, 1.5 * len(groups) + 2.5), 1.0 + 3.0 * len(probes)),
        squeeze=False, sharex=True, layout="constrained",
    )  # fmt: skip
    for ax, probe in zip(axes[:, 0], probes):
        for i, (model, paper_model) in enumerate(groups):
            for j, code in enumerate(codes):
                x = i + (j - (len(codes) - 1) / 2) * width
                row = ours[(ours["model"] == model) & (ours["probe"] == probe) & (ours["representation"] == code)]
                if len(row) and np.isfinite(float(row["auroc"].iloc[0])):
                    _our_bar(ax, x, width, row.iloc[0], REPRESENTATION_COLOURS[code])
                ref = published[
                    (published["model"] == paper_model) & (published["representation"] == published_code(code))
                ]
                if len(ref):
                    _published_mark(ax, x, width, float(ref["auroc"].iloc[0]))
        ax.axhline(0.5, color="black", lw=0.8, ls="--")
        ax.set_ylim(0.0, 1.12)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel(f"{probe}: test AUROC", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    method_of = dict(zip(ours["model"], ours["label_method"].astype(str)))
    labels = [_group_label(model, paper, method_of.get(model, "")) for model, paper in groups]
    axes[-1, 0].set_xticks(range(len(groups)), labels, fontsize=8)
    axes[-1, 0].set_xlim(-0.6, len(groups) - 0.4)
    handles = [Patch(color=REPRESENTATION_COLOURS[c], label=f"{c} (ours, best layer)") for c in codes]
    handles += [
        Line2D([], [], color="black", lw=2.5, label=f"published (HALP paper, MLP; beside {PAPER_LABEL_METHOD} labels)")
    ]
    handles += [Line2D([], [], color="black", lw=0.8, ls="--", label="chance")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle(f"Hallucination probes across models, beside {citation or 'the published numbers'}", fontsize=10)
    return fig
