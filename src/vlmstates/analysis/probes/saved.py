"""Saved probes: each probe that `vlmstates probe` trained, kept so that `vlmstates screen` can screen new questions.

A folder `results/<model>/probes/saved/` (format FORMAT, version FORMAT_VERSION):

  index.json             the model the probes were trained on (checkpoint, family, widths), the split settings,
                         and per probe: its id (e.g. VT_layer_3_logreg), representation code, vector key,
                         layer, width, kind, the validation-chosen threshold and its metrics, and its file
  <id>.npz               the probe's arrays (numpy's npz, read with allow_pickle=False, so loading runs no code):
                         mean, std  the training rows' feature mean and standard deviation (float64; a feature
                                    is standardised as (x - mean) / std in float32, as in training)
                         logreg:    coef [dim], intercept [1]
                         mlp:       state.<name>, the torch state dict of the HALP MLP whose hidden sizes and
                                    dropout index.json gives (`mlp_hidden`, `mlp_dropout`)

A probe's score is a logit; its hallucination risk is the sigmoid of it, and a question is predicted
hallucinated when the risk reaches the threshold. The threshold is the one that maximises Youden's J
(true-positive rate minus false-positive rate) on the validation split, or risk 0.5 where the split has
no validation part (split halp). Only single-split runs (grouped, halp) keep probes: a k-fold run fits k
models, none of which is the probe its pooled AUROC describes, and its index lists none and says so.

This module needs numpy only (torch for MLP probes): screening runs in an extraction environment too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vlmstates.analysis.probes.settings import CODE_ORDER, PROBES, REPRESENTATION_CODES
from vlmstates.errors import VlmstatesError
from vlmstates.store import VISION_ONLY

FORMAT = "vlmstates-saved-probes"
FORMAT_VERSION = 1
INDEX = "index.json"
BEST = "best"


class SavedProbeError(VlmstatesError, ValueError):
    """A saved probe cannot be found, read or applied; the message names the file or key and the fix."""


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=float)))


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std in float32 (one new array): training and scoring both standardise with this, so a
    probe sees the same numbers in both."""
    out = np.asarray(x, dtype=np.float32) - mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out


def mlp_module(dim: int, hidden, dropout: float):
    """The HALP MLP: per hidden size Linear, BatchNorm, ReLU, Dropout; then one output logit."""
    from torch import nn

    layers, width = [], dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mlp_logits(model, x, chunk: int = 16384) -> np.ndarray:
    """The MLP's logits in evaluation mode (BatchNorm's running statistics, no dropout), in chunks."""
    import torch

    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + chunk]).squeeze(1) for i in range(0, len(x), chunk)]
    return torch.cat(out).double().cpu().numpy() if out else np.array([])


def youden_threshold(y: np.ndarray, logits: np.ndarray) -> float | None:
    """The logit threshold (predict hallucinated at or above it) with the largest TPR - FPR on (y, logits);
    None unless both classes are present. Ties go to the highest threshold, the fewest positives."""
    y = np.asarray(y).astype(bool)
    logits = np.asarray(logits, dtype=float)
    if y.all() or not y.any():
        return None
    candidates = np.unique(logits)
    predicted = logits[None, :] >= candidates[:, None]
    j = (predicted & y).sum(axis=1) / y.sum() - (predicted & ~y).sum(axis=1) / (~y).sum()
    return float(candidates[np.flatnonzero(j == j.max())[-1]])


def threshold_metrics(y: np.ndarray, logits: np.ndarray, threshold: float) -> dict:
    """Accuracy, true- and false-positive rate and precision of `logits >= threshold` against y."""
    y = np.asarray(y).astype(bool)
    predicted = np.asarray(logits, dtype=float) >= threshold
    if not len(y):
        return {"accuracy": None, "tpr": None, "fpr": None, "precision": None}

    def ratio(a, b):
        return float(a / b) if b else None

    return {
        "accuracy": float((predicted == y).mean()),
        "tpr": ratio((predicted & y).sum(), y.sum()),
        "fpr": ratio((predicted & ~y).sum(), (~y).sum()),
        "precision": ratio((predicted & y).sum(), predicted.sum()),
    }


@dataclass
class SavedProbe:
    """One trained probe: what it reads (key, width), its normalisation, its parameters and its threshold."""

    id: str
    kind: str  # logreg or mlp
    representation: str  # VF, VT, QT, MM
    key: str  # the vector dataset of the embeddings file, e.g. vision_token_representation/layer_3
    layer: int | None
    dim: int
    mean: np.ndarray
    std: np.ndarray
    params: dict[str, np.ndarray]
    threshold: float  # a logit
    threshold_rule: str
    metrics: dict = field(default_factory=dict)
    mlp_hidden: list[int] = field(default_factory=list)
    mlp_dropout: float = 0.0

    def logits(self, x: np.ndarray) -> np.ndarray:
        xs = standardise(x, self.mean, self.std)
        if self.kind == "logreg":
            return (xs @ self.params["coef"].astype(np.float32) + self.params["intercept"][0]).astype(float)
        import torch

        model = mlp_module(self.dim, self.mlp_hidden, self.mlp_dropout)
        model.load_state_dict({name: torch.from_numpy(value) for name, value in self.params.items()})
        return mlp_logits(model, torch.from_numpy(np.ascontiguousarray(xs)))

    def entry(self) -> dict:
        """Its record in index.json (the arrays go to its npz file)."""
        entry = {
            "id": self.id, "file": f"{self.id}.npz", "kind": self.kind, "representation": self.representation,
            "key": self.key, "layer": self.layer, "dim": self.dim, "threshold_logit": self.threshold,
            "threshold_risk": float(sigmoid(self.threshold)), "threshold_rule": self.threshold_rule,
            "metrics": self.metrics,
        }  # fmt: skip
        if self.kind == "mlp":
            entry.update(mlp_hidden=list(self.mlp_hidden), mlp_dropout=self.mlp_dropout)
        return entry


def probe_id(representation: str, layer: int | None, kind: str) -> str:
    return f"{representation}_{kind}" if layer is None else f"{representation}_layer_{layer}_{kind}"


def _finite_or_none(value):
    return float(value) if value is not None and math.isfinite(value) else None


def probe_from_fit(base: dict, result: dict, y: np.ndarray, fold, features, fit, settings) -> SavedProbe:
    """The probe of one single-split fit (vlmstates.analysis.probes.stats: its metrics record's `base` and `result`, the
    fold, its Standardised features and FitResult), with its threshold chosen on the validation split."""
    threshold = youden_threshold(y[fold.val], fit.val_scores)
    rule = "max Youden J (TPR - FPR) on the validation split"
    if threshold is None:
        threshold, rule = 0.0, "risk 0.5 (the split has no validation part with both classes)"
    metrics = {
        "test_auroc": _finite_or_none(result["auroc"]),
        "test_auroc_ci_low": _finite_or_none(result["auroc_ci_low"]),
        "test_auroc_ci_high": _finite_or_none(result["auroc_ci_high"]),
        "val_auroc": _finite_or_none(result["val_auroc"]),
        "selected": result["selected"],
        "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
        "val_at_threshold": threshold_metrics(y[fold.val], fit.val_scores, threshold),
        "test_at_threshold": threshold_metrics(y[fold.test], fit.test_scores, threshold),
    }  # fmt: skip
    return SavedProbe(
        id=probe_id(base["representation"], base["layer"], base["probe"]), kind=base["probe"],
        representation=base["representation"], key=base["key"], layer=base["layer"], dim=int(base["dim"]),
        mean=features.mean, std=features.std, params=fit.params, threshold=threshold, threshold_rule=rule,
        metrics=metrics, mlp_hidden=list(settings.mlp_hidden), mlp_dropout=settings.mlp_dropout,
    )  # fmt: skip


def write_saved_probes(folder: str | Path, probes: list[SavedProbe], about: dict) -> Path:
    """Write the folder (index.json and one npz per probe) under a temporary name and swap it in, so an
    interrupted run leaves the previous folder or none, and no file of an earlier run survives in it."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for probe in probes:
        arrays = {"mean": probe.mean, "std": probe.std}
        arrays.update({("" if probe.kind == "logreg" else "state.") + k: v for k, v in probe.params.items()})
        np.savez(staging / f"{probe.id}.npz", **arrays)
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, **about, "probes": [p.entry() for p in probes]}
    (staging / INDEX).write_text(json.dumps(index, indent=2, allow_nan=False) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise SavedProbeError(
            f"{path} does not exist: give the saved-probes folder that `vlmstates probe` writes "
            "(results/<model>/probes/saved/)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise SavedProbeError(
            f"{path}: format {index.get('format')!r} version {index.get('format_version')!r}, but this vlmstates "
            f"reads {FORMAT!r} version {FORMAT_VERSION}; retrain the probes with this version (`vlmstates probe`)"
        )
    return index


class ProbeSpec(NamedTuple):
    """A saved probe named by what it reads and its kind, as index.json's entries record it."""

    representation: str  # the code: VF, VT, VT_paper, QT, MM
    layer: int | None  # None for VF, the vision-only vector
    kind: str  # one of PROBES


VISION_ONLY_CODE = REPRESENTATION_CODES[VISION_ONLY]
LAYERED_CODES = tuple(code for code in CODE_ORDER if code != VISION_ONLY_CODE)
_LAYER = re.compile(r"[0-9]+")


def parse_probe_spec(spec: str) -> ProbeSpec | None:
    """The one reader of a probe's name (`screen.probe`, `vlmstates screen --probe`): `best` (None), VF/KIND, or
    REPRESENTATION/LAYER/KIND with a layered representation's code, e.g. VT/12/logreg. The config schema's
    pattern for screen.probe accepts exactly these (tests/test_saved_probes.py holds them to it)."""
    if spec == BEST:
        return None
    parts = spec.split("/")
    if len(parts) == 2 and parts[0] == VISION_ONLY_CODE and parts[1] in PROBES:
        return ProbeSpec(parts[0], None, parts[1])
    if len(parts) == 3 and parts[0] in LAYERED_CODES and _LAYER.fullmatch(parts[1]) and parts[2] in PROBES:
        return ProbeSpec(parts[0], int(parts[1]), parts[2])
    raise SavedProbeError(
        f"probe {spec!r}: give `{BEST}`, REPRESENTATION/LAYER/KIND with REPRESENTATION one of "
        f"{', '.join(LAYERED_CODES)} (e.g. VT/12/logreg), or {VISION_ONLY_CODE}/KIND; KIND is {' or '.join(PROBES)}"
    )


def choose_entry(index: dict, spec: str, where: str) -> dict:
    """The index entry named by `spec`; `best` is the highest validation AUROC, or the highest test AUROC
    where the split has no validation part (split halp). `where` names the index in errors."""
    entries = index["probes"]
    if not entries:
        raise SavedProbeError(f"{where} holds no probes ({index.get('note') or 'none could be trained'})")
    wanted = parse_probe_spec(spec)
    if wanted is None:

        def merit(entry):
            value = entry["metrics"].get("val_auroc")
            return value if value is not None else entry["metrics"].get("test_auroc") or -math.inf

        return max(entries, key=merit)
    for entry in entries:
        if ProbeSpec(entry["representation"], entry["layer"], entry["kind"]) == wanted:
            return entry
    known = ", ".join(
        f"{e['representation']}/{e['kind']}"
        if e["layer"] is None
        else f"{e['representation']}/{e['layer']}/{e['kind']}"
        for e in entries
    )
    raise SavedProbeError(f"{where} has no probe {spec!r}; it has: {known} (or give `best`)")


def load_probe(folder: str | Path, spec: str = BEST) -> tuple[SavedProbe, dict]:
    """The probe `spec` names in `folder`, and the index (its model and settings)."""
    folder = Path(folder)
    index = read_index(folder)
    entry = choose_entry(index, spec, str(folder / INDEX))
    with np.load(folder / entry["file"], allow_pickle=False) as arrays:
        values = {name: arrays[name] for name in arrays.files}
    mean, std = values.pop("mean"), values.pop("std")
    params = {name.removeprefix("state."): value for name, value in values.items()}
    probe = SavedProbe(
        id=entry["id"], kind=entry["kind"], representation=entry["representation"], key=entry["key"],
        layer=entry["layer"], dim=entry["dim"], mean=mean, std=std, params=params,
        threshold=entry["threshold_logit"], threshold_rule=entry["threshold_rule"], metrics=entry["metrics"],
        mlp_hidden=entry.get("mlp_hidden", []), mlp_dropout=entry.get("mlp_dropout", 0.0),
    )  # fmt: skip
    return probe, index
