"""Time the probes on one synthetic representation-layer (default 10000 questions x 3584 features).

    python scripts/bench_probes.py [--n 10000] [--dim 3584] [--epochs 50] [--threads 2] [--device cpu]

Prints one table row per step: standardisation, logistic regression (the whole C grid on validation AUROC,
then a single fit at C=1), the MLP probe (all epochs, epoch chosen on validation AUROC), the bootstrap
interval, the per-subset AUROCs (3 answer types and 35 dataset-column values, each with its interval) and the
question-only baseline. A full probe run costs, per representation-layer and probe, the fit plus the same fit
again for the shuffled-label control, and the subset AUROCs; the baseline once per run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from vlmstates.analysis.probes.settings import ProbeSettings  # noqa: E402
from vlmstates.analysis.probes.stats import (  # noqa: E402
    _standardise,
    auroc,
    bootstrap_auroc,
    fit_logreg,
    fit_mlp,
    make_folds,
    question_baseline,
    subset_aurocs,
)


def synthetic(n: int, dim: int, rate: float, seed: int):
    """Gaussian features, about two questions per image, a weak linear signal spread over 32 features."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < rate).astype(int)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x[:, :32] += (0.25 * y)[:, None].astype(np.float32)
    groups = np.arange(n) // 2
    return x, y, groups


def synthetic_questions(n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Question texts of three answer types, and per question its answer type and two dataset columns with 5
    and 30 values (as the HALP set's `dataset` and `category`)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(["yes/no", "number", "other"], n)
    things = rng.choice(["cat", "dog", "car", "tree", "person", "cup", "bus", "chair"], n)
    templates = {
        "yes/no": "Is there a {} in the image?",
        "number": "How many {}s are there?",
        "other": "What is the {} doing?",
    }
    questions = np.array([templates[kind].format(thing) for kind, thing in zip(kinds, things)])
    subsets = pd.DataFrame(
        {"answer_type": kinds, "dataset": rng.choice(list("ABCDE"), n), "category": rng.integers(0, 30, n).astype(str)}
    )
    return questions, subsets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--rate", type=float, default=0.12, help="share of hallucinated answers")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--probes", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vlmstates.analysis.probes.stats import resolve_device

    device = resolve_device(args.device)
    settings = replace(ProbeSettings(), mlp_max_epochs=args.epochs, seed=args.seed, device=device)
    x, y, groups = synthetic(args.n, args.dim, args.rate, args.seed)
    (fold,) = make_folds(y, groups, settings)
    print(
        f"# {args.n} x {args.dim} float32, {y.mean():.1%} positive; split grouped: train {len(fold.train)}, "
        f"val {len(fold.val)}, test {len(fold.test)}; device {device}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average {os.getloadavg()[0]:.2f}"
    )
    rows = []

    def timed(step, detail_fn, fn):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rows.append((step, seconds, cpu, detail_fn(result)))
        print(f"{step:34s} {seconds:9.2f} {cpu:9.2f}  {rows[-1][3]}", flush=True)
        return result

    print(f"{'step':34s} {'wall s':>9s} {'CPU s':>9s}  detail")
    xs = timed("standardise (train mean/std)", lambda _: "", lambda: _standardise(x, fold.train).x)
    if "logreg" in args.probes:
        grid = ",".join(f"{c:g}" for c in settings.logreg_c_grid)
        fit = timed(
            "logreg: C grid + selection",
            lambda r: f"grid {grid}; chose {r.selected}; test AUROC {auroc(y[fold.test], r.test_scores):.3f}",
            lambda: fit_logreg(xs, y, fold, settings),
        )
        single = replace(settings, logreg_c_grid=[1.0])
        timed("logreg: one fit at C=1", lambda r: f"test AUROC {auroc(y[fold.test], r.test_scores):.3f}",
              lambda: fit_logreg(xs, y, fold, single))  # fmt: skip
    if "mlp" in args.probes:
        fit = timed(
            f"mlp: {args.epochs} epochs, batch 32",
            lambda r: f"chose {r.selected}; test AUROC {auroc(y[fold.test], r.test_scores):.3f}",
            lambda: fit_mlp(xs, y, fold, settings, device),
        )
        _, seconds, cpu, _ = rows[-1]
        print(f"{'mlp: per epoch':34s} {seconds / args.epochs:9.2f} {cpu / args.epochs:9.2f}")
        if args.epochs != 50:
            print(
                f"{'mlp: 50 epochs (extrapolated)':34s} {50 * seconds / args.epochs:9.1f} {50 * cpu / args.epochs:9.1f}"
            )
    scores = fit.test_scores
    timed("bootstrap CI (1000 resamples)", lambda r: f"[{r[0]:.3f}, {r[1]:.3f}]",
          lambda: bootstrap_auroc(y[fold.test], scores, 1000, 0.95, 0))  # fmt: skip
    questions, subsets = synthetic_questions(args.n, args.seed)
    values = sum(subsets[column].nunique() for column in subsets.columns)
    timed(f"subsets: {values} values, 1000 resamples", lambda r: f"{len(r)} subset AUROCs, per probe and layer",
          lambda: subset_aurocs(y, fold.test, scores, subsets, settings))  # fmt: skip
    timed("question-only baseline (words)", lambda r: f"test AUROC {r.result['auroc']:.3f}; once per run",
          lambda: question_baseline(questions, y, [fold], subsets["answer_type"].to_numpy(), settings))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
