"""What an extraction job asks a scheduler for: host memory and a time limit, from the model's size on disk
and the shard's size. Sites override them per model in their profile; these are the defaults that work
without a first run to measure from."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlmstates.settings import ALL_LAYERS, DEFAULT_LAYER_COUNT

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# A checkpoint whose size cannot be read (a hub id not in the local cache) is taken to be this big:
# Gemma-3-12B in bf16, the largest of the seed models.
UNKNOWN_CHECKPOINT_BYTES = 24 * 10**9
# torch, CUDA's host-side context and the processor, before any weight is loaded.
BASE_MEMORY_MB = 4000
# Seconds per question outside decoding: image decoding, preprocessing, prefill, writing.
SECONDS_PER_QUESTION = 0.2
# A greedy decoding step reads every weight once: ~2 ms per GB of weights on an A100/H100 through
# transformers' generate (16 GB, a 7B model in bf16 -> ~0.03 s a step).
DECODE_SECONDS_PER_GB = 0.002
LOAD_MINUTES = 10
SAFETY_FACTOR = 2
# `layers: all` of a checkpoint whose config.json cannot be read yet (a tiny one still to be built): the
# most decoder blocks of the seed models (Gemma-3-12B's 48).
UNKNOWN_DECODER_BLOCKS = 48


def checkpoint_bytes(model: str, revision: str | None = None) -> int:
    """Size of the weights: the files of a local folder, else the hub cache's shard index, else the default."""
    local = Path(model)
    if local.is_dir():
        return sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return _cached_index_total(model, revision) or UNKNOWN_CHECKPOINT_BYTES


def _cached_index_total(model: str, revision: str | None) -> int | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(model, "model.safetensors.index.json", revision=revision)
    except Exception:  # not a hub id, or no cache: the default applies
        return None
    if not isinstance(index, str):
        return None
    with open(index) as f:
        return json.load(f).get("metadata", {}).get("total_size")


def extraction_memory_mb(weights_bytes: int, shard_size: int, vectors_per_question: int, hidden_size: int) -> int:
    """Host memory: the weights pass through it while loading (x1.5), and the shard's vectors (float32)
    stay in it until the shard is written (x3: the results, the progress copy and the output buffer)."""
    weights_mb = weights_bytes / 1e6
    vectors_mb = shard_size * vectors_per_question * hidden_size * 4 / 1e6
    return math.ceil(BASE_MEMORY_MB + 1.5 * weights_mb + 3 * vectors_mb)


def extraction_runtime_minutes(weights_bytes: int, shard_size: int, max_new_tokens: int, batch_size: int) -> int:
    """A time limit twice the expected time of loading plus the shard's questions, in minutes."""
    step_seconds = DECODE_SECONDS_PER_GB * weights_bytes / 1e9
    per_question = SECONDS_PER_QUESTION + max_new_tokens * step_seconds / max(1, batch_size)
    return math.ceil(SAFETY_FACTOR * (LOAD_MINUTES + shard_size * per_question / 60))


def recorded_layer_count(layers, checkpoint_config: dict | None) -> int:
    """How many decoder blocks a model entry's `layers` records: five by default (default_layers; fewer
    only for very shallow models), every block for `all`, else as many as listed."""
    if layers is None:
        return DEFAULT_LAYER_COUNT
    if layers == ALL_LAYERS:
        blocks = decoder_blocks_of(checkpoint_config) if checkpoint_config else None
        return blocks or UNKNOWN_DECODER_BLOCKS
    return len(layers)


def decoder_blocks_of(checkpoint_config: dict) -> int | None:
    """The decoder's number of blocks, from the text sub-config or the top level (OLMo-style n_layers too)."""
    for config in (checkpoint_config.get("text_config") or {}, checkpoint_config):
        for key in ("num_hidden_layers", "n_layers", "num_layers"):
            if config.get(key):
                return int(config[key])
    return None


def vectors_per_question(num_layers: int, multimodal: bool, paper_positions: bool = False) -> int:
    """VF, plus VT and QT per layer, plus MM and the paper-position VT per layer when recorded."""
    return 1 + num_layers * (2 + multimodal + paper_positions)


def hidden_size_of(checkpoint_config: dict) -> int:
    """The decoder's width, from the top level or the text sub-config; 4096 when neither says."""
    text = checkpoint_config.get("text_config") or {}
    return int(
        text.get("hidden_size") or checkpoint_config.get("hidden_size") or checkpoint_config.get("d_model") or 4096
    )
