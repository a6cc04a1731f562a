"""Screening: a saved probe (vlmstates.analysis.probes.saved) applied to new questions, before any answer is generated.

`score_embeddings` reads the probe's vector from an embeddings file and writes, per question, the
hallucination risk and the predicted label (CSV), with a JSON sidecar (SCORES_FORMAT) that carries the
probe's recorded test AUROC, its threshold and where it came from. `extract_for_probe` first runs
prefill-only extraction (answers: false) of a dataset, recording only the layer the probe reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from vlmstates.analysis.labels import FALSE, TRUE
from vlmstates.analysis.probes.saved import INDEX, SavedProbe, SavedProbeError, load_probe, sigmoid
from vlmstates.atomic import write_atomic
from vlmstates.store import MODEL_ATTR, MULTIMODAL, PAPER_VISION_TOKEN, STATUS_OK, parse_key, read_embeddings

SCORES_FORMAT = "vlmstates-scores"
SCORES_FORMAT_VERSION = 1
SCORE_COLUMNS = (
    "question_id",
    "image_id",
    "question",
    "status",
    "logit",
    "hallucination_risk",
    "predicted_hallucinated",
)


def sidecar_path(scores_csv: str | Path) -> Path:
    """scores.csv -> scores.json: the metadata of a scores file."""
    return Path(scores_csv).with_suffix(".json")


def probe_vectors(probe: SavedProbe, embeddings, where: str) -> np.ndarray:
    """The probe's vector of every row, after checking the file holds it at the probe's width."""
    if probe.key not in embeddings.vector_dims:
        held = ", ".join(embeddings.representation_keys()) or "none"
        raise SavedProbeError(
            f"{embeddings.path} has no vector {probe.key}, which probe {probe.id} ({where}) reads (the file holds "
            f"{held}); extract it with layers including {probe.layer} (a model entry's `layers`), or give "
            "`vlmstates screen` a dataset (--dataset) to extract just what the probe needs"
        )
    width = embeddings.vector_dims[probe.key]
    if width != probe.dim:
        raise SavedProbeError(
            f"{embeddings.path}: {probe.key} has width {width}, but probe {probe.id} ({where}) was trained on "
            f"width {probe.dim}; score embeddings of the model the probe was trained on"
        )
    return embeddings.load(probe.key)


def score_embeddings(
    probes_dir: str | Path, spec: str, embeddings_path: str | Path, out_csv: str | Path
) -> pd.DataFrame:
    """Write per question the probe's logit, hallucination risk and predicted label (CSV) and the sidecar
    (sidecar_path); failed rows keep their row with empty scores. Returns the table."""
    probes_dir = Path(probes_dir)
    probe, index = load_probe(probes_dir, spec)
    embeddings = read_embeddings(embeddings_path)
    vectors = probe_vectors(probe, embeddings, str(probes_dir / INDEX))
    table = embeddings.table
    ok = (table["status"] == STATUS_OK).to_numpy()
    logits = np.full(len(table), np.nan)
    logits[ok] = probe.logits(vectors[ok])
    risk = sigmoid(logits)
    scores = pd.DataFrame({column: table[column] for column in SCORE_COLUMNS[:4]})
    scores["logit"] = logits
    scores["hallucination_risk"] = risk
    scores["predicted_hallucinated"] = np.where(~ok, "", np.where(logits >= probe.threshold, TRUE, FALSE))
    out_csv = Path(out_csv)
    write_atomic(out_csv, lambda p: scores.to_csv(p, index=False))
    about = {
        "format": SCORES_FORMAT,
        "format_version": SCORES_FORMAT_VERSION,
        "probe": {**probe.entry(), "folder": str(probes_dir), "chosen_by": spec},
        "test_auroc": probe.metrics.get("test_auroc"),
        "threshold_risk": float(sigmoid(probe.threshold)),
        "trained_on": {name: index.get(name) for name in ("model_name", "model", "revision", "family", "embeddings")},
        "embeddings": str(embeddings.path),
        "model": embeddings.attrs.get(MODEL_ATTR),
        "n_questions": int(len(table)),
        "n_scored": int(ok.sum()),
        "n_predicted_hallucinated": int((scores["predicted_hallucinated"] == TRUE).sum()),
        "columns": {
            "logit": "the probe's output",
            "hallucination_risk": "sigmoid(logit)",
            "predicted_hallucinated": f"{TRUE} when hallucination_risk >= threshold_risk; empty for a failed row",
        },
    }
    write_atomic(sidecar_path(out_csv), lambda p: p.write_text(json.dumps(about, indent=2) + "\n"))
    return scores


def screening_settings(settings, probe: SavedProbe):
    """The model entry, prefill-only and recording just the probe's layer (the vision-only vector, which
    every file holds, takes the smallest recording, block 0), with the multimodal mean only for an MM probe
    and the paper's vision positions only for a VT_paper one."""
    representation, _ = parse_key(probe.key)
    return dataclasses.replace(
        settings,
        answers=False,
        layers=(0 if probe.layer is None else probe.layer,),
        multimodal_representation=representation == MULTIMODAL,
        paper_positions=representation == PAPER_VISION_TOKEN,
    )


def extract_for_probe(settings, probes_dir: str | Path, spec: str, table_path, images_dir, out_path) -> Path:
    """Prefill-only extraction of a validated table, of just what probe `spec` of `probes_dir` reads, as
    one shard (an embeddings file); its progress folder goes once the file is written, as merging would."""
    from vlmstates.dataset import read_validated_table
    from vlmstates.extraction.shards import extract_shard, progress_folder

    probe, _ = load_probe(probes_dir, spec)
    rows = len(read_validated_table(table_path))
    extract_shard(screening_settings(settings, probe), table_path, images_dir, 0, max(rows, 1), out_path)
    shutil.rmtree(progress_folder(out_path), ignore_errors=True)
    return Path(out_path)
