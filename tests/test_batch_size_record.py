"""The batch size `auto` found is kept per GPU type and settings, and reused by later jobs without a search.

On CPU: the search is switched on (batching.searches_batch_size), the GPU's name and memory are given
(batch_size_record.device_identity), and the `oom_above:<n>` failpoint is a GPU that fits n rows. A probe is
the engine's generate() that decodes every answer to max_new_tokens (`full_length`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from dataclasses import replace

import pytest
import torch
from oracle import assert_same_results

from vlmstates import cli
from vlmstates.demo.dataset import demo_questions
from vlmstates.errors import OutOfDeviceMemory
from vlmstates.extraction import batch_size_record, batching
from vlmstates.extraction.batch_size_record import BatchSizeRecord
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import extract_shard
from vlmstates.settings import ModelSettings
from vlmstates.store import BATCH_SIZE_COLUMN, STATUS_OK, read_embeddings

MAX_NEW_TOKENS = 3
H100 = ("NVIDIA H100 80GB HBM3", 85_045_510_144)
A100 = ("NVIDIA A100-SXM4-40GB", 42_298_834_944)


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    """Tiny Qwen2.5-VL with `batch_size: auto`, and 10 questions of mixed prompt lengths."""
    settings = ModelSettings.from_config(
        "tiny",
        {"model": str(tiny_checkpoint("qwen2_5_vl")), "max_new_tokens": MAX_NEW_TOKENS, "batch_size": "auto"},
    )
    images = tmp_path_factory.mktemp("record-images")
    questions = demo_questions(images, 10, [(96, 64), (640, 480), (64, 128), (300, 200)], seed=2)
    return load_model(settings), questions, images


@pytest.fixture
def gpu(monkeypatch):
    """A searched device (CUDA's behaviour) whose name and memory the test sets: gpu(H100)."""
    monkeypatch.setattr(batching, "searches_batch_size", lambda device: True)

    def on(identity):
        monkeypatch.setattr(batch_size_record, "device_identity", lambda device: identity)

    on(H100)
    return on


@pytest.fixture
def generate_calls(monkeypatch):
    """(rows, full length) of every generate() call of the engine; full length: the search's probe."""
    generate = Extractor._generate
    calls = []

    def spy(self, batch, full_length=False):
        calls.append((batch.input_ids.shape[0], full_length))
        return generate(self, batch, full_length)

    monkeypatch.setattr(Extractor, "_generate", spy)
    return calls


def probes(calls) -> list[int]:
    return [rows for rows, full_length in calls if full_length]


def run(model, record, **options):
    loaded, questions, images = model
    extractor = Extractor(loaded, progress=False, batch_size_record=record, **options)
    results = extractor.extract(questions, images)
    assert all(r.status == STATUS_OK for r in results), [r.error for r in results]
    return extractor, results


def entries(record) -> list[dict]:
    return list(json.loads(record.read_text()).values())


def test_a_searched_size_is_recorded_with_its_gpu_and_settings(model, gpu, generate_calls, tmp_path, monkeypatch):
    record = tmp_path / "batch_sizes.json"
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    extractor, _ = run(model, record)
    assert probes(generate_calls) == [10, 5] and extractor.batch_size == 3  # 5 fits, 3 keeps the margin
    [entry] = entries(record)
    loaded, questions, images = model
    longest = batching.longest_prompt(batching.sort_keys(loaded, questions, images))
    assert entry["batch_size"] == 3 and entry["longest_prompt"] == longest > 0
    assert (entry["device"], entry["total_memory"]) == H100
    assert entry["config_hash"] == loaded.settings.config_hash() and entry["how"] == "search"


def test_a_recorded_size_is_used_without_a_probe(model, gpu, generate_calls, tmp_path, monkeypatch, caplog):
    record = tmp_path / "batch_sizes.json"
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    run(model, record)
    generate_calls.clear()
    with caplog.at_level(logging.INFO, logger="vlmstates.extraction.batching"):
        extractor, results = run(model, record)
    assert probes(generate_calls) == [] and extractor.batch_size == 3
    assert any("recorded in" in m and str(record) in m and "not searched" in m for m in caplog.messages)
    monkeypatch.delenv("VLMSTATES_FAILPOINT")
    _, fixed = run(model, None, batch_size=3)
    assert_same_results(results, fixed, exact=True)


def test_an_out_of_memory_lowers_the_record_so_the_next_job_does_not_repeat_it(
    model, gpu, generate_calls, tmp_path, monkeypatch
):
    record = tmp_path / "batch_sizes.json"
    loaded, questions, images = model
    longest = batching.longest_prompt(batching.sort_keys(loaded, questions, images))
    BatchSizeRecord(record, loaded.device, loaded.settings).found(8, longest)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:4")  # the GPU fits less than the record says
    with pytest.raises(OutOfDeviceMemory) as raised:
        Extractor(loaded, progress=False, batch_size_record=record).extract(questions, images)
    assert raised.value.batch_size == 8 and probes(generate_calls) == []
    [entry] = entries(record)
    assert (entry["batch_size"], entry["how"], entry["longest_prompt"]) == (4, "out of memory", longest)
    # the job's retry runs at half the batch that ran out (shards.batch_size_for_attempt); out of memory
    # again, it lowers the record again
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:1")
    with pytest.raises(OutOfDeviceMemory):
        Extractor(loaded, progress=False, batch_size=4, batch_size_record=record).extract(questions, images)
    assert entries(record)[0]["batch_size"] == 2
    monkeypatch.delenv("VLMSTATES_FAILPOINT")
    extractor, _ = run(model, record)
    assert probes(generate_calls) == [] and extractor.batch_size == 2


def test_a_corrupt_record_is_searched_again_and_replaced(model, gpu, generate_calls, tmp_path, monkeypatch, caplog):
    record = tmp_path / "batch_sizes.json"
    record.write_text('{"NVIDIA H100 80GB HBM3 | 85045510144 bytes | ')  # a writer's half file
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    with caplog.at_level(logging.WARNING, logger="vlmstates.extraction.batch_size_record"):
        extractor, _ = run(model, record)
    assert probes(generate_calls) == [10, 5] and extractor.batch_size == 3
    assert any(str(record) in m and "cannot be read" in m for m in caplog.messages)
    assert [e["batch_size"] for e in entries(record)] == [3]
    # an entry that does not hold a batch size: searched again too
    [(key, entry)] = json.loads(record.read_text()).items()
    record.write_text(json.dumps({key: {**entry, "batch_size": "many"}}))
    generate_calls.clear()
    run(model, record)
    assert probes(generate_calls) == [10, 5]


def test_a_record_that_cannot_be_written_costs_a_warning_not_the_job(model, gpu, tmp_path, monkeypatch, caplog):
    (tmp_path / "not_a_folder").write_text("")
    record = tmp_path / "not_a_folder" / "batch_sizes.json"
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    with caplog.at_level(logging.WARNING, logger="vlmstates.extraction.batch_size_record"):
        extractor, _ = run(model, record)
    assert extractor.batch_size == 3
    assert any(str(record) in m and "cannot be written" in m for m in caplog.messages)


@pytest.mark.parametrize("change", ["gpu", "settings"])
def test_another_gpu_type_or_other_settings_do_not_reuse_the_size(
    model, gpu, generate_calls, tmp_path, monkeypatch, change
):
    record = tmp_path / "batch_sizes.json"
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    run(model, record)
    generate_calls.clear()
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:2")  # the other GPU (or the longer answers) fits fewer
    loaded, questions, images = model
    if change == "gpu":
        gpu(A100)
        other = model
    else:
        other = (
            replace(loaded, settings=replace(loaded.settings, max_new_tokens=MAX_NEW_TOKENS + 1)),
            questions,
            images,
        )
    extractor, _ = run(other, record)
    assert probes(generate_calls)[:2] == [10, 5] and extractor.batch_size == 1  # 2 fits; 3/4 of it is 1
    assert sorted(e["batch_size"] for e in entries(record)) == [1, 3]  # both kept


def test_a_configured_batch_size_never_reads_or_writes_the_record(model, gpu, generate_calls, tmp_path, monkeypatch):
    record = tmp_path / "batch_sizes.json"
    loaded, questions, images = model
    fixed = replace(loaded, settings=replace(loaded.settings, batch_size=4))
    run((fixed, questions, images), record)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:2")
    with pytest.raises(OutOfDeviceMemory):
        Extractor(fixed, progress=False, batch_size_record=record).extract(questions, images)
    assert not record.exists() and probes(generate_calls) == []


def test_a_shard_with_longer_prompts_searches_again_from_the_recorded_size(
    model, gpu, generate_calls, tmp_path, monkeypatch
):
    record = tmp_path / "batch_sizes.json"
    loaded, questions, images = model
    longest = batching.longest_prompt(batching.sort_keys(loaded, questions, images))
    BatchSizeRecord(record, loaded.device, loaded.settings).found(8, longest - 1)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:6")
    extractor, _ = run(model, record)
    assert probes(generate_calls) == [8, 4] and extractor.batch_size == 3  # from 8, not from 10
    [entry] = entries(record)
    assert (entry["batch_size"], entry["longest_prompt"]) == (3, longest)


def test_a_job_taking_turns_checks_each_shards_prompts_against_the_record(
    model, gpu, generate_calls, tmp_path, monkeypatch
):
    """One loaded model, two shards (vlmstates.extraction.turns): the second's longer prompts search again
    from the size the first found, instead of running at it unchecked."""
    record = tmp_path / "batch_sizes.json"
    loaded, questions, images = model
    keys = batching.sort_keys(loaded, questions, images)
    by_length = sorted(range(len(questions)), key=lambda i: keys[i].length if keys[i] else 0)
    short, long = [questions[i] for i in by_length[:6]], [questions[i] for i in by_length[4:]]
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:4")
    extractor = Extractor(loaded, progress=False, batch_size_record=record)
    extractor.extract(short, images)
    assert probes(generate_calls) == [6, 3]
    generate_calls.clear()
    extractor.extract(long, images)
    assert probes(generate_calls) == [2]  # longer prompts: the search again, from the recorded size


def test_a_size_that_only_the_shard_limits_is_not_recorded(model, gpu, generate_calls, tmp_path, monkeypatch):
    """Three questions fit in one batch of three: that says nothing of the batch the GPU fits."""
    record = tmp_path / "batch_sizes.json"
    loaded, questions, images = model
    Extractor(loaded, progress=False, batch_size_record=record).extract(questions[:3], images)
    assert probes(generate_calls) == [3] and not record.exists()


def test_prefill_only_keeps_the_probed_batch_instead_of_running_it_again(model, gpu, generate_calls, monkeypatch):
    """Without answers the probe is a normal run of its batch (no answer decoded to full length)."""
    loaded, questions, images = model
    prefill_only = replace(loaded, settings=replace(loaded.settings, answers=False))
    extractor, results = run((prefill_only, questions, images), None)
    assert extractor.batch_size == 10 and [rows for rows, _ in generate_calls] == [10]
    _, fixed = run((prefill_only, questions, images), None, batch_size=10)
    assert_same_results(results, fixed, exact=True)
    assert [r.batch_size for r in results] == [10] * 10


def test_the_shards_of_a_model_share_the_record(model, gpu, generate_calls, demo, tmp_path, monkeypatch):
    """The first shard's job searches and records; the next shard's job (its own model load) reuses it."""
    table, images = demo
    loaded, _, _ = model
    record = tmp_path / "shards" / "batch_sizes.json"
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")
    for shard in (0, 1):
        extract_shard(
            loaded.settings,
            table,
            images,
            shard,
            8,
            tmp_path / "shards" / f"shard_{shard}.h5",
            batch_size_record=record,
        )
    assert probes(generate_calls) == [8, 4]  # the first shard's search only; 4 fits, 3 keeps the margin
    assert [e["batch_size"] for e in entries(record)] == [3]
    assert set(read_embeddings(tmp_path / "shards" / "shard_1.h5").table[BATCH_SIZE_COLUMN]) <= {1, 2, 3}


def test_extract_shard_takes_the_record_from_its_flag(monkeypatch):
    calls = []
    monkeypatch.setattr("vlmstates.workflow.gpu_lease.lease_gpu", lambda **kw: None)
    monkeypatch.setattr("vlmstates.extraction.shards.extract_shard", lambda *args, **kw: calls.append(kw))
    common = ["extract-shard", "--settings", '{"name": "m", "model": "x"}', "--table", "t", "--images", "i"]
    common += ["--shard", "0", "--shard-size", "4", "--out", "o.h5"]
    assert cli.main([*common, "--batch-size-record", "results/m/shards/batch_sizes.json"]) == 0
    assert cli.main(common) == 0
    assert [kw["batch_size_record"] for kw in calls] == ["results/m/shards/batch_sizes.json", None]


def _lower_many_times(path, name: str, times: int) -> None:
    settings = ModelSettings.from_config(name, {"model": name})
    batch_size_record.device_identity = lambda device: H100
    record = BatchSizeRecord(path, torch.device("cuda"), settings)
    for size in range(times, 0, -1):
        record.ran_out_of_memory(2 * size, 100)


def test_jobs_writing_at_once_lose_no_entry(tmp_path):
    record = tmp_path / "batch_sizes.json"
    names = [f"model_{i}" for i in range(6)]
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_lower_many_times, args=(record, name, 30)) for name in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * len(names)
    assert sorted(e["model"] for e in entries(record)) == names
    assert {e["batch_size"] for e in entries(record)} == {1}
