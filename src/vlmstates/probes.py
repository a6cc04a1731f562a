"""Hallucination probes on hidden states: does a representation predict the label before any token is generated?

For every representation and layer of an embeddings file (VF = vision-only; VT, QT = vision- and
query-token per decoder layer; MM = multimodal mean when present) and each probe kind:

  logreg  scikit-learn logistic regression on standardised features, C chosen on validation AUROC
  mlp     the HALP paper's MLP (512-256-128, BatchNorm, ReLU, Dropout 0.3, BCE, Adam 1e-3, batch 32,
          up to 50 epochs), epoch chosen on validation AUROC

Splits (one split per run, shared by every representation and layer):
  grouped  (default) by image, stratified by label: train/validation/test 70/10/20
  kfold    grouped, stratified k-fold; test AUROC on the pooled out-of-fold scores
  halp     the paper's protocol: random 80/20 by question, no validation (default C, last epoch)

Per probe: test AUROC with a bootstrap interval, accuracy at p=0.5, positive rates and n per split,
and a shuffled-label control (the same pipeline on labels permuted within each split, so every split keeps
its class counts and the control is defined wherever the probe is; it should sit near 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from vlmstates.atomic import atomic_path
from vlmstates.errors import VlmstatesError
from vlmstates.inspection import model_name
from vlmstates.labels import FALSE, TRUE, read_labels
from vlmstates.report_pages import table_page
from vlmstates.store import MULTIMODAL, QUERY_TOKEN, STATUS_OK, VISION_ONLY, VISION_TOKEN, parse_key, read_embeddings


class ProbeError(VlmstatesError, ValueError):
    """Probe settings or inputs cannot be used; the message names the setting or option."""


SPLITS = ("grouped", "halp", "kfold")
PROBES = ("logreg", "mlp")
REPRESENTATION_CODES = {VISION_ONLY: "VF", VISION_TOKEN: "VT", QUERY_TOKEN: "QT", MULTIMODAL: "MM"}
CODE_ORDER = ("VF", "VT", "QT", "MM")
SPLIT_NAMES = ("train", "val", "test")
OUTPUT_FILES = ("metrics.csv", "metrics.html", "metrics.json", "splits.csv", "heatmap.png", "auroc_by_layer.png")

METRIC_COLUMNS = (
    "model", "representation", "layer", "key", "dim", "probe", "split",
    "n_train", "n_val", "n_test", "pos_rate", "pos_rate_train", "pos_rate_val", "pos_rate_test",
    "auroc", "auroc_ci_low", "auroc_ci_high", "accuracy", "val_auroc", "selected",
    "auroc_fold_mean", "auroc_fold_std", "control_auroc", "seconds", "device", "status", "reason",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class ProbeSettings:
    """Everything that decides a probe run; the workflow's `probes:` config maps onto these fields."""

    split: str = "grouped"
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    folds: int = 5
    seed: int = 0
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    representations: list[str] = field(default_factory=lambda: list(CODE_ORDER))
    layers: list[int] | None = None
    logreg_c_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    logreg_c_default: float = 1.0
    logreg_max_iter: int = 1000
    mlp_hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    mlp_dropout: float = 0.3
    mlp_lr: float = 1e-3
    mlp_batch_size: int = 32
    mlp_max_epochs: int = 50
    mlp_patience: int | None = None
    bootstrap: int = 1000
    confidence: float = 0.95
    shuffled_control: bool = True
    min_per_class: int = 2
    device: str = "auto"

    @classmethod
    def from_mapping(cls, mapping: dict | None) -> "ProbeSettings":
        """Settings from a config mapping; unknown keys are an error, missing ones take the defaults."""
        mapping = dict(mapping or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ProbeError(f"unknown probe setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        settings = cls(**mapping)
        settings.validate()
        return settings

    def validate(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split {self.split!r} is not one of {', '.join(SPLITS)}")
        for name in ("train_fraction", "val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                problems.append(f"{name} must be in [0, 1), not {value}")
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if self.split == "grouped" and abs(total - 1) > 1e-6:
            problems.append(f"train/val/test fractions must sum to 1, not {total:g}")
        if self.split in ("grouped", "halp") and not self.test_fraction > 0:
            problems.append("test_fraction must be positive")
        if self.split in ("grouped", "kfold") and not self.train_fraction > 0:
            problems.append("train_fraction must be positive")
        if self.split == "kfold" and self.folds < 2:
            problems.append(f"folds must be at least 2, not {self.folds}")
        bad = [p for p in self.probes if p not in PROBES]
        if bad or not self.probes:
            problems.append(f"probes must be a non-empty list of {', '.join(PROBES)} (got {self.probes})")
        bad = [r for r in self.representations if r not in CODE_ORDER]
        if bad:
            problems.append(f"representations must be among {', '.join(CODE_ORDER)} (got {', '.join(bad)})")
        if not self.logreg_c_grid or any(c <= 0 for c in self.logreg_c_grid) or self.logreg_c_default <= 0:
            problems.append("logreg C values must be positive")
        if self.mlp_max_epochs < 1 or self.mlp_batch_size < 2:
            problems.append("mlp_max_epochs must be >= 1 and mlp_batch_size >= 2")
        if self.bootstrap < 0 or not 0 < self.confidence < 1:
            problems.append("bootstrap must be >= 0 and confidence in (0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device must be auto, cpu or cuda[:N], not {self.device!r}")
        if problems:
            raise ProbeError("invalid probe settings: " + "; ".join(problems))


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------
# Splits


@dataclass
class Fold:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def grouped_assignment(y: np.ndarray, groups: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Assign whole groups to len(fractions) parts, keeping each part's size and positive rate near its target.

    Greedy: groups in random order (largest first), each to the part where it most reduces the squared
    shortfall of positives and negatives against the targets. Returns the part index of every sample.
    """
    y = np.asarray(y).astype(int)
    codes, _ = pd.factorize(pd.Series(groups), sort=False)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    group_pos = np.bincount(codes, weights=y, minlength=n_groups)
    group_size = np.bincount(codes, minlength=n_groups).astype(float)
    group_neg = group_size - group_pos

    fractions = np.asarray(fractions, dtype=float)
    fractions = fractions / fractions.sum()
    total_pos, total_neg = max(group_pos.sum(), 1.0), max(group_neg.sum(), 1.0)
    target_pos, target_neg = fractions * group_pos.sum(), fractions * group_neg.sum()
    have_pos, have_neg = np.zeros(len(fractions)), np.zeros(len(fractions))
    open_parts = fractions > 0

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-group_size[order], kind="stable")]
    part_of_group = np.empty(n_groups, dtype=int)
    for g in order:
        gp, gn = group_pos[g], group_neg[g]
        gain = ((have_pos + gp - target_pos) ** 2 - (have_pos - target_pos) ** 2) / total_pos**2 + (
            (have_neg + gn - target_neg) ** 2 - (have_neg - target_neg) ** 2
        ) / total_neg**2
        room = (target_pos + target_neg) - (have_pos + have_neg)
        gain = np.where(open_parts, gain, np.inf)
        best = np.flatnonzero(np.isclose(gain, gain.min()))
        part = best[np.argmax(room[best])]
        part_of_group[g] = part
        have_pos[part] += gp
        have_neg[part] += gn
    return part_of_group[codes]


def make_folds(y: np.ndarray, groups: np.ndarray, settings: ProbeSettings) -> list[Fold]:
    """The split(s) of one run, as index arrays into `y`."""
    y = np.asarray(y).astype(int)
    index = np.arange(len(y))
    empty = np.array([], dtype=int)
    if len(y) < 2:
        return [Fold(index, empty, empty)]
    if settings.split == "grouped":
        part = grouped_assignment(
            y, groups, [settings.train_fraction, settings.val_fraction, settings.test_fraction], settings.seed
        )
        return [Fold(index[part == 0], index[part == 1], index[part == 2])]
    if settings.split == "halp":
        stratify = y if len(y) and np.bincount(y, minlength=2).min() >= 2 else None
        try:
            train, test = train_test_split(
                index, test_size=settings.test_fraction, random_state=settings.seed, stratify=stratify
            )
        except ValueError:  # too few samples to stratify
            train, test = train_test_split(index, test_size=settings.test_fraction, random_state=settings.seed)
        return [Fold(np.sort(train), np.array([], dtype=int), np.sort(test))]
    # kfold: grouped test folds, then a grouped validation part carved out of each fold's rest
    fold_of = grouped_assignment(y, groups, [1.0] * settings.folds, settings.seed)
    folds = []
    for k in range(settings.folds):
        rest = index[fold_of != k]
        if settings.val_fraction > 0 and len(rest):
            part = grouped_assignment(
                y[rest], np.asarray(groups)[rest], [settings.train_fraction, settings.val_fraction], settings.seed + k
            )
            train, val = rest[part == 0], rest[part == 1]
        else:
            train, val = rest, np.array([], dtype=int)
        folds.append(Fold(train, val, index[fold_of == k]))
    return folds


def shuffled_labels(y: np.ndarray, folds: list[Fold], seed: int) -> np.ndarray:
    """`y` permuted within each split (single split: train, val, test; k-fold: each test fold).

    Keeping the class counts per split means a control never loses a class that the real labels have
    in that split, which a global permutation can do on small test sets.
    """
    y = np.asarray(y)
    shuffled = y.copy()
    rng = np.random.default_rng(seed)
    parts = [folds[0].train, folds[0].val, folds[0].test] if len(folds) == 1 else [f.test for f in folds]
    for part in parts:
        shuffled[part] = y[rng.permutation(part)]
    return shuffled


def split_table(folds: list[Fold], question_ids, image_ids, y) -> pd.DataFrame:
    """Long table: question_id, image_id, hallucinated, fold, split."""
    parts = []
    for k, fold in enumerate(folds):
        for name in SPLIT_NAMES:
            idx = getattr(fold, name)
            parts.append(
                pd.DataFrame(
                    {
                        "question_id": np.asarray(question_ids)[idx],
                        "image_id": np.asarray(image_ids)[idx],
                        "hallucinated": np.where(np.asarray(y)[idx] == 1, TRUE, FALSE),
                        "fold": k,
                        "split": name,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Metrics


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN unless both classes are present."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(np.asarray(scores, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _weighted_auroc(y_sorted: np.ndarray, tie_start: np.ndarray, tie_end: np.ndarray, weights: np.ndarray):
    """AUROC of each row of `weights` (sample multiplicities, scores sorted ascending), ties counted half."""
    neg = weights * (1 - y_sorted)
    pos = weights * y_sorted
    cum_neg = np.cumsum(neg, axis=1)
    below = np.where(tie_start > 0, cum_neg[:, np.maximum(tie_start - 1, 0)], 0.0)
    tied = cum_neg[:, tie_end] - below
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)


def bootstrap_auroc(
    y: np.ndarray, scores: np.ndarray, n_boot: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (resampling the test samples); NaN when undefined."""
    y = np.asarray(y, dtype=float)
    scores = np.asarray(scores, dtype=float)
    n = len(y)
    if n_boot <= 0 or n == 0 or y.min() == y.max():
        return math.nan, math.nan
    order = np.argsort(scores, kind="stable")
    s, y_sorted = scores[order], y[order]
    new_value = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_value)
    group = np.cumsum(new_value) - 1
    ends = np.r_[starts[1:] - 1, n - 1]
    tie_start, tie_end = starts[group], ends[group]

    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, 2_000_000 // n))
    values = []
    for first in range(0, n_boot, block):
        rows = min(block, n_boot - first)
        draws = rng.integers(0, n, size=(rows, n))
        counts = np.bincount((draws + (np.arange(rows) * n)[:, None]).ravel(), minlength=rows * n)
        values.append(_weighted_auroc(y_sorted, tie_start, tie_end, counts.reshape(rows, n).astype(float)))
    values = np.concatenate(values)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Probes: each fits on train, selects on val, and returns test scores (logits)


@dataclass
class FitResult:
    test_scores: np.ndarray
    val_auroc: float
    selected: str
    note: str = ""


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Features standardised with the training rows' mean and standard deviation (float32, one copy)."""
    rows = x[train]
    mean = rows.mean(axis=0, dtype=np.float64)
    std = rows.std(axis=0, dtype=np.float64)
    del rows
    std[~(std > 1e-12)] = 1.0
    out = x - mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out


def fit_logreg(x: np.ndarray, y: np.ndarray, fold: Fold, settings: ProbeSettings) -> FitResult:
    """Logistic regression; C by validation AUROC along the grid (warm-started), else the default C."""
    select = len(fold.val) > 0 and len(np.unique(y[fold.val])) == 2
    grid = sorted(settings.logreg_c_grid) if select else [settings.logreg_c_default]
    model = LogisticRegression(max_iter=settings.logreg_max_iter, warm_start=True)
    x_train, y_train, x_val = x[fold.train], y[fold.train], x[fold.val]
    best = (-math.inf, None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            model.set_params(C=c)
            model.fit(x_train, y_train)
            score = auroc(y[fold.val], model.decision_function(x_val)) if select else 0.0
            if score > best[0]:
                best = (score, c, model.coef_.copy(), model.intercept_.copy())
    val_auroc, c, coef, intercept = best
    test_scores = x[fold.test] @ coef.ravel().astype(x.dtype) + intercept[0]
    note = "" if select or settings.split == "halp" else f"no usable validation split: default C={c:g}"
    return FitResult(test_scores.astype(float), val_auroc if select else math.nan, f"C={c:g}", note)


def _mlp(dim: int, hidden: Sequence[int], dropout: float):
    from torch import nn

    layers, width = [], dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _predict(model, x, chunk: int = 16384) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + chunk]).squeeze(1) for i in range(0, len(x), chunk)]
    return torch.cat(out).double().cpu().numpy() if out else np.array([])


def fit_mlp(x: np.ndarray, y: np.ndarray, fold: Fold, settings: ProbeSettings, device: str) -> FitResult:
    """The HALP MLP probe; the epoch with the best validation AUROC, else the last epoch."""
    import torch

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    x_train = torch.from_numpy(np.ascontiguousarray(x[fold.train])).to(device)
    y_train = torch.from_numpy(y[fold.train].astype(np.float32)).to(device)
    x_val = torch.from_numpy(np.ascontiguousarray(x[fold.val])).to(device)
    select = len(fold.val) > 0 and len(np.unique(y[fold.val])) == 2

    model = _mlp(x.shape[1], settings.mlp_hidden, settings.mlp_dropout).to(device)
    try:  # the fused kernel is about 3x faster than the default one on a CPU, and exists on CUDA too
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.mlp_lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.mlp_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n, batch = len(fold.train), settings.mlp_batch_size
    best_auroc, best_epoch, best_state, since_best, epoch = -math.inf, 0, None, 0, 0
    for epoch in range(1, settings.mlp_max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch):
            rows = order[start : start + batch]
            if len(rows) < 2:  # BatchNorm cannot train on a single sample
                continue
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x_train[rows]).squeeze(1), y_train[rows])
            loss.backward()
            optimiser.step()
        if select:
            score = auroc(y[fold.val], _predict(model, x_val))
            if score > best_auroc:
                best_auroc, best_epoch, since_best = score, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
                if settings.mlp_patience is not None and since_best >= settings.mlp_patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    test_scores = _predict(model, torch.from_numpy(np.ascontiguousarray(x[fold.test])).to(device))
    note = "" if select or settings.split == "halp" else "no usable validation split: last epoch"
    return FitResult(test_scores, best_auroc if select else math.nan, f"epoch={best_epoch}/{epoch}", note)


def _fold_problem(y: np.ndarray, fold: Fold, settings: ProbeSettings) -> str:
    """Why a fold cannot give a test AUROC, or ''."""
    train_counts = np.bincount(y[fold.train], minlength=2)
    if train_counts.min() < settings.min_per_class:
        return (
            f"training split has {train_counts[1]} hallucinated and {train_counts[0]} other samples "
            f"(need at least {settings.min_per_class} of each)"
        )
    if len(np.unique(y[fold.test])) < 2:
        return f"test split has only one class ({len(fold.test)} samples)"
    return ""


def evaluate_probe(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[Fold],
    probe: str,
    settings: ProbeSettings,
    device: str,
    standardised: dict | None = None,
) -> dict:
    """Fit one probe kind on every fold; metrics on the (pooled) test scores.

    `standardised` caches each fold's standardised features, so the probes and the control of one
    representation-layer standardise once.
    """
    standardised = {} if standardised is None else standardised
    y = np.asarray(y).astype(int)
    problems = [_fold_problem(y, fold, settings) for fold in folds]
    result = {"auroc": math.nan, "auroc_ci_low": math.nan, "auroc_ci_high": math.nan, "accuracy": math.nan}
    result.update(val_auroc=math.nan, selected="", auroc_fold_mean=math.nan, auroc_fold_std=math.nan)
    usable = [fold for fold, problem in zip(folds, problems) if not problem]
    if not usable:
        result.update(status="skipped", reason="; ".join(sorted(set(problems))))
        return result

    x = x.astype(np.float32, copy=False)
    test_y, test_scores, fold_aurocs, val_aurocs, selected, notes = [], [], [], [], [], []
    for k, fold in enumerate(folds):
        if problems[k]:
            continue
        if k not in standardised:
            standardised[k] = _standardise(x, fold.train)
        xs = standardised[k]
        fit = fit_logreg(xs, y, fold, settings) if probe == "logreg" else fit_mlp(xs, y, fold, settings, device)
        test_y.append(y[fold.test])
        test_scores.append(fit.test_scores)
        fold_aurocs.append(auroc(y[fold.test], fit.test_scores))
        val_aurocs.append(fit.val_auroc)
        selected.append(fit.selected)
        if fit.note:
            notes.append(fit.note)
    ys, scores = np.concatenate(test_y), np.concatenate(test_scores)
    low, high = bootstrap_auroc(ys, scores, settings.bootstrap, settings.confidence, settings.seed)
    skipped = [problem for problem in problems if problem]
    if skipped:
        notes.append(f"{len(skipped)} of {len(folds)} folds skipped: {'; '.join(sorted(set(skipped)))}")
    result.update(
        auroc=auroc(ys, scores),
        auroc_ci_low=low,
        auroc_ci_high=high,
        accuracy=float(((scores > 0).astype(int) == ys).mean()),
        val_auroc=float(np.nanmean(val_aurocs)) if np.isfinite(val_aurocs).any() else math.nan,
        selected="|".join(selected),
        status="ok",
        reason="; ".join(dict.fromkeys(notes)),
    )
    if len(folds) > 1:
        result.update(auroc_fold_mean=float(np.nanmean(fold_aurocs)), auroc_fold_std=float(np.nanstd(fold_aurocs)))
    return result


# ---------------------------------------------------------------------------------------------
# A whole file


def _key_code_layer(key: str) -> tuple[str, int | None]:
    representation, layer = parse_key(key)
    return REPRESENTATION_CODES[representation], layer


def _split_counts(y: np.ndarray, folds: list[Fold]) -> dict:
    counts = {}
    for name in SPLIT_NAMES:
        sizes = [len(getattr(f, name)) for f in folds]
        positives = [int(y[getattr(f, name)].sum()) for f in folds]
        counts[f"n_{name}"] = int(round(np.mean(sizes))) if name != "test" else int(np.sum(sizes))
        total = sum(sizes)
        counts[f"pos_rate_{name}"] = sum(positives) / total if total else math.nan
    return counts


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _json_ready(float(value))
    if value is pd.NA:
        return None
    return value


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def load_probe_data(embeddings_path, labels_csv):
    """The embeddings file, its labels aligned to its rows, and the mask of rows usable for probing."""
    embeddings = read_embeddings(embeddings_path)
    table = embeddings.table
    labels = read_labels(labels_csv)
    if labels["question_id"].duplicated().any():
        raise ProbeError(
            f"{labels_csv}: question_id {labels['question_id'][labels['question_id'].duplicated()].iloc[0]!r} repeats"
        )
    unknown = sorted(set(labels["question_id"]) - set(table["question_id"]))
    if unknown:
        raise ProbeError(
            f"{labels_csv}: {len(unknown)} question_ids are not in {embeddings_path} "
            f"(first: {', '.join(unknown[:3])}); were the labels made from another file?"
        )
    value = table["question_id"].map(dict(zip(labels["question_id"], labels["hallucinated"]))).fillna("")
    ok = (table["status"] == STATUS_OK).to_numpy()
    judged = value.isin([TRUE, FALSE]).to_numpy()
    y = (value == TRUE).to_numpy().astype(int)
    groups = table["image_id"].astype(str).to_numpy().copy()
    no_image = groups == ""
    groups[no_image] = "question:" + table["question_id"].to_numpy()[no_image]
    return (
        embeddings,
        y,
        groups,
        ok & judged,
        {
            "n_questions": int(len(table)),
            "n_failed": int((~ok).sum()),
            "n_unjudged": int((ok & ~judged).sum()),
            "n_usable": int((ok & judged).sum()),
        },
    )


def run_probes(embeddings_path, labels_csv, out_dir, settings: ProbeSettings | None = None) -> pd.DataFrame:
    """Probe every representation/layer; write the OUTPUT_FILES (metrics.csv and its page metrics.html,
    metrics.json, splits.csv, heatmap.png, auroc_by_layer.png) into `out_dir`; return the metrics table."""
    settings = settings or ProbeSettings()
    settings.validate()
    out_dir = Path(out_dir)
    embeddings, y_all, groups_all, usable, counts = load_probe_data(embeddings_path, labels_csv)
    rows_used = np.flatnonzero(usable)
    y, groups = y_all[rows_used], groups_all[rows_used]
    model_name = str(embeddings.attrs.get("model", ""))
    device = resolve_device(settings.device) if "mlp" in settings.probes else "cpu"
    folds = make_folds(y, groups, settings)
    shuffled = shuffled_labels(y, folds, settings.seed + 1)

    keys = []
    for key in embeddings.representation_keys():
        code, layer = _key_code_layer(key)
        if code in settings.representations and (layer is None or settings.layers is None or layer in settings.layers):
            keys.append(key)

    print(
        f"{embeddings_path}: {counts['n_usable']} of {counts['n_questions']} questions usable "
        f"({counts['n_failed']} failed, {counts['n_unjudged']} unjudged), {int(y.sum())} hallucinated; "
        f"split {settings.split}, {len(keys)} representations x {len(settings.probes)} probes on {device}",
        flush=True,
    )
    split_counts = _split_counts(y, folds)
    records = []
    for key in keys:
        code, layer = _key_code_layer(key)
        x = embeddings.load(key)[rows_used].astype(np.float32, copy=False)
        finite = np.isfinite(x).all(axis=1)
        standardised = {}  # per fold, shared by the probes and their controls
        for probe in settings.probes:
            start = time.perf_counter()
            base = {"model": model_name, "representation": code, "layer": layer, "key": key, "dim": x.shape[1]}
            base.update(probe=probe, split=settings.split, pos_rate=float(y.mean()) if len(y) else math.nan)
            base.update(split_counts)
            if not finite.all():
                result = {"status": "skipped", "reason": f"{int((~finite).sum())} usable rows have non-finite values"}
            else:
                result = evaluate_probe(x, y, folds, probe, settings, device, standardised)
                if settings.shuffled_control and result["status"] == "ok":
                    control = evaluate_probe(x, shuffled, folds, probe, settings, device, standardised)
                    result["control_auroc"] = control["auroc"]
            record = {**base, **result, "seconds": time.perf_counter() - start, "device": device}
            records.append(record)
            print(
                f"  {key:45s} {probe:6s} AUROC {record.get('auroc', math.nan):.3f} "
                f"control {record.get('control_auroc', math.nan):.3f} {record['seconds']:.1f}s {record.get('reason', '')}",
                flush=True,
            )
        del x, standardised

    metrics = pd.DataFrame.from_records(records, columns=list(METRIC_COLUMNS))
    metrics["layer"] = metrics["layer"].astype("Int64")
    write_outputs(metrics, out_dir, settings, folds, embeddings, y, groups, rows_used, counts, labels_csv, device)
    return metrics


def write_outputs(metrics, out_dir, settings, folds, embeddings, y, groups, rows_used, counts, labels_csv, device):
    question_ids = embeddings.table["question_id"].to_numpy()[rows_used]
    splits = split_table(folds, question_ids, groups, y)
    _atomic_write(out_dir / "splits.csv", lambda p: splits.to_csv(p, index=False))
    _atomic_write(out_dir / "metrics.csv", lambda p: metrics.to_csv(p, index=False))
    document = {
        "model": str(embeddings.attrs.get("model", "")),
        "family": str(embeddings.attrs.get("family", "")),  # what probe-summary matches the paper's models by
        "embeddings": str(embeddings.path),
        "labels": str(labels_csv),
        "settings": asdict(settings),
        "device": device,
        **counts,
        "n_groups": int(len(np.unique(groups))),
        "splits": _split_counts(y, folds),
        "metrics": [
            {k: _json_ready(v) for k, v in record.items()}
            for record in metrics.astype(object).where(metrics.notna(), None).to_dict("records")
        ],
    }
    _atomic_write(out_dir / "metrics.json", lambda p: p.write_text(json.dumps(_json_ready(document), indent=2) + "\n"))
    # the workflow's name of the model (results/<model>/), which the report groups by; not the checkpoint path
    name = model_name(embeddings)
    title = f"{name}: split {settings.split}, n_test {document['splits']['n_test']}"
    _atomic_write(out_dir / "heatmap.png", lambda p: plot_heatmap(metrics, p, title))
    _atomic_write(out_dir / "auroc_by_layer.png", lambda p: plot_by_layer(metrics, p, title))
    note = f"checkpoint {document['model']}; {title}; labels {labels_csv}"
    page_title = f"{name}: probe metrics"
    _atomic_write(out_dir / "metrics.html", lambda p: write_table_html(metrics, p, page_title, note, METRICS_PAGE_COLUMNS))


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# AUROC colours: the whole 0-1 range, diverging at chance (0.5), so below-chance cells stand apart from
# chance and from good ones; cells without an AUROC are grey with a dash.
AUROC_CMAP = "RdBu_r"
MAX_LABELLED_COLUMNS = 24  # beyond this many layers, only every k-th column is labelled


# the columns a reader of a table page looks at first (the CSVs keep their own order); a metrics page
# names its model in the title, and its `model` column is the checkpoint, so it goes last there
METRICS_PAGE_COLUMNS = (
    "representation", "layer", "probe", "auroc", "auroc_ci_low", "auroc_ci_high", "control_auroc", "n_test",
    "pos_rate_test", "status", "reason",
)  # fmt: skip
SUMMARY_PAGE_COLUMNS = (
    "source", "model", "representation", "probe", "layer", "auroc", "auroc_ci_low", "auroc_ci_high", "control_auroc",
    "published_auroc", "paper_model", "difference", "n_test",
)  # fmt: skip


def write_table_html(frame: pd.DataFrame, path, title: str, note: str = "", first=()) -> None:
    """A table as a page of its own: the report shows HTML, while it only offers a CSV for download."""
    Path(path).write_text(table_page(frame, title, note, first), encoding="utf-8")


def _save(fig, path) -> None:
    plt = _pyplot()
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
    plt = _pyplot()
    probes = [p for p in PROBES if p in set(metrics["probe"])] or ["none"]
    layers = sorted(int(v) for v in metrics["layer"].dropna().unique())
    codes = [c for c in CODE_ORDER if c in set(metrics["representation"])] or ["none"]
    columns = (["VF"] if "VF" in codes else []) + [str(layer) for layer in layers]
    width = max(5.5, 0.34 * len(columns) + 3.0)
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
        if len(columns) <= MAX_LABELLED_COLUMNS:
            _label_cells(ax, grid)
    axes[-1, 0].set_xlabel("decoder layer (VF: vision-only, no layer)")
    if image is not None:
        bar = fig.colorbar(image, ax=axes[:, 0].tolist(), label="test AUROC (0.5: chance)")
        bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0])
    fig.suptitle(title, fontsize=10)
    return fig


def plot_heatmap(metrics: pd.DataFrame, path, title: str = "") -> None:
    _save(heatmap_figure(metrics, title), path)


def plot_by_layer(metrics: pd.DataFrame, path, title: str = "") -> None:
    _save(by_layer_figure(metrics, title), path)


def by_layer_figure(metrics: pd.DataFrame, title: str = ""):
    """AUROC by layer for VT and QT (and MM), with bootstrap bands, the shuffled control, and VF as a level."""
    plt = _pyplot()
    probes = [p for p in PROBES if p in set(metrics["probe"])] or ["none"]
    colours = {"VT": "tab:blue", "QT": "tab:red", "MM": "tab:green", "VF": "tab:gray"}
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        1, len(probes), figsize=(6 * len(probes), 4), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, probe in zip(axes[0], probes):
        subset = metrics[metrics["probe"] == probe]
        for code in ("VT", "QT", "MM"):
            rows = subset[subset["representation"] == code].sort_values("layer")
            if rows.empty:
                continue
            layer = rows["layer"].astype(float).to_numpy()
            ax.plot(layer, rows["auroc"].astype(float), marker="o", ms=3, color=colours[code], label=code)
            ax.fill_between(
                layer,
                rows["auroc_ci_low"].astype(float),
                rows["auroc_ci_high"].astype(float),
                color=colours[code],
                alpha=0.15,
            )
            ax.plot(
                layer,
                rows["control_auroc"].astype(float),
                ls=":",
                color=colours[code],
                alpha=0.7,
                label=f"{code} shuffled control",
            )
        vf = subset[subset["representation"] == "VF"]
        if not vf.empty and np.isfinite(float(vf["auroc"].iloc[0])):
            ax.axhline(float(vf["auroc"].iloc[0]), color=colours["VF"], ls="--", label="VF (vision-only)")
        ax.axhline(0.5, color="black", lw=0.8)
        ax.set_ylim(-0.02, 1.02)  # so that lines at exactly 0 or 1 stay visible
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_title(probe, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test AUROC (band: bootstrap CI)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:  # below the panels: inside, it covers the lines it explains
        fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Across models, beside the published numbers


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


def _family_of(metrics_csv) -> str | None:
    """The adapter family that `probe` recorded in metrics.json beside a metrics.csv (None if absent)."""
    document = Path(metrics_csv).with_name("metrics.json")
    if not document.exists():
        return None
    return json.loads(document.read_text()).get("family") or None


def best_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per representation and probe, the layer with the best validation AUROC (test AUROC where there is no validation)."""
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
    return pd.DataFrame(chosen)


def summarise_models(metrics_csvs: dict, out_csv, out_png, published_csv=None) -> pd.DataFrame:
    """One row per model x representation x probe (best layer), with the paper's number beside ours;
    writes `out_csv`, its page (`summary_html_path`) and the plot `out_png`."""
    published = published_auroc(published_csv)
    citation = published["citation"].iloc[0] if len(published) else ""
    rows = []
    matched = set()
    for name, path in metrics_csvs.items():
        metrics = pd.read_csv(path, dtype={"selected": str, "reason": str, "model": str})
        model_id = str(metrics["model"].dropna().iloc[0]) if metrics["model"].notna().any() else ""
        family = _family_of(path)
        paper_model = published_model_for(family, model_id, published)
        if paper_model:
            matched.add(paper_model)
        for _, row in best_rows(metrics).iterrows():
            reference = published[
                (published["model"] == paper_model)
                & (published["representation"] == row["representation"])
                & published["auroc"].notna()
            ]
            value = float(reference["auroc"].iloc[0]) if len(reference) else math.nan
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
                    "n_test": row["n_test"],
                    "auroc": row["auroc"],
                    "auroc_ci_low": row["auroc_ci_low"],
                    "auroc_ci_high": row["auroc_ci_high"],
                    "control_auroc": row["control_auroc"],
                    "paper_model": paper_model or "",
                    "published_auroc": value,
                    "published_probe": reference["probe"].iloc[0] if len(reference) else "",
                    "difference": row["auroc"] - value if np.isfinite(value) else math.nan,
                    "citation": reference["citation"].iloc[0] if len(reference) else "",
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
        "source", "model", "model_id", "family", "representation", "probe", "layer", "layer_selected_by", "split", "n_test",
        "auroc", "auroc_ci_low", "auroc_ci_high", "control_auroc", "paper_model", "published_auroc",
        "published_probe", "difference", "citation",
    ]  # fmt: skip
    summary = pd.DataFrame(rows, columns=columns)
    for column in ("layer", "n_test"):
        summary[column] = pd.to_numeric(summary[column], errors="coerce").astype("Int64")
    _atomic_write(Path(out_csv), lambda p: summary.to_csv(p, index=False))
    note = f"best layer per model, representation and probe, beside {citation or 'the published numbers'}"
    page = summary_html_path(out_csv)
    _atomic_write(page, lambda p: write_table_html(summary, p, "Probes across models", note, SUMMARY_PAGE_COLUMNS))
    _atomic_write(Path(out_png), lambda p: plot_summary(summary, p, citation))
    return summary


def summary_html_path(out_csv) -> Path:
    """The page of the summary table: probes.csv -> probes.html, beside it."""
    return Path(out_csv).with_suffix(".html")


REPRESENTATION_COLOURS = {"VF": "tab:gray", "VT": "tab:blue", "QT": "tab:red", "MM": "tab:green"}


def plot_summary(summary: pd.DataFrame, path, citation: str = "") -> None:
    _save(summary_figure(summary, citation), path)


def summary_groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The plot's groups as (our model or '', paper model or ''): our models in order, each with the paper's
    model it is compared with, then the paper's models that none of ours matched."""
    ours = summary[summary["source"] == "ours"]
    paper_for = {model: paper or "" for model, paper in zip(ours["model"], ours["paper_model"].fillna(""))}
    published = summary[(summary["source"] == "published") & summary["auroc"].notna()]
    alone = [m for m in dict.fromkeys(published["model"]) if m not in set(paper_for.values())]
    return list(paper_for.items()) + [("", model) for model in alone]


def _group_label(model: str, paper_model: str) -> str:
    if not model:
        return f"{paper_model}\n(paper only)"
    return f"{model}\nvs {paper_model}" if paper_model else model


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

    plt = _pyplot()
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
                ref = published[(published["model"] == paper_model) & (published["representation"] == code)]
                if len(ref):
                    _published_mark(ax, x, width, float(ref["auroc"].iloc[0]))
        ax.axhline(0.5, color="black", lw=0.8, ls="--")
        ax.set_ylim(0.0, 1.12)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel(f"{probe}: test AUROC", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(len(groups)), [_group_label(*g) for g in groups], fontsize=8)
    axes[-1, 0].set_xlim(-0.6, len(groups) - 0.4)
    handles = [Patch(color=REPRESENTATION_COLOURS[c], label=f"{c} (ours, best layer)") for c in codes]
    handles += [Line2D([], [], color="black", lw=2.5, label="published (HALP paper, MLP)")]
    handles += [Line2D([], [], color="black", lw=0.8, ls="--", label="chance")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle(f"Hallucination probes across models, beside {citation or 'the published numbers'}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# Command line


def _settings_from_args(args: argparse.Namespace) -> ProbeSettings:
    mapping = {}
    if args.settings and args.settings_json:
        raise ProbeError("give probe settings as --settings FILE or --settings-json TEXT, not both")
    if args.settings_json:
        mapping = json.loads(args.settings_json)
        if not isinstance(mapping, dict):
            raise ProbeError(f"--settings-json must be a JSON object, not {args.settings_json!r}")
    if args.settings:
        text = Path(args.settings).read_text()
        if args.settings.endswith((".yaml", ".yml")):
            import yaml

            mapping = yaml.safe_load(text) or {}
        else:
            mapping = json.loads(text)
    overrides = {
        "split": args.split, "seed": args.seed, "folds": args.folds, "probes": args.probes,
        "representations": args.representations, "layers": args.layers, "mlp_max_epochs": args.max_epochs,
        "mlp_patience": args.patience, "bootstrap": args.bootstrap, "device": args.device,
    }  # fmt: skip
    mapping.update({k: v for k, v in overrides.items() if v is not None})
    if args.fractions:
        mapping.update(
            train_fraction=args.fractions[0], val_fraction=args.fractions[1], test_fraction=args.fractions[2]
        )
    if args.no_control:
        mapping["shuffled_control"] = False
    return ProbeSettings.from_mapping(mapping)


def _run_probe_cli(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    out_dir = Path(args.output) if args.output else Path(args.embeddings).with_name("probes")
    metrics = run_probes(args.embeddings, args.labels, out_dir, settings)
    ok = metrics[metrics["status"] == "ok"]
    print(f"{out_dir}: {len(ok)} of {len(metrics)} probes evaluated")
    if len(ok):
        best = ok.loc[ok["auroc"].astype(float).idxmax()]
        print(f"  best test AUROC {best['auroc']:.3f} ({best['key']}, {best['probe']})")
    return 0


def _run_summary_cli(args: argparse.Namespace) -> int:
    pairs = {}
    for item in args.metrics:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).parent.parent.name or item, item
        pairs[name] = path
    summary = summarise_models(pairs, args.output, args.plot)
    print(f"{args.output}: {int((summary['source'] == 'ours').sum())} rows for {len(pairs)} models")
    return 0


def add_cli(subparsers) -> None:
    """Register the `probe` and `probe-summary` subcommands on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "probe",
        help="train hallucination probes on every representation and layer of an embeddings file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("embeddings", metavar="EMBEDDINGS.h5")
    parser.add_argument("labels", metavar="LABELS.csv", help="labels as written by `label`")
    parser.add_argument("-o", "--output", metavar="DIR", help="output folder (default: probes/ beside the embeddings)")
    parser.add_argument("--settings", metavar="FILE", help="JSON or YAML mapping of probe settings (flags override)")
    parser.add_argument("--settings-json", metavar="TEXT", help="the same mapping given inline as a JSON object")
    parser.add_argument("--split", choices=SPLITS)
    parser.add_argument("--fractions", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--folds", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--probes", nargs="+", choices=PROBES)
    parser.add_argument("--representations", nargs="+", choices=CODE_ORDER)
    parser.add_argument("--layers", nargs="+", type=int, help="decoder layers to probe (default: all)")
    parser.add_argument("--max-epochs", type=int, help="MLP epochs at most (default 50)")
    parser.add_argument("--patience", type=int, help="stop the MLP after this many epochs without improvement")
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples for the AUROC interval (default 1000)")
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-label control")
    parser.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.set_defaults(func=_run_probe_cli)

    summary = subparsers.add_parser(
        "probe-summary",
        help="compare probe results across models and with the HALP paper's published AUROCs",
    )
    summary.add_argument("metrics", nargs="+", metavar="NAME=METRICS.csv")
    summary.add_argument("-o", "--output", default="probes_summary.csv", metavar="CSV")
    summary.add_argument("--plot", default="probes_summary.png", metavar="PNG")
    summary.set_defaults(func=_run_summary_cli)
