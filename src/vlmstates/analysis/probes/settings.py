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

What the probe adds over the question: beside each AUROC, the AUROC within answer types (hallucinated and
other answers compared only within the same answer type of the ground truth: yes/no, number, other), and a
question-only baseline (bag-of-words logistic regression on the question text, same split, same labels).
Per subset (subsets.csv): the test AUROC per answer type and per value of each `breakdown` column of the
dataset table (--dataset), with its bootstrap interval and the positives and negatives counted.
The label method is read from the labels' summary (LABELS.summary.json beside LABELS.csv) and recorded.
"""

# This module is light on purpose: the command line builds its options (and `probe --help`, from this
# docstring) in environments without the probe extras (scikit-learn, scipy), which only
# vlmstates.analysis.probes.stats imports.

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vlmstates.errors import VlmstatesError
from vlmstates.store import MULTIMODAL, PAPER_VISION_TOKEN, QUERY_TOKEN, VISION_ONLY, VISION_TOKEN


class ProbeError(VlmstatesError, ValueError):
    """Probe settings or inputs cannot be used; the message names the setting or option."""


SPLITS = ("grouped", "halp", "kfold")
#: what a run records as its label method when the labels came without their summary (labels.summary.json)
UNKNOWN_LABEL_METHOD = "unknown"
#: the subset column derived from the ground truth (vlmstates.analysis.labels.answer_type), always broken down
ANSWER_TYPE = "answer_type"
PROBES = ("logreg", "mlp")
REPRESENTATION_CODES = {
    VISION_ONLY: "VF", VISION_TOKEN: "VT", QUERY_TOKEN: "QT", MULTIMODAL: "MM", PAPER_VISION_TOKEN: "VT_paper",
}  # fmt: skip
# VT_paper beside VT: the same vectors at the paper code's position, read against the exact ones
CODE_ORDER = ("VF", "VT", "VT_paper", "QT", "MM")


@dataclass(frozen=True)
class ProbeOutputs:
    """What `vlmstates probe` writes into its output folder, by name: rule probe's outputs, the run summary's
    and probe-summary's inputs."""

    metrics_csv: str = "metrics.csv"
    metrics_html: str = "metrics.html"  # the same table as a page
    metrics_json: str = "metrics.json"
    splits_csv: str = "splits.csv"
    subsets_csv: str = "subsets.csv"  # the test AUROC per answer type and breakdown value
    subsets_html: str = "subsets.html"  # its page: the best layers only
    heatmap_png: str = "heatmap.png"
    auroc_by_layer_png: str = "auroc_by_layer.png"
    saved: str = "saved"  # a folder: the trained probes (format: vlmstates.analysis.probes.saved)


PROBE_OUTPUTS = ProbeOutputs()


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
    #: dataset columns whose values each get their own test AUROC (beside the answer types, always broken down)
    breakdown: list[str] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, mapping: dict | None) -> ProbeSettings:
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
        if len(set(self.breakdown)) != len(self.breakdown) or not all(str(c).strip() for c in self.breakdown):
            problems.append(f"breakdown must name distinct dataset columns (got {self.breakdown})")
        if ANSWER_TYPE in self.breakdown:
            problems.append(f"breakdown: {ANSWER_TYPE} is always broken down (from the ground truth); leave it out")
        if problems:
            raise ProbeError("invalid probe settings: " + "; ".join(problems))
