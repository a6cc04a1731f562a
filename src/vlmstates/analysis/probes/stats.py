"""Probe statistics: the splits, the AUROC and its bootstrap interval (overall, within answer types, per
subset), the logreg and MLP probes and the question-only baseline, and the run over every representation and
layer of an embeddings file (what each setting means: vlmstates.analysis.probes.settings)."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from vlmstates.analysis.labels import ANSWER_TYPES, FALSE, TRUE, read_labels, summary_path
from vlmstates.analysis.probes.plots import (
    METRICS_PAGE_COLUMNS,
    SUBSET_PAGE_COLUMNS,
    plot_by_layer,
    plot_heatmap,
    write_table_html,
)
from vlmstates.analysis.probes.saved import mlp_logits, mlp_module, probe_from_fit, standardise, write_saved_probes
from vlmstates.analysis.probes.settings import (
    ANSWER_TYPE,
    PROBE_OUTPUTS,
    REPRESENTATION_CODES,
    UNKNOWN_LABEL_METHOD,
    ProbeError,
    ProbeSettings,
)
from vlmstates.analysis.probes.subsets import question_subsets
from vlmstates.analysis.summary import best_rows
from vlmstates.atomic import write_atomic
from vlmstates.inspection.report import model_key_of
from vlmstates.store import (
    CONFIG_HASH_ATTR,
    FAMILY_ATTR,
    HIDDEN_SIZE_ATTR,
    MODEL_ATTR,
    NUM_DECODER_LAYERS_ATTR,
    REVISION_ATTR,
    STATUS_OK,
    VISION_HIDDEN_SIZE_ATTR,
    parse_key,
    read_embeddings,
)

SPLIT_NAMES = ("train", "val", "test")

METRIC_COLUMNS = (
    "model", "representation", "layer", "key", "dim", "probe", "split", "label_method",
    "n_train", "n_val", "n_test", "pos_rate", "pos_rate_train", "pos_rate_val", "pos_rate_test",
    "auroc", "auroc_ci_low", "auroc_ci_high", "auroc_within_answer_type", "accuracy", "val_auroc", "selected",
    "auroc_fold_mean", "auroc_fold_std", "control_auroc", "baseline_auroc", "baseline_auroc_within_answer_type",
    "seconds", "device", "status", "reason",
)  # fmt: skip

#: subsets.csv: one row per probe (every layer), subset column and value, on the probe's (pooled) test questions
SUBSET_COLUMNS = (
    "model", "representation", "layer", "key", "probe", "subset", "value", "n_test", "n_pos", "n_neg",
    "auroc", "auroc_ci_low", "auroc_ci_high", "status",
)  # fmt: skip
#: a subset's status where it has no AUROC: said in words, never a number
TOO_FEW_POSITIVES, TOO_FEW_NEGATIVES, NOT_TESTED = "too few positives", "too few negatives", "no test questions"
#: the question-only baseline's name in subsets.csv (representation and probe)
BASELINE_REPRESENTATION, BASELINE_PROBE = "question", "bow_logreg"


def resolve_device(device: str = "auto") -> str:
    """The torch device of the MLP probes: `auto` is cuda where there is one, else cpu."""
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


def stratified_auroc(y: np.ndarray, scores: np.ndarray, strata: np.ndarray) -> float:
    """AUROC over the pairs of a positive and a negative of the same stratum only (each stratum's AUROC
    weighted by its n_pos x n_neg pairs): a score that merely tells the strata apart gets 0.5. NaN when no
    stratum has both classes."""
    y, scores, strata = np.asarray(y).astype(int), np.asarray(scores, dtype=float), np.asarray(strata)
    total, pairs = 0.0, 0
    for stratum in pd.unique(strata):
        inside = strata == stratum
        n_pos = int(y[inside].sum())
        n_pairs = n_pos * (int(inside.sum()) - n_pos)
        if n_pairs:
            total += auroc(y[inside], scores[inside]) * n_pairs
            pairs += n_pairs
    return total / pairs if pairs else math.nan


def subset_aurocs(
    y: np.ndarray, test_index: np.ndarray, scores: np.ndarray, subsets: pd.DataFrame, settings: ProbeSettings
) -> list[dict]:
    """Per column of `subsets` (one row per question, like `y`) and per value: the test AUROC with its
    bootstrap interval and the classes counted; a subset lacking a class, or the test split, says so in
    `status` instead of a number."""
    rows = []
    y_test, test = np.asarray(y)[test_index], subsets.iloc[test_index]
    for column in subsets.columns:
        for value in sorted(pd.unique(subsets[column]), key=_subset_order):
            inside = (test[column] == value).to_numpy()
            n_pos = int(y_test[inside].sum())
            n_neg = int(inside.sum()) - n_pos
            row = {"subset": column, "value": value, "n_test": int(inside.sum()), "n_pos": n_pos, "n_neg": n_neg}
            row.update(auroc=math.nan, auroc_ci_low=math.nan, auroc_ci_high=math.nan)
            if not inside.any():
                row["status"] = NOT_TESTED
            elif n_pos == 0 or n_neg == 0:
                row["status"] = TOO_FEW_POSITIVES if n_pos == 0 else TOO_FEW_NEGATIVES
            else:
                low, high = bootstrap_auroc(
                    y_test[inside], scores[inside], settings.bootstrap, settings.confidence, settings.seed
                )
                row.update(auroc=auroc(y_test[inside], scores[inside]), auroc_ci_low=low, auroc_ci_high=high)
                row["status"] = "ok"
            rows.append(row)
    return rows


def _subset_order(value) -> tuple[int, str]:
    """Answer types in their own order (yes/no, number, other), any other values alphabetically."""
    return (ANSWER_TYPES.index(value) if value in ANSWER_TYPES else len(ANSWER_TYPES), str(value))


# ---------------------------------------------------------------------------------------------
# Probes: each fits on train, selects on val, and returns test scores (logits)


@dataclass
class FitResult:
    test_scores: np.ndarray
    val_auroc: float
    selected: str
    note: str = ""
    val_scores: np.ndarray | None = None
    #: the fitted model's arrays, as a saved probe keeps them (saved_probes)
    params: dict = field(default_factory=dict)


@dataclass
class Standardised:
    """Features standardised with the training rows' mean and standard deviation, which a saved probe keeps."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def _standardise(x: np.ndarray, train: np.ndarray) -> Standardised:
    """Features standardised by the training rows' statistics (float32, one copy)."""
    rows = x[train]
    mean = rows.mean(axis=0, dtype=np.float64)
    std = rows.std(axis=0, dtype=np.float64)
    del rows
    std[~(std > 1e-12)] = 1.0
    return Standardised(standardise(x, mean, std), mean, std)


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
    weights = coef.ravel().astype(x.dtype)
    test_scores = x[fold.test] @ weights + intercept[0]
    note = "" if select or settings.split == "halp" else f"no usable validation split: default C={c:g}"
    return FitResult(
        test_scores.astype(float),
        val_auroc if select else math.nan,
        f"C={c:g}",
        note,
        val_scores=(x_val @ weights + intercept[0]).astype(float),
        params={"coef": coef.ravel(), "intercept": intercept},
    )


def fit_mlp(x: np.ndarray, y: np.ndarray, fold: Fold, settings: ProbeSettings, device: str) -> FitResult:
    """The HALP MLP probe; the epoch with the best validation AUROC, else the last epoch."""
    import torch

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    x_train = torch.from_numpy(np.ascontiguousarray(x[fold.train])).to(device)
    y_train = torch.from_numpy(y[fold.train].astype(np.float32)).to(device)
    x_val = torch.from_numpy(np.ascontiguousarray(x[fold.val])).to(device)
    select = len(fold.val) > 0 and len(np.unique(y[fold.val])) == 2

    model = mlp_module(x.shape[1], settings.mlp_hidden, settings.mlp_dropout).to(device)
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
            score = auroc(y[fold.val], mlp_logits(model, x_val))
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
    test_scores = mlp_logits(model, torch.from_numpy(np.ascontiguousarray(x[fold.test])).to(device))
    note = "" if select or settings.split == "halp" else "no usable validation split: last epoch"
    return FitResult(
        test_scores,
        best_auroc if select else math.nan,
        f"epoch={best_epoch}/{epoch}",
        note,
        val_scores=mlp_logits(model, x_val),
        params={name: value.detach().cpu().numpy() for name, value in model.state_dict().items()},
    )


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
    fits: list | None = None,
) -> dict:
    """Fit one probe kind on every fold; metrics on the (pooled) test scores.

    `standardised` caches each fold's standardised features, so the probes and the control of one
    representation-layer standardise once. `fits` (when given) receives (fold, Standardised, FitResult)
    of every fold fitted, for the saved probes.
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
        xs = standardised[k].x
        fit = fit_logreg(xs, y, fold, settings) if probe == "logreg" else fit_mlp(xs, y, fold, settings, device)
        test_y.append(y[fold.test])
        test_scores.append(fit.test_scores)
        fold_aurocs.append(auroc(y[fold.test], fit.test_scores))
        val_aurocs.append(fit.val_auroc)
        selected.append(fit.selected)
        if fit.note:
            notes.append(fit.note)
        if fits is not None:
            fits.append((fold, standardised[k], fit))
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


def pooled_test(fits: list) -> tuple[np.ndarray, np.ndarray]:
    """The test questions (indices) and scores of every fitted fold, as evaluate_probe pools them."""
    index = np.concatenate([fold.test for fold, _, _ in fits])
    return index, np.concatenate([fit.test_scores for _, _, fit in fits])


@dataclass
class Baseline:
    """The question-only baseline of a run: its metrics record, and its pooled test questions and scores."""

    result: dict
    test_index: np.ndarray = field(default_factory=lambda: np.array([], dtype=int))
    test_scores: np.ndarray = field(default_factory=lambda: np.array([]))


def question_baseline(
    questions: np.ndarray, y: np.ndarray, folds: list[Fold], answer_types: np.ndarray, settings: ProbeSettings
) -> Baseline:
    """What the question text alone predicts: a bag-of-words (words and word pairs, present or not) logistic
    regression, vocabulary and C from the training and validation splits, on the probes' folds and labels."""
    from sklearn.feature_extraction.text import CountVectorizer

    y = np.asarray(y).astype(int)
    result = {"auroc": math.nan, "auroc_ci_low": math.nan, "auroc_ci_high": math.nan}
    result.update(auroc_within_answer_type=math.nan, selected="", n_words=0, status="skipped", reason="")
    problems = [_fold_problem(y, fold, settings) for fold in folds]
    fits = []
    for fold, problem in zip(folds, problems):
        if problem:
            continue
        vectoriser = CountVectorizer(binary=True, ngram_range=(1, 2), dtype=np.float32)
        try:
            vectoriser.fit(questions[fold.train])
        except ValueError:  # no word in any training question
            result["reason"] = "the training questions have no words"
            return Baseline(result)
        x = vectoriser.transform(questions).tocsr()
        fits.append((fold, None, fit_logreg(x, y, fold, settings)))
        result["n_words"] = max(result["n_words"], len(vectoriser.vocabulary_))
    if not fits:
        result["reason"] = "; ".join(sorted(set(problems)))
        return Baseline(result)
    index, scores = pooled_test(fits)
    low, high = bootstrap_auroc(y[index], scores, settings.bootstrap, settings.confidence, settings.seed)
    result.update(auroc=auroc(y[index], scores), auroc_ci_low=low, auroc_ci_high=high, status="ok")
    result.update(
        auroc_within_answer_type=stratified_auroc(y[index], scores, answer_types[index]),
        selected="|".join(fit.selected for _, _, fit in fits),
    )
    return Baseline(result, index, scores)


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


def label_method_of(labels_csv, labels_summary=None) -> str:
    """The method that made the labels, as their summary records it (LABELS.summary.json beside LABELS.csv
    unless named): the file `label` writes with the labels, so the two cannot disagree."""
    path = Path(labels_summary) if labels_summary else summary_path(labels_csv)
    if not path.exists():
        if labels_summary:
            raise ProbeError(f"labels summary {path}: no such file")
        print(f"{labels_csv}: no {path.name} beside it: label method {UNKNOWN_LABEL_METHOD}", flush=True)
        return UNKNOWN_LABEL_METHOD
    try:
        method = json.loads(path.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ProbeError(f"labels summary {path}: not the JSON object `vlmstates label` writes ({error})") from None
    if not method:
        raise ProbeError(f"labels summary {path}: no `method` recorded; rerun `vlmstates label`")
    return str(method)


@dataclass
class ProbeData:
    """What every probe of a run shares: the usable questions' labels, groups, subsets and folds."""

    y: np.ndarray
    groups: np.ndarray
    subsets: pd.DataFrame  # one row per usable question: ANSWER_TYPE and the breakdown columns
    folds: list[Fold]
    label_method: str
    shuffled: np.ndarray  # the labels of the shuffled control (shuffled_labels)

    @property
    def answer_types(self) -> np.ndarray:
        return self.subsets[ANSWER_TYPE].to_numpy()


def run_probes(
    embeddings_path, labels_csv, out_dir, settings: ProbeSettings | None = None, dataset_csv=None, labels_summary=None
) -> pd.DataFrame:
    """Probe every representation/layer; write the PROBE_OUTPUTS (metrics.csv and its page metrics.html,
    metrics.json, splits.csv, subsets.csv and its page subsets.html, heatmap.png, auroc_by_layer.png) and the
    trained probes (saved/) into `out_dir`; return the metrics table. `dataset_csv` (the validated
    dataset table) gives the values of the `breakdown` columns; `labels_summary` the label method."""
    settings = settings or ProbeSettings()
    settings.validate()
    out_dir = Path(out_dir)
    embeddings, y_all, groups_all, usable, counts = load_probe_data(embeddings_path, labels_csv)
    rows_used = np.flatnonzero(usable)
    y, groups = y_all[rows_used], groups_all[rows_used]
    questions = embeddings.table.iloc[rows_used].reset_index(drop=True)
    folds = make_folds(y, groups, settings)
    data = ProbeData(
        y, groups, question_subsets(questions, settings.breakdown, dataset_csv), folds,
        label_method_of(labels_csv, labels_summary), shuffled_labels(y, folds, settings.seed + 1),
    )  # fmt: skip
    device = resolve_device(settings.device) if "mlp" in settings.probes else "cpu"
    keys = []
    for key in embeddings.representation_keys():
        code, layer = _key_code_layer(key)
        if code in settings.representations and (layer is None or settings.layers is None or layer in settings.layers):
            keys.append(key)

    print(
        f"{embeddings_path}: {counts['n_usable']} of {counts['n_questions']} questions usable "
        f"({counts['n_failed']} failed, {counts['n_unjudged']} unjudged), {int(y.sum())} hallucinated "
        f"(labels: {data.label_method}); split {settings.split}, {len(keys)} representations x "
        f"{len(settings.probes)} probes on {device}",
        flush=True,
    )
    baseline = question_baseline(questions["question"].to_numpy(), y, folds, data.answer_types, settings)
    print(
        f"  question-only baseline: AUROC {baseline.result['auroc']:.3f}, within answer types "
        f"{baseline.result['auroc_within_answer_type']:.3f} {baseline.result['reason']}",
        flush=True,
    )
    checkpoint = str(embeddings.attrs.get(MODEL_ATTR, ""))
    subset_rows = _baseline_subset_rows(baseline, data, settings, checkpoint)
    records, saved = [], []
    for key in keys:
        code, layer = _key_code_layer(key)
        x = embeddings.load(key)[rows_used].astype(np.float32, copy=False)
        standardised = {}  # per fold, shared by the probes and their controls
        for probe in settings.probes:
            start = time.perf_counter()
            base = {"model": checkpoint, "representation": code, "layer": layer, "key": key, "dim": x.shape[1]}
            base.update(probe=probe, split=settings.split, label_method=data.label_method)
            base.update(pos_rate=float(y.mean()) if len(y) else math.nan, **_split_counts(y, folds))
            base.update(
                baseline_auroc=baseline.result["auroc"],
                baseline_auroc_within_answer_type=baseline.result["auroc_within_answer_type"],
            )
            result, fits = _probe_one(x, data, probe, settings, device, standardised)
            if result["status"] == "ok":
                index, scores = pooled_test(fits)
                result["auroc_within_answer_type"] = stratified_auroc(y[index], scores, data.answer_types[index])
                ids = {name: base[name] for name in ("model", "representation", "layer", "key", "probe")}
                subset_rows += [{**ids, **row} for row in subset_aurocs(y, index, scores, data.subsets, settings)]
                if len(folds) == 1:
                    saved.append(probe_from_fit(base, result, y, *fits[0], settings))
            record = {**base, **result, "seconds": time.perf_counter() - start, "device": device}
            records.append(record)
            print(
                f"  {key:45s} {probe:6s} AUROC {record.get('auroc', math.nan):.3f} "
                f"within answer types {record.get('auroc_within_answer_type', math.nan):.3f} "
                f"control {record.get('control_auroc', math.nan):.3f} {record['seconds']:.1f}s {record.get('reason', '')}",
                flush=True,
            )
        del x, standardised

    metrics = pd.DataFrame.from_records(records, columns=list(METRIC_COLUMNS))
    metrics["layer"] = metrics["layer"].astype("Int64")
    subsets = pd.DataFrame.from_records(subset_rows, columns=list(SUBSET_COLUMNS))
    subsets["layer"] = subsets["layer"].astype("Int64")
    outputs = RunOutputs(metrics, subsets, baseline.result, counts, device)
    write_outputs(outputs, out_dir, settings, data, embeddings, rows_used, labels_csv, dataset_csv)
    write_saved_probes(
        out_dir / PROBE_OUTPUTS.saved, saved, saved_probes_about(embeddings, labels_csv, settings, folds)
    )
    return metrics


def _probe_one(x, data: ProbeData, probe: str, settings: ProbeSettings, device: str, standardised: dict):
    """One probe kind on one representation and layer: its metrics (with the shuffled control) and its fits."""
    fits = []
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        return {"status": "skipped", "reason": f"{int((~finite).sum())} usable rows have non-finite values"}, fits
    result = evaluate_probe(x, data.y, data.folds, probe, settings, device, standardised, fits)
    if settings.shuffled_control and result["status"] == "ok":
        control = evaluate_probe(x, data.shuffled, data.folds, probe, settings, device, standardised)
        result["control_auroc"] = control["auroc"]
    return result, fits


def _baseline_subset_rows(baseline: Baseline, data: ProbeData, settings: ProbeSettings, model: str) -> list[dict]:
    if baseline.result["status"] != "ok":
        return []
    ids = {"model": model, "representation": BASELINE_REPRESENTATION, "layer": None, "key": "", "probe": BASELINE_PROBE}
    rows = subset_aurocs(data.y, baseline.test_index, baseline.test_scores, data.subsets, settings)
    return [{**ids, **row} for row in rows]


@dataclass
class RunOutputs:
    """The tables and counts of a run that write_outputs writes."""

    metrics: pd.DataFrame
    subsets: pd.DataFrame
    baseline: dict
    counts: dict
    device: str


def saved_probes_about(embeddings, labels_csv, settings: ProbeSettings, folds: list[Fold]) -> dict:
    """index.json's description of the model and data the probes were trained on."""
    attrs = embeddings.attrs
    about = {
        "model_name": model_key_of(embeddings),  # the model key, under the name index.json has always used
        **{name: attrs.get(name) for name in (MODEL_ATTR, REVISION_ATTR, FAMILY_ATTR, CONFIG_HASH_ATTR)},
        **{name: attrs.get(name) for name in (HIDDEN_SIZE_ATTR, VISION_HIDDEN_SIZE_ATTR, NUM_DECODER_LAYERS_ATTR)},
        "embeddings": str(embeddings.path),
        "labels": str(labels_csv),
        "split": settings.split,
        "seed": settings.seed,
    }
    if len(folds) > 1:
        about["note"] = (
            f"split {settings.split} fits {len(folds)} models per probe, none of them the probe its pooled AUROC "
            "describes: no probe is kept; use split grouped (or halp) to keep probes that screen"
        )
    return _json_ready(about)


def write_outputs(
    outputs: RunOutputs, out_dir, settings, data: ProbeData, embeddings, rows_used, labels_csv, dataset_csv
):
    metrics = outputs.metrics
    question_ids = embeddings.table["question_id"].to_numpy()[rows_used]
    splits = split_table(data.folds, question_ids, data.groups, data.y)
    write_atomic(out_dir / PROBE_OUTPUTS.splits_csv, lambda p: splits.to_csv(p, index=False))
    write_atomic(out_dir / PROBE_OUTPUTS.metrics_csv, lambda p: metrics.to_csv(p, index=False))
    write_atomic(out_dir / PROBE_OUTPUTS.subsets_csv, lambda p: outputs.subsets.to_csv(p, index=False))
    document = {
        "model": str(embeddings.attrs.get(MODEL_ATTR, "")),
        "family": str(embeddings.attrs.get(FAMILY_ATTR, "")),  # what probe-summary matches the paper's models by
        "embeddings": str(embeddings.path),
        "labels": str(labels_csv),
        "label_method": data.label_method,  # whether probe-summary sets the paper's numbers beside ours
        "positive_rate": float(data.y.mean()) if len(data.y) else None,
        "dataset": str(dataset_csv) if dataset_csv else None,
        "settings": asdict(settings),
        "device": outputs.device,
        **outputs.counts,
        "n_groups": int(len(np.unique(data.groups))),
        "splits": _split_counts(data.y, data.folds),
        "answer_types": {kind: int(n) for kind, n in data.subsets[ANSWER_TYPE].value_counts().items()},
        "question_baseline": outputs.baseline,
        "metrics": [
            {k: _json_ready(v) for k, v in record.items()}
            for record in metrics.astype(object).where(metrics.notna(), None).to_dict("records")
        ],
    }
    write_atomic(
        out_dir / PROBE_OUTPUTS.metrics_json, lambda p: p.write_text(json.dumps(_json_ready(document), indent=2) + "\n")
    )
    # the workflow's name of the model (results/<model>/), which the report groups by; not the checkpoint path
    name = model_key_of(embeddings)
    title = f"{name}: split {settings.split}, n_test {document['splits']['n_test']}"
    write_atomic(out_dir / PROBE_OUTPUTS.heatmap_png, lambda p: plot_heatmap(metrics, p, title))
    write_atomic(out_dir / PROBE_OUTPUTS.auroc_by_layer_png, lambda p: plot_by_layer(metrics, p, title))
    note = f"checkpoint {document['model']}; {title}; labels {labels_csv} (method {data.label_method})"
    page_title = f"{name}: probe metrics"
    write_atomic(
        out_dir / PROBE_OUTPUTS.metrics_html,
        lambda p: write_table_html(metrics, p, page_title, note, METRICS_PAGE_COLUMNS),
    )
    best = best_layer_subsets(metrics, outputs.subsets)
    note = (
        f"{title}; labels {data.label_method}. The best layer of each representation and probe (as in the summary) "
        f"and the question-only baseline ({BASELINE_REPRESENTATION}), per answer type of the ground truth"
        + (f" and per value of {', '.join(settings.breakdown)}" if settings.breakdown else "")
        + "; every layer: subsets.csv"
    )
    write_atomic(
        out_dir / PROBE_OUTPUTS.subsets_html,
        lambda p: write_table_html(subset_page_frame(best), p, f"{name}: probes per subset", note, SUBSET_PAGE_COLUMNS),
    )


def best_layer_subsets(metrics: pd.DataFrame, subsets: pd.DataFrame) -> pd.DataFrame:
    """The subset rows of the question-only baseline and of each representation and probe's best layer
    (summary.best_rows), in that order."""
    chosen = [subsets[subsets["representation"] == BASELINE_REPRESENTATION]]
    for _, row in best_rows(metrics).iterrows():
        same = (subsets["representation"] == row["representation"]) & (subsets["probe"] == row["probe"])
        same &= subsets["layer"].isna() if pd.isna(row["layer"]) else subsets["layer"] == row["layer"]
        chosen.append(subsets[same.fillna(False)])
    return pd.concat(chosen, ignore_index=True)


def subset_page_frame(subsets: pd.DataFrame) -> pd.DataFrame:
    """Subset rows for reading: a subset without an AUROC shows why (`status`) in the AUROC's place."""
    shown = subsets.drop(columns=["status"]).astype({"auroc": object})
    missing = subsets["status"] != "ok"
    shown.loc[missing, "auroc"] = subsets.loc[missing, "status"]
    return shown
