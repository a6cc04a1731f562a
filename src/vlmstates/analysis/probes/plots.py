"""The plots and table page of one model's probe run: test AUROC by representation and layer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from vlmstates.analysis.probes.settings import CODE_ORDER, PROBES
from vlmstates.inspection.pages import table_page


def pyplot():
    """matplotlib's pyplot on the Agg backend, which draws without a display (cluster jobs have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# AUROC colours: the whole 0-1 range, diverging at chance (0.5), so below-chance cells stand apart from
# chance and from good ones; cells without an AUROC are grey with a dash.
AUROC_CMAP = "RdBu_r"
MAX_LABELLED_COLUMNS = 24  # beyond this many layers, only every k-th column is labelled
# inches per heatmap column: room for a cell's number, or, beyond MAX_LABELLED_COLUMNS (numbers left out),
# narrower cells, so that 49 columns (VF and 48 layers) make a page-wide figure rather than a banner
LABELLED_COLUMN_INCHES, UNLABELLED_COLUMN_INCHES = 0.34, 0.2
# the by-layer plot: inches per layer beyond the base width, so that 28-48 layers' markers stand apart,
# and at most this many layer ticks, so that two-digit labels never touch
BY_LAYER_INCHES, BY_LAYER_BASE_INCHES, MAX_LAYER_TICKS = 0.12, 6.0, 16


# the columns a reader of a table page looks at first (the CSVs keep their own order); a metrics page
# names its model in the title, and its `model` column is the checkpoint, so it goes last there
METRICS_PAGE_COLUMNS = (
    "representation", "layer", "probe", "auroc", "auroc_ci_low", "auroc_ci_high", "control_auroc", "n_test",
    "pos_rate_test", "status", "reason",
)  # fmt: skip


# the subsets page likewise (`question` is the question-only baseline)
SUBSET_PAGE_COLUMNS = (
    "representation", "layer", "probe", "subset", "value", "n_test", "n_pos", "n_neg", "auroc", "auroc_ci_low",
    "auroc_ci_high",
)  # fmt: skip


# one colour per representation in every plot, this module's and the summary's
REPRESENTATION_COLOURS = {
    "VF": "tab:gray",
    "VT": "tab:blue",
    "VT_paper": "tab:purple",
    "QT": "tab:red",
    "MM": "tab:green",
}


def write_table_html(frame: pd.DataFrame, path, title: str, note: str = "", first=()) -> None:
    """A table as a page of its own: the report shows HTML, while it only offers a CSV for download."""
    Path(path).write_text(table_page(frame, title, note, first), encoding="utf-8")


def save_png(fig, path) -> None:
    """Write the figure as a PNG and close it."""
    plt = pyplot()
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def _auroc_grid(rows: pd.DataFrame, codes: list[str], columns: list[str]) -> np.ndarray:
    grid = np.full((len(codes), max(len(columns), 1)), np.nan)
    for row in rows.itertuples(index=False):
        column = "VF" if pd.isna(row.layer) else str(int(row.layer))
        if row.representation in codes and column in columns:
            grid[codes.index(row.representation), columns.index(column)] = row.auroc
    return grid


def _label_cells(ax, grid: np.ndarray) -> None:
    for (i, j), value in np.ndenumerate(grid):
        text, colour = ("–", "#555555") if not np.isfinite(value) else (f"{value:.2f}", "black")
        if np.isfinite(value) and not 0.2 <= value <= 0.8:  # the colour map's dark ends
            colour = "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)


def heatmap_figure(metrics: pd.DataFrame, title: str = ""):
    """Test AUROC by representation (rows) and layer (columns), one panel per probe; VF in its own column."""
    plt = pyplot()
    probes = [p for p in PROBES if p in set(metrics["probe"])] or ["none"]
    layers = sorted(int(v) for v in metrics["layer"].dropna().unique())
    codes = [c for c in CODE_ORDER if c in set(metrics["representation"])] or ["none"]
    columns = (["VF"] if "VF" in codes else []) + [str(layer) for layer in layers]
    labelled = len(columns) <= MAX_LABELLED_COLUMNS
    width = max(5.5, (LABELLED_COLUMN_INCHES if labelled else UNLABELLED_COLUMN_INCHES) * len(columns) + 3.0)
    height = 1.2 + len(probes) * (0.45 * len(codes) + 0.9)
    fig, axes = plt.subplots(len(probes), 1, figsize=(width, height), squeeze=False, layout="constrained")
    step = math.ceil(len(columns) / MAX_LABELLED_COLUMNS) if columns else 1
    image = None
    for ax, probe in zip(axes[:, 0], probes):
        grid = _auroc_grid(metrics[metrics["probe"] == probe], codes, columns)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=AUROC_CMAP, vmin=0.0, vmax=1.0)
        ax.set_facecolor("#bdbdbd")
        ax.set_yticks(range(len(codes)), codes)
        shown = list(range(0, len(columns), step))
        ax.set_xticks(shown, [columns[k] for k in shown], fontsize=8)
        ax.set_title(probe, fontsize=10)
        if labelled:
            _label_cells(ax, grid)
    axes[-1, 0].set_xlabel("decoder layer (VF: vision-only, no layer)")
    if image is not None:
        bar = fig.colorbar(image, ax=axes[:, 0].tolist(), label="test AUROC (0.5: chance)")
        bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0])
    fig.suptitle(title, fontsize=10)
    return fig


def plot_heatmap(metrics: pd.DataFrame, path, title: str = "") -> None:
    save_png(heatmap_figure(metrics, title), path)


def plot_by_layer(metrics: pd.DataFrame, path, title: str = "") -> None:
    save_png(by_layer_figure(metrics, title), path)


def by_layer_figure(metrics: pd.DataFrame, title: str = ""):
    """AUROC by layer for VT and QT (and VT_paper, MM), with bootstrap bands, the shuffled control, and VF
    as a level; a panel widens with the layer count."""
    plt = pyplot()
    probes = [p for p in PROBES if p in set(metrics["probe"])] or ["none"]
    from matplotlib.ticker import MaxNLocator

    num_layers = metrics["layer"].dropna().nunique()
    panel = max(BY_LAYER_BASE_INCHES, BY_LAYER_INCHES * num_layers + 2.5)
    fig, axes = plt.subplots(
        1, len(probes), figsize=(panel * len(probes), 4), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, probe in zip(axes[0], probes):
        subset = metrics[metrics["probe"] == probe]
        for code in [c for c in CODE_ORDER if c != "VF"]:
            rows = subset[subset["representation"] == code].sort_values("layer")
            if rows.empty:
                continue
            layer = rows["layer"].astype(float).to_numpy()
            ax.plot(
                layer, rows["auroc"].astype(float), marker="o", ms=3, color=REPRESENTATION_COLOURS[code], label=code
            )
            ax.fill_between(
                layer,
                rows["auroc_ci_low"].astype(float),
                rows["auroc_ci_high"].astype(float),
                color=REPRESENTATION_COLOURS[code],
                alpha=0.15,
            )
            ax.plot(
                layer,
                rows["control_auroc"].astype(float),
                ls=":",
                color=REPRESENTATION_COLOURS[code],
                alpha=0.7,
                label=f"{code} shuffled control",
            )
        vf = subset[subset["representation"] == "VF"]
        if not vf.empty and np.isfinite(float(vf["auroc"].iloc[0])):
            ax.axhline(
                float(vf["auroc"].iloc[0]), color=REPRESENTATION_COLOURS["VF"], ls="--", label="VF (vision-only)"
            )
        ax.axhline(0.5, color="black", lw=0.8)
        ax.set_ylim(-0.02, 1.02)  # so that lines at exactly 0 or 1 stay visible
        ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_LAYER_TICKS, integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_title(probe, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test AUROC (band: bootstrap CI)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:  # below the panels: inside, it covers the lines it explains
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig
