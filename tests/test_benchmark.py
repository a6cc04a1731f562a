"""The benchmark script runs and reports every field (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from vlmstates.extraction.benchmark import FULL_SIZE, build_full_size, parameter_count
from vlmstates.settings import ModelSettings

RESULT_FIELDS = {
    "family",
    "model",
    "method",
    "batch_size",
    "samples",
    "repeats",
    "samples_per_s",
    "samples_per_s_runs",
    "speedup_vs_halp_loop",
    "speedup_vs_engine",
    "seconds",
    "prompt_tokens",
    "prompt_tokens_per_s",
    "padding_share",
    "vision_tokens",
    "prefill_tflop",
    "prefill_tflops",
    "roofline_share",
    "peak_memory_mb",
    "breakdown_s",
}
STAGES = {"preprocess", "preprocess_wait", "prefill", "decode", "write"}


def test_benchmark_script_on_a_tiny_checkpoint_writes_every_field(tiny_checkpoint, tmp_path):
    checkpoints = tmp_path / "work" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "tiny-qwen2_5_vl").symlink_to(tiny_checkpoint("qwen2_5_vl"))
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        "--families",
        "qwen2_5_vl",
        "--device",
        "cpu",
        "--samples",
        "3",
        "--batch-sizes",
        "1",
        "2",
        "--repeats",
        "1",
        "--new-tokens",
        "2",
        "--peak-tflops",
        "1.0",
        "--workdir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples/s" in run.stdout and "halp_loop" in run.stdout

    report = json.loads(out.read_text())
    assert {"machine", "versions", "device", "dtype", "command", "settings", "families"} <= set(report)
    assert {"torch", "transformers"} <= set(report["versions"])
    (family,) = report["families"]
    assert family["lm_params"] > 0 and family["vision_params"] > 0 and family["attn_implementation"] == "sdpa"
    results = family["results"]
    assert [(r["method"], r["batch_size"]) for r in results] == [
        ("engine", 1),
        ("engine", 2),
        ("prefill_only", 1),
        ("prefill_only", 2),
        ("halp_loop", 1),
    ]
    for r in results:
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert set(r["breakdown_s"]) == STAGES
        assert r["samples"] == 3 and r["prompt_tokens"] > 0 and r["vision_tokens"] > 0
        assert r["samples_per_s"] > 0 and r["prefill_tflop"] > 0 and r["roofline_share"] is not None
    assert [r["speedup_vs_engine"] for r in results[:2]] == [1.0, 1.0] and results[-1]["speedup_vs_engine"] is None
    # the engine, prefill-only and the loop saw the same inputs: the same prompt and vision tokens
    assert len({(r["prompt_tokens"], r["vision_tokens"]) for r in results}) == 1


# Parameters of the published checkpoints (Phi-4: without its vision and speech LoRAs).
PUBLISHED_PARAMETERS = {"qwen2_5_vl": 8.29e9, "gemma3": 12.19e9, "phi4_multimodal": 4.74e9}


@pytest.mark.parametrize("family", sorted(FULL_SIZE))
def test_full_size_architectures_have_the_published_sizes(family):
    """Built on the meta device (no memory, no weights): the dimensions give the real model's size."""
    settings = ModelSettings(name=family, model=f"random {FULL_SIZE[family].checkpoint}")
    loaded = build_full_size(family, torch.device("meta"), torch.bfloat16, settings)
    assert parameter_count(loaded.model) == pytest.approx(PUBLISHED_PARAMETERS[family], rel=0.01)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
