"""The benchmark script runs and reports every field (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

import vlmstates.extraction.benchmark as benchmark
from vlmstates.extraction.benchmark import FULL_SIZE, build_full_size, parameter_count, with_ratios
from vlmstates.settings import ModelSettings

RESULT_FIELDS = {
    "record",
    "status",
    "failed_samples",
    "first_sample_error",
    "lm_params",
    "vision_params",
    "attn_implementation",
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
    out = tmp_path / "bench.jsonl"
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
        "--out",
        str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "samples/s" in run.stdout and "halp_loop" in run.stdout

    header, *lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["record"] == "run"
    assert {"machine", "versions", "device", "dtype", "command", "settings"} <= set(header)
    assert {"torch", "transformers"} <= set(header["versions"])
    assert [(r["method"], r["batch_size"]) for r in lines] == [
        ("engine", 1),
        ("engine", 2),
        ("prefill_only", 1),
        ("prefill_only", 2),
        ("halp_loop", 1),
    ]
    results = with_ratios(lines)
    for r in results:
        assert RESULT_FIELDS <= set(r), RESULT_FIELDS - set(r)
        assert r["status"] == "ok" and r["failed_samples"] == 0 and r["attn_implementation"] == "sdpa"
        assert r["lm_params"] > 0 and r["vision_params"] > 0
        assert set(r["breakdown_s"]) == STAGES
        assert r["samples"] == 3 and r["prompt_tokens"] > 0 and r["vision_tokens"] > 0
        assert r["samples_per_s"] > 0 and r["prefill_tflop"] > 0 and r["roofline_share"] is not None
    assert [r["speedup_vs_engine"] for r in results[:2]] == [1.0, 1.0] and results[-1]["speedup_vs_engine"] is None
    assert results[-1]["speedup_vs_halp_loop"] == 1.0
    # the engine, prefill-only and the loop saw the same inputs: the same prompt and vision tokens
    assert len({(r["prompt_tokens"], r["vision_tokens"]) for r in results}) == 1


def test_quick_preset_saves_each_configuration_records_failures_and_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    """The quick preset on a tiny checkpoint: batch 32 runs out of memory (the oom_above failpoint) and one
    image is unreadable; the run goes on, saves every configuration with its failure or its failed sample,
    and a --resume reruns only the failed configurations."""
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "tiny-qwen2_5_vl").symlink_to(tiny_checkpoint("qwen2_5_vl"))
    make_inputs = benchmark.synthetic_inputs

    def one_unreadable_image(root, n, sizes, seed):
        questions = make_inputs(root, n, sizes, seed)
        (root / questions[1].image_id).write_bytes(b"not a JPEG")
        return questions

    monkeypatch.setattr(benchmark, "synthetic_inputs", one_unreadable_image)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:1")
    out = tmp_path / "quick.jsonl"
    argv = ["--preset", "quick", "--models", "tiny", "--device", "cpu", "--families", "qwen2_5_vl"]
    argv += ["--samples", "3", "--halp-samples", "3", "--new-tokens", "2", "--workdir", str(work), "--out", str(out)]
    rows = benchmark.main(argv)

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["record"] for r in lines] == ["run"] + ["configuration"] * 5
    assert lines[0]["settings"]["batch_sizes"] == [1, 32] and lines[0]["settings"]["models"] == "tiny"
    status = {(r["method"], r["batch_size"]): r["status"] for r in lines[1:]}
    assert status == {
        ("engine", 1): "ok",
        ("engine", 32): "failed",
        ("prefill_only", 1): "ok",
        ("prefill_only", 32): "failed",
        ("halp_loop", 1): "ok",
    }
    for r in lines[1:]:
        if r["status"] == "failed":
            assert "OutOfDeviceMemory" in r["error"] and "oom_above:1" in r["error"]
        else:  # the unreadable image is counted in the row, not an abort
            assert r["failed_samples"] == 1 and r["first_sample_error"] and r["samples"] == 3
    assert [r["status"] for r in rows] == [status[(r["method"], r["batch_size"])] for r in rows]
    assert [r["speedup_vs_engine"] for r in rows if r["method"] == "prefill_only"][0] > 0
    assert benchmark.format_table(rows).count("FAILED: OutOfDeviceMemory") == 2

    monkeypatch.delenv("VLMSTATES_FAILPOINT")
    rows = benchmark.main([*argv, "--resume"])
    run, *rerun = [json.loads(line) for line in out.read_text().splitlines()[len(lines) :]]
    assert run["record"] == "run"  # only the failed configurations ran again
    assert [(r["method"], r["batch_size"], r["status"]) for r in rerun] == [
        ("engine", 32, "ok"),
        ("prefill_only", 32, "ok"),
    ]
    assert [r["status"] for r in rows] == ["ok"] * 5

    with pytest.raises(SystemExit, match="new_tokens"):  # a resume must measure what the file holds
        benchmark.main([*argv, "--resume", "--new-tokens", "3"])


def test_each_decoding_is_a_configuration_and_a_failed_compile_is_its_recorded_failure(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """--decodings: the engine once per decoding (engine_static beside engine, with its ratio to it); where
    torch.compile fails (no C compiler, say), engine_static_compiled is recorded failed, with the key to
    change, after the first batch (not sample after sample), and the next configuration runs."""
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "tiny-qwen2_5_vl").symlink_to(tiny_checkpoint("qwen2_5_vl"))
    attempts = []

    def compile_that_fails(function, **options):
        def compiled(*args, **kwargs):
            attempts.append(1)
            raise torch._dynamo.exc.TorchDynamoException("no C compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    argv = ["--families", "qwen2_5_vl", "--device", "cpu", "--samples", "4", "--batch-sizes", "2", "--repeats", "1"]
    argv += ["--new-tokens", "2", "--decodings", "dynamic", "static", "static_compiled"]
    rows = benchmark.main([*argv, "--halp-samples", "1", "--workdir", str(work), "--out", str(tmp_path / "d.jsonl")])
    status = {r["method"]: r["status"] for r in rows}
    assert status == {
        "engine": "ok",
        "engine_static": "ok",
        "engine_static_compiled": "failed",
        "prefill_only": "ok",
        "halp_loop": "ok",
    }
    static, compiled = (next(r for r in rows if r["method"] == m) for m in ("engine_static", "engine_static_compiled"))
    assert static["failed_samples"] == 0 and static["speedup_vs_engine"] > 0
    assert "CompileFailed" in compiled["error"] and "models.qwen2_5_vl.decoding: static_compiled" in compiled["error"]
    assert "no C compiler" in compiled["error"]
    assert len(attempts) == 2  # the warm-up's first batch, then the configuration's: no sample-by-sample retry
    assert "FAILED: CompileFailed" in benchmark.format_table(rows)


# Parameters of the published checkpoints (Phi-4: without its vision and speech LoRAs).
PUBLISHED_PARAMETERS = {"qwen2_5_vl": 8.29e9, "gemma3": 12.19e9, "phi4_multimodal": 4.74e9}


@pytest.mark.parametrize("family", sorted(FULL_SIZE))
def test_full_size_architectures_have_the_published_sizes(family):
    """Built on the meta device (no memory, no weights): the dimensions give the real model's size."""
    settings = ModelSettings(name=family, model=f"random {FULL_SIZE[family].checkpoint}")
    loaded = build_full_size(family, torch.device("meta"), torch.bfloat16, settings)
    assert parameter_count(loaded.model) == pytest.approx(PUBLISHED_PARAMETERS[family], rel=0.01)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
