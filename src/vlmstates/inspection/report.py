"""Inspection of an embeddings file: a printed summary, and the per-model report of the workflow.

Reads both layouts: our columnar file (store.py) and the seed scripts' per-question parts (seed_layout.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from vlmstates.analysis.labels import read_labels
from vlmstates.atomic import atomic_path, write_text_atomic
from vlmstates.errors import VlmstatesError
from vlmstates.inspection.pages import esc, page, table
from vlmstates.inspection.seed_layout import is_seed_layout, read_seed_layout
from vlmstates.store import MODEL_ATTR, SEMANTICS_ATTR, STATUS_FAILED, STATUS_OK, Embeddings, parse_key, read_embeddings


class UnreadableFile(VlmstatesError, ValueError):
    """The path is neither an embeddings file nor seed-layout parts; the message names it."""


def open_embeddings(path: str | Path) -> Embeddings:
    """A columnar embeddings file, or seed-layout parts (one part file or a folder of them)."""
    if not Path(path).exists():
        raise UnreadableFile(f"{path}: no such file or folder")
    if is_seed_layout(path):
        return read_seed_layout(path)
    try:
        return read_embeddings(path)
    except (OSError, ValueError) as error:
        raise UnreadableFile(f"{path}: not an embeddings file or seed-layout part ({error})") from error


def summarise(emb: Embeddings) -> dict:
    table = emb.table
    ok = (table["status"] == STATUS_OK).to_numpy()
    failed = table[table["status"] == STATUS_FAILED]
    vectors = {}
    for key in emb.representation_keys():
        data = emb.load(key)[ok]
        finite = np.isfinite(data)
        norms = np.linalg.norm(np.where(finite, data, 0.0), axis=1) if len(data) else np.zeros(0)
        vectors[key] = {
            "dim": emb.vector_dims[key],
            "nan": int(np.isnan(data).sum()),
            "inf": int(np.isinf(data).sum()),
            "norm_median": float(np.median(norms)) if len(norms) else None,
            "norm_p05": float(np.percentile(norms, 5)) if len(norms) else None,
            "norm_p95": float(np.percentile(norms, 95)) if len(norms) else None,
        }
    return {
        "file": str(emb.path),
        "samples": int(len(table)),
        "ok": int(ok.sum()),
        "failed": int(len(failed)),
        "failures": failed[["question_id", "error"]].head(50).to_dict("records"),
        "attributes": {k: v for k, v in emb.attrs.items() if k != SEMANTICS_ATTR},
        "prompt_tokens": _stats(table["num_prompt_tokens"].to_numpy()[ok]),
        "image_tokens": _stats(table["num_image_tokens"].to_numpy()[ok]),
        "vectors": vectors,
    }


def _stats(values: np.ndarray) -> dict:
    values = values[values >= 0]  # -1: not recorded (the seed layout has no positions or token counts)
    if not len(values):
        return {}
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def describe(path: str | Path) -> str:
    """Structure and summary as text (the seed scripts' inspect_h5.py)."""
    summary = summarise(open_embeddings(path))
    lines = [f"{summary['file']}: {summary['samples']} samples, {summary['ok']} ok, {summary['failed']} failed"]
    lines.append("attributes:")
    lines += [f"  {k}: {v}" for k, v in summary["attributes"].items()]
    lines.append(
        f"prompt tokens: {summary['prompt_tokens'] or 'not recorded'}; "
        f"image tokens: {summary['image_tokens'] or 'not recorded'}"
    )
    lines.append("vectors (over ok samples):")
    for key, v in summary["vectors"].items():
        lines.append(f"  {key:45s} dim {v['dim']:6d}  nan {v['nan']}  inf {v['inf']}  median norm {v['norm_median']}")
    for failure in summary["failures"][:10]:
        lines.append(f"failed {failure['question_id']}: {failure['error']}")
    return "\n".join(lines)


def write_inspection_report(
    embeddings_path,
    summary_html,
    norms_png,
    summary_json,
    *,
    name: str | None = None,
    validation_json=None,
    labels_csv=None,
    labels_summary_json=None,
) -> None:
    """The workflow's inspection page of one model: the file's summary, and beside it, when given, the
    dataset validation report, the label summary and example answers with their labels."""
    emb = open_embeddings(embeddings_path)
    name = name or model_key_of(emb)
    summary = summarise(emb)
    summary["name"] = name
    validation = _read_json(validation_json)
    label_summary = _read_json(labels_summary_json)
    labels = _read_labels(labels_csv)
    examples = example_answers(emb.table, labels)
    write_text_atomic(summary_json, json.dumps(summary, indent=2, default=str))
    write_text_atomic(summary_html, render_html(name, summary, validation, label_summary, examples))
    _plot_norms(emb, norms_png, name)


def model_key_of(emb: Embeddings) -> str:
    """The model key (the workflow's `models` key, not the checkpoint) read off the file's folder,
    results/<key>/embeddings.h5 (a seed-layout folder of parts is itself the model's folder's child,
    seed_layout/)."""
    path = Path(emb.path)
    folder = path.parent if path.suffix else path
    return (folder.parent if folder.name == "seed_layout" else folder).name or str(path)


def _read_json(path) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def _read_labels(path) -> pd.DataFrame | None:
    return read_labels(path) if path else None


EXAMPLES_PER_CLASS = 3
_LABEL_CLASSES = (("true", "hallucinated"), ("false", "not hallucinated"), ("", "unjudged"))


def example_answers(embeddings_table: pd.DataFrame, labels: pd.DataFrame | None, per_class: int = EXAMPLES_PER_CLASS):
    """A few answers of each label class (hallucinated, not, unjudged), first ones in dataset order, so that
    a reader sees what each label means for this model; without labels, the first answers."""
    answered = embeddings_table[embeddings_table["status"] == STATUS_OK][
        ["question_id", "question", "ground_truth_answer", "answer"]
    ]
    if labels is None:
        return answered.head(per_class * 2).assign(label="(no labels)", decided_by="")
    verdicts = labels[["question_id", "hallucinated", "decided_by"]]
    joined = answered.merge(verdicts, on="question_id", how="left").fillna({"hallucinated": "", "decided_by": ""})
    picked = [
        joined[joined["hallucinated"] == value].head(per_class).assign(label=label) for value, label in _LABEL_CLASSES
    ]
    return pd.concat(picked).drop(columns="hallucinated")


# ---------------------------------------------------------------------------------------------
# The page


def render_html(name, summary, validation=None, label_summary=None, examples=None) -> str:
    sections = [
        _section_embeddings(summary),
        _section_validation(validation),
        _section_labels(label_summary),
        _section_examples(examples),
        _section_details(summary),
    ]
    head = (
        f"<h1>{esc(name)}</h1>\n"
        f'<p class="note">checkpoint {esc(summary["attributes"].get(MODEL_ATTR, "?"))}, '
        f"family {esc(summary['attributes'].get('family', '?'))}; file {esc(summary['file'])}</p>\n"
    )
    return page(f"{name}: inspection", head + "\n".join(s for s in sections if s))


def _section_embeddings(summary: dict) -> str:
    state = "good" if not summary["failed"] else "bad"
    tokens = [
        (kind, s.get("min", ""), s.get("median", ""), s.get("max", ""))
        for kind, s in (("prompt", summary["prompt_tokens"]), ("image", summary["image_tokens"]))
        if s
    ]
    vectors = [
        (key, v["dim"], v["nan"], v["inf"], v["norm_median"], v["norm_p05"], v["norm_p95"])
        for key, v in summary["vectors"].items()
    ]
    return (
        f'<h2>Embeddings</h2><p><span class="{state}">{summary["samples"]} samples: {summary["ok"]} ok, '
        f"{summary['failed']} failed</span>.</p>"
        + (
            table(["tokens", "min", "median", "max"], tokens, digits=1)
            if tokens
            else "<p>Token counts not recorded.</p>"
        )
        + "<p>Vectors over the successful samples:</p>"
        + table(["dataset", "dim", "NaN", "Inf", "median norm", "5th pct", "95th pct"], vectors)
        + (
            "<p>Failures (first 50):</p>"
            + table(["question_id", "error"], [(f["question_id"], f["error"]) for f in summary["failures"]])
            if summary["failures"]
            else ""
        )
    )


VALIDATION_PROBLEMS_SHOWN = 20


def _section_validation(report: dict | None) -> str:
    if report is None:
        return ""
    counts = report.get("counts", {})
    status, state = _validation_status(report)
    mode = "strict" if report.get("settings", {}).get("strict") else "lenient"
    rows = [(key.replace("_", " "), value) for key, value in counts.items()]
    problems = report.get("problems", [])
    shown = [
        (p.get("severity"), p.get("row"), p.get("question_id"), p.get("column"), p.get("kind"), p.get("message"))
        for p in problems[:VALIDATION_PROBLEMS_SHOWN]
    ]
    by_kind = list(report.get("problem_counts_by_kind", {}).items())
    return (
        f"<h2>Dataset validation</h2><p>{esc(report.get('csv_path'))}, images {esc(report.get('images_dir'))}: "
        f'<span class="{state}">{esc(status)}</span> ({mode} mode).</p>'
        + table(["count", "value"], rows)
        + (table(["problem kind", "count"], by_kind) if by_kind else "<p>No problems found.</p>")
        + (
            f"<p>Problems (first {min(len(problems), VALIDATION_PROBLEMS_SHOWN)} of {len(problems)}):</p>"
            + table(["severity", "data row", "question_id", "column", "kind", "message"], shown)
            if problems
            else ""
        )
    )


def _validation_status(report: dict) -> tuple[str, str]:
    """The validation's outcome in words and its style; rows dropped in lenient mode are worth a warning."""
    dropped = report.get("counts", {}).get("rows_dropped", 0)
    if report.get("fatal"):
        return "failed: the dataset could not be read", "bad"
    if not report.get("ok"):
        return "failed", "bad"
    if dropped:
        return f"ok, {dropped} row(s) with errors dropped", "warn"
    return "ok", "good"


def _section_labels(summary: dict | None) -> str:
    if summary is None:
        return ""
    rate = summary.get("positive_rate")
    counts = [
        ("questions", summary.get("n_total")),
        ("judged", summary.get("n_judged")),
        ("hallucinated", summary.get("n_hallucinated")),
        ("not hallucinated", summary.get("n_not_hallucinated")),
        ("unjudged", summary.get("n_unjudged")),
        ("hallucinated share of judged", "" if rate is None else f"{rate:.1%}"),
    ]
    rules = [("judged", rule, n) for rule, n in summary.get("decided_by", {}).items()]
    rules += [("unjudged", reason, n) for reason, n in summary.get("unjudged_by_reason", {}).items()]
    source = f", labels file {esc(summary['labels_file'])}" if summary.get("labels_file") else ""
    return (
        f"<h2>Labels</h2><p>Method <b>{esc(summary.get('method'))}</b>{source}.</p>"
        + table(["count", "value"], counts)
        + table(["", "decided by", "questions"], rules)
    )


def _section_examples(examples: pd.DataFrame | None) -> str:
    if examples is None or examples.empty:
        return ""
    rows = examples[["label", "question_id", "question", "ground_truth_answer", "answer", "decided_by"]]
    return "<h2>Example answers</h2>" + table(
        ["label", "question_id", "question", "ground truth", "model answer", "decided by"],
        rows.itertuples(index=False),
    )


def _section_details(summary: dict) -> str:
    # as text: a number among names and lists reads better aligned with them than right-aligned
    return "<h2>Attributes</h2>" + table(
        ["attribute", "value"], ((k, str(v)) for k, v in summary["attributes"].items())
    )


# ---------------------------------------------------------------------------------------------
# The norms plot


def norms_by_representation(emb: Embeddings) -> dict[str, list[tuple[int | None, np.ndarray]]]:
    """Per representation, (layer, norms over the ok samples) in layer order; the vision-only one has no layer."""
    ok = (emb.table["status"] == STATUS_OK).to_numpy()
    out: dict[str, list[tuple[int | None, np.ndarray]]] = {}
    for key in emb.representation_keys():  # in layer order
        representation, layer = parse_key(key)
        out.setdefault(representation, []).append((layer, np.linalg.norm(emb.load(key)[ok], axis=1)))
    return out


def norms_figure(by_representation: dict, title: str):
    """One panel per representation: the median norm by layer with its 5th-95th percentile band; the
    vision-only vector has no layer, so its panel is one narrow box with no x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(by_representation)
    widths = [1 if by_representation[n][0][0] is None else 3 for n in names] or [1]
    fig, axes = plt.subplots(
        1, max(len(names), 1), figsize=(1.3 + 3.2 * sum(widths) / 3 + 0.8, 3.4), squeeze=False,
        gridspec_kw={"width_ratios": widths}, layout="constrained",
    )  # fmt: skip
    for ax, representation in zip(axes[0], names):
        series = by_representation[representation]
        norms = [n for _, n in series]
        ax.set_title(representation.replace("_representation", "").replace("_", " "), fontsize=9)
        ax.set_ylabel("L2 norm", fontsize=8)
        ax.grid(alpha=0.3)
        if series[0][0] is None:
            _norms_box(ax, norms[0])
            continue
        layers = [layer for layer, _ in series]
        if len(norms[0]):
            ax.plot(layers, [np.median(n) for n in norms], marker="o", ms=3, label="median")
            low, high = ([np.percentile(n, q) for n in norms] for q in (5, 95))
            ax.fill_between(layers, low, high, alpha=0.25, label="5th-95th pct")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _norms_box(ax, norms: np.ndarray) -> None:
    if len(norms):
        ax.boxplot([norms], whis=(5, 95), widths=0.5, showfliers=False)
    ax.set_xticks([])
    ax.set_xlabel("mean-pooled, no layer", fontsize=8)


def _plot_norms(emb: Embeddings, out_png, name: str) -> None:
    ok = int((emb.table["status"] == STATUS_OK).sum())
    fig = norms_figure(norms_by_representation(emb), f"{name}: vector norms over {ok} successful samples")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
