"""Out of device memory costs time, not data: the failed attempt's memory is freed before a retry, an OOM is
never a failed row, and the job ends for a retry at half the batch size, keeping what it had done.

Driven on CPU by raising torch.OutOfMemoryError from the model's forward (the `oom_above:<n>` failpoint,
or a hook that also keeps weak references to the failed attempt's tensors).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import weakref

import pytest
import torch
from test_resume import MERGED, SNAKEMAKE, small_workdir

from vlmstates.dataset import read_validated_table
from vlmstates.errors import EXIT_RESTART, DeviceFailed, OutOfDeviceMemory
from vlmstates.extraction.engine import Extractor, configure_cuda_allocator, load_model
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.extraction.shards import (
    OUT_OF_MEMORY_RECORD,
    batch_size_for_attempt,
    extract_shard,
    progress_folder,
    questions_of,
)
from vlmstates.settings import ModelSettings
from vlmstates.store import BATCH_SIZE_COLUMN, STATUS_OK, read_embeddings, read_results


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    settings = ModelSettings.from_config(
        "tiny", {"model": str(tiny_checkpoint("qwen2_5_vl")), "max_new_tokens": 2, "batch_size": 4}
    )
    return load_model(settings)


@pytest.fixture
def questions(demo):
    table, images = demo
    return questions_of(read_validated_table(table).head(8)), images


def test_a_lone_sample_is_retried_once_with_nothing_of_the_failed_attempt_alive(loaded, questions, monkeypatch):
    qs, images = questions
    extractor = Extractor(loaded, progress=False, batch_size=1)
    last = extractor.adapter.decoder_blocks(loaded.model)[-1]
    failed_attempt: list[weakref.ref] = []
    alive_at_retry: list[list[int]] = []
    execute = Extractor._execute

    def checked(self, batch_questions, prepared):  # the retry starts: what of the failed attempt is alive?
        if failed_attempt:
            gc.collect()  # only what is still referenced survives
            alive_at_retry.append([i for i, ref in enumerate(failed_attempt) if ref() is not None])
        return execute(self, batch_questions, prepared)

    def fail_once(module, args, output):  # the first forward fails in its last block, its vectors captured
        if not failed_attempt:
            hidden = output[0] if isinstance(output, tuple) else output
            failed_attempt.extend(weakref.ref(t) for t in (args[0], hidden, *extractor.capture._captured.values()))
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(Extractor, "_execute", checked)
    with forward_hooks(after=[(last, fail_once)]):
        results = extractor.extract(qs[:1], images)
    # activations and the vectors captured from the failed prefill (the host batch, which on CPU is also
    # the "device" batch, is kept for the retry on purpose, so it is not tracked)
    assert len(failed_attempt) > 2
    assert alive_at_retry == [[]]
    assert results[0].status == STATUS_OK and results[0].batch_size == 1


def test_a_batch_out_of_memory_ends_the_job_instead_of_failing_its_rows(loaded, questions, monkeypatch):
    qs, images = questions
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:2")
    with pytest.raises(OutOfDeviceMemory) as raised:
        Extractor(loaded, progress=False, batch_size=4).extract(qs, images)
    assert raised.value.batch_size == 4
    ran = Extractor(loaded, progress=False, batch_size=2).extract(qs, images)
    assert all(r.status == STATUS_OK and r.batch_size == 2 for r in ran)


def test_a_lone_sample_that_still_does_not_fit_ends_the_job_after_one_retry(loaded, questions, monkeypatch):
    qs, images = questions
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:0")
    forwards = []
    extractor = Extractor(loaded, progress=False, batch_size=1)
    block = extractor.adapter.decoder_blocks(loaded.model)[0]
    with block.register_forward_pre_hook(lambda module, args: forwards.append(1)), pytest.raises(OutOfDeviceMemory):
        extractor.extract(qs[:2], images)
    assert len(forwards) == 2  # the first sample, then its one retry; the second sample never ran


def test_a_cuda_error_ends_the_job_instead_of_failing_the_rest(loaded, questions, monkeypatch):
    qs, images = questions
    calls = []

    def poisoned(self, batch_questions, prepared):
        calls.append(len(batch_questions))
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Extractor, "_execute", poisoned)
    with pytest.raises(DeviceFailed, match="illegal memory access"):
        Extractor(loaded, progress=False, batch_size=4).extract(qs, images)
    assert calls == [4]  # not split down to failed samples


@pytest.mark.parametrize(
    "configured, attempt, ran_out_at, expected",
    [(8, 1, None, 8), (8, 2, None, 4), (8, 2, 8, 4), (8, 2, 2, 1), ("auto", 2, None, "auto"), ("auto", 2, 32, 16)],
)
def test_the_retry_halves_the_batch_that_ran_out_of_memory_auto_included(configured, attempt, ran_out_at, expected):
    assert batch_size_for_attempt(configured, attempt, ran_out_at) == expected


def test_the_retry_keeps_the_samples_done_before_the_out_of_memory(loaded, demo, tmp_path, monkeypatch):
    """The second batch runs out of memory: the first is saved, and the retry (attempt 2, half the batch
    that ran out, `auto` included) computes only the rest."""
    table, images = demo
    # auto on CPU: batches of 8
    settings = ModelSettings.from_config(
        "tiny", {"model": loaded.settings.model, "max_new_tokens": 2, "batch_size": "auto"}
    )
    out = tmp_path / "shard_0000.h5"
    executed = []
    execute = Extractor._execute

    def second_batch_too_large(self, batch_questions, prepared):
        executed.append(len(batch_questions))
        if executed == [8, 8]:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return execute(self, batch_questions, prepared)

    monkeypatch.setattr(Extractor, "_execute", second_batch_too_large)
    with pytest.raises(OutOfDeviceMemory):
        extract_shard(settings, table, images, 0, 24, out, save_every=1)
    folder = progress_folder(out)
    assert json.loads((folder / OUT_OF_MEMORY_RECORD).read_text()) == {"batch_size": 8}
    assert sum(len(read_results(p)) for p in folder.glob("part_*.h5")) == 8
    executed.clear()
    extract_shard(settings, table, images, 0, 24, out, save_every=1, attempt=2)
    assert executed == [4, 4, 4, 4]  # the 16 not done, in batches of half the 8 that ran out
    shard = read_embeddings(out)
    assert (shard.table["status"] == STATUS_OK).all()
    assert sorted(shard.table[BATCH_SIZE_COLUMN].tolist()) == [4] * 16 + [8] * 8


@pytest.mark.slow
def test_the_workflow_retries_an_out_of_memory_job_with_half_the_batch(tmp_path):
    """Batch size 4 and a GPU that fits 2 rows: each shard's first attempt ends with EXIT_RESTART, its
    retry runs batches of 2, and every sample is ok."""
    workdir = small_workdir(tmp_path)
    env = {**os.environ, "VLMSTATES_FAILPOINT": "oom_above:2"}
    result = subprocess.run(
        SNAKEMAKE + ["-d", str(workdir), MERGED], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = read_embeddings(workdir / MERGED)
    assert (merged.table["status"] == STATUS_OK).all() and len(merged.table) == 16
    assert (merged.table[BATCH_SIZE_COLUMN] == 2).all()
    assert f"exit status {EXIT_RESTART}" in result.stderr or f"exit code {EXIT_RESTART}" in result.stderr


# -- the CUDA allocator: expandable segments unless the user chose ----------------------------------------
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


@pytest.fixture
def fresh_cuda(monkeypatch):
    """A process where CUDA is not yet initialised and no allocator variable is set (torch.cuda patched)."""
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.setenv(name, "")  # so that monkeypatch restores what was there, a load's setting included
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)


def test_the_allocator_gets_expandable_segments_when_the_user_set_none(fresh_cuda):
    environ: dict[str, str] = {}
    assert "set by vlmstates" in configure_cuda_allocator(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("name", ALLOCATOR_VARIABLES)
def test_the_users_allocator_settings_are_kept(fresh_cuda, name):
    environ = {name: "max_split_size_mb:512"}
    assert configure_cuda_allocator(environ) == f"{name}=max_split_size_mb:512 (from the environment)"
    assert environ == {name: "max_split_size_mb:512"}


def test_an_allocator_already_in_use_is_left_with_a_warning(fresh_cuda, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late: torch read its settings
    environ: dict[str, str] = {}
    assert "already initialised" in configure_cuda_allocator(environ)
    assert environ == {} and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in caplog.text


def test_a_cuda_load_sets_the_allocator_before_the_weights_arrive(fresh_cuda, tiny_checkpoint, monkeypatch):
    """load_model configures the allocator before from_pretrained touches the GPU; a CPU load leaves the
    environment alone (this machine has no GPU: the adapter's load is replaced by one that records)."""
    from vlmstates.extraction import engine
    from vlmstates.extraction.adapters import adapter_for_family

    seen = []

    def record_the_environment(settings, device, dtype, attention):
        seen.append((device.type, os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
        raise LookupError("stop before loading")

    adapter = adapter_for_family("qwen2_5_vl")
    adapter.load = record_the_environment
    monkeypatch.setattr(engine, "adapter_for_family", lambda family: adapter)
    config = {"model": str(tiny_checkpoint("qwen2_5_vl"))}
    for device in ("cpu", "cuda"):
        with pytest.raises(LookupError):
            load_model(ModelSettings.from_config("tiny", {**config, "device": device}))
    assert seen == [("cpu", None), ("cuda", "expandable_segments:True")]


def test_the_benchmark_and_the_device_check_measure_with_the_jobs_allocator(fresh_cuda, monkeypatch):
    """Both name the GPU before any model loads, which initialises CUDA: the allocator is set before that,
    and their records say which setting the figures ran with."""
    import importlib

    from helpers import REPO

    from vlmstates.extraction.benchmark import environment

    seen_when_naming = []

    def name_the_gpu(device=None):
        seen_when_naming.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        return "a GPU"

    monkeypatch.setattr(torch.cuda, "get_device_name", name_the_gpu)
    machine = environment(torch.device("cuda"), torch.bfloat16)["machine"]
    assert machine["allocator"] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by vlmstates)"

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    device_check = importlib.import_module("device_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 2**34}))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    seen = device_check.cuda_seen()
    assert seen["allocator"] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set by vlmstates)"
    assert seen_when_naming == ["expandable_segments:True"] * 3
