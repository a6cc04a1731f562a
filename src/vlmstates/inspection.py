"""Inspection of an embeddings file: a printed summary, and the per-model report of the workflow.

Reads both layouts: our columnar file (store.py) and the seed scripts' per-question parts (seed_layout.py).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_text_atomic
from .seed_layout import is_seed_layout, read_seed_layout
from .store import STATUS_FAILED, STATUS_OK, Embeddings, read_embeddings


class UnreadableFile(ValueError):
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
        "attributes": {k: v for k, v in emb.attrs.items() if k != "semantics"},
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
        lines.append(
            f"  {key:45s} dim {v['dim']:6d}  nan {v['nan']}  inf {v['inf']}  median norm {v['norm_median']}"
        )
    for failure in summary["failures"][:10]:
        lines.append(f"failed {failure['question_id']}: {failure['error']}")
    return "\n".join(lines)


def write_inspection_report(embeddings_path, summary_html, norms_png, summary_json) -> None:
    emb = open_embeddings(embeddings_path)
    summary = summarise(emb)
    write_text_atomic(summary_json, json.dumps(summary, indent=2, default=str))
    write_text_atomic(summary_html, _html(summary))
    _plot_norms(emb, norms_png)




def _html(summary: dict) -> str:
    esc = lambda v: html.escape(str(v))  # noqa: E731
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{v['dim']}</td><td>{v['nan']}</td><td>{v['inf']}</td>"
        f"<td>{esc(v['norm_median'])}</td></tr>"
        for k, v in summary["vectors"].items()
    )
    attrs = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in summary["attributes"].items())
    failures = "".join(
        f"<tr><td>{esc(f['question_id'])}</td><td>{esc(f['error'])}</td></tr>" for f in summary["failures"]
    )
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(summary['file'])}</title></head><body>
<h1>{esc(summary['file'])}</h1>
<p>{summary['samples']} samples: {summary['ok']} ok, {summary['failed']} failed.
Prompt tokens {esc(summary['prompt_tokens'])}; image tokens {esc(summary['image_tokens'])}.</p>
<h2>Vectors (successful samples)</h2>
<table border="1"><tr><th>dataset</th><th>dim</th><th>NaN</th><th>Inf</th><th>median norm</th></tr>{rows}</table>
<h2>Failures (first 50)</h2>
<table border="1"><tr><th>question_id</th><th>error</th></tr>{failures}</table>
<h2>Attributes</h2><table border="1">{attrs}</table>
</body></html>
"""


def _plot_norms(emb: Embeddings, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = (emb.table["status"] == STATUS_OK).to_numpy()
    by_representation: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key in emb.representation_keys():
        representation, _, layer = key.partition("/layer_")
        norms = np.linalg.norm(emb.load(key)[ok], axis=1)
        by_representation.setdefault(representation, []).append((int(layer) if layer else 0, norms))
    fig, axes = plt.subplots(1, len(by_representation), figsize=(4 * len(by_representation), 3.2), squeeze=False)
    for ax, (representation, series) in zip(axes[0], by_representation.items()):
        layers = [layer for layer, _ in series]
        if len(series) and len(series[0][1]):
            median = [np.median(n) for _, n in series]
            low = [np.percentile(n, 5) for _, n in series]
            high = [np.percentile(n, 95) for _, n in series]
            ax.plot(layers, median, marker="o")
            ax.fill_between(layers, low, high, alpha=0.25)
        ax.set_title(representation.replace("_representation", ""), fontsize=9)
        ax.set_xlabel("decoder layer" if representation != "vision_only_representation" else "")
        ax.set_ylabel("L2 norm")
    fig.suptitle(f"{emb.attrs.get('model', '')}: vector norms ({int(ok.sum())} samples)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
