"""Preprocessing in worker processes (vlmstates.extraction.preparing): the same prepared batches as in line,
errors recorded per sample as in line, a worker's death a clear error, and the extraction rule's threads
reaching the job and its workers.

On CPU with the tiny checkpoints; the first pool of workers starts the forkserver (torch imported once).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from oracle import assert_same_results
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates import cli
from vlmstates.extraction.batching import plan_batches, sort_keys
from vlmstates.extraction.benchmark import synthetic_inputs
from vlmstates.extraction.engine import BatchPreparer, Extractor, load_model, untimed
from vlmstates.extraction.preparing import PreprocessWorkerError
from vlmstates.settings import ConfigError, ExtractionSettings, ModelSettings, preprocess_workers_for
from vlmstates.store import STATUS_FAILED, STATUS_OK

# a family whose batches are a subclass of Batch (the projector's row counts), and one with batch groups
FAMILIES = {"qwen2_5_vl": [(96, 64), (640, 480), (64, 128)], "phi4_multimodal": [(448, 448), (600, 300), (300, 200)]}
MISSING, BROKEN, TOO_LONG = 1, 4, 6  # samples that fail: no file, a truncated file, a prompt over the model's limit


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tiny_checkpoint, tmp_path_factory):
    family = request.param
    settings = ModelSettings.from_config(
        family, {"model": str(tiny_checkpoint(family)), "max_new_tokens": 2, "paper_positions": True}
    )
    images = tmp_path_factory.mktemp(f"images-{family}")
    questions = synthetic_inputs(images, 9, FAMILIES[family], seed=3)
    (images / questions[MISSING].image_id).unlink()
    broken = images / questions[BROKEN].image_id
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    loaded = load_model(settings)
    limit = loaded.adapter.max_prompt_tokens(loaded.model)
    questions[TOO_LONG] = replace(questions[TOO_LONG], question="why " * (limit + 10))
    return loaded, questions, images


def _one_family_shows_it(loaded) -> None:
    if loaded.adapter.family != "qwen2_5_vl":
        pytest.skip("the engine's handling does not depend on the family (its batches are compared above)")


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_tensors(a[key], b[key])
        elif torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _same_error(a: Exception | None, b: Exception | None) -> None:
    assert (type(a), str(a)) == (type(b), str(b))


def test_workers_prepare_the_same_batches_as_in_line(setup):
    loaded, questions, images = setup
    batches = plan_batches(sort_keys(loaded, questions, images), 3)
    inline = list(BatchPreparer(loaded, 0, untimed).ahead(batches, questions, images))
    workers = list(BatchPreparer(loaded, 0, untimed, workers=2).ahead(batches, questions, images))
    assert [indices for indices, _ in workers] == [indices for indices, _ in inline] == batches
    errors = 0
    for (_, got), (_, want) in zip(workers, inline):
        assert [None if i is None else i.tobytes() for i in got.images] == [
            None if i is None else i.tobytes() for i in want.images
        ]
        for a, b in zip(got.image_errors, want.image_errors):
            _same_error(a, b)
        _same_error(got.error, want.error)
        errors += sum(e is not None for e in got.image_errors) + (got.error is not None)
        assert (got.prepared is None) == (want.prepared is None)
        if want.prepared is not None:
            g, w = got.prepared, want.prepared
            assert type(g.batch) is type(w.batch)
            _same_tensors(g.batch.inputs, w.batch.inputs)
            _same_tensors(vars(g.batch), vars(w.batch))
            _same_tensors(vars(g.positions), vars(w.positions))
            assert g.paper_vision == w.paper_vision
    assert errors >= 3  # the missing file, the truncated one and the long prompt's batch failed both ways


def test_worker_errors_are_recorded_per_sample_as_in_line(setup):
    loaded, questions, images = setup
    _one_family_shows_it(loaded)
    inline = Extractor(loaded, progress=False, batch_size=3, prefetch=0).extract(questions, images)
    workers = Extractor(loaded, progress=False, batch_size=3, preprocess_workers=2).extract(questions, images)
    failed = [k for k, r in enumerate(workers) if r.status == STATUS_FAILED]
    assert failed == [MISSING, BROKEN, TOO_LONG]
    assert workers[MISSING].error.startswith("image:") and workers[BROKEN].error.startswith("image:")
    assert "exceeds the model's" in workers[TOO_LONG].error
    assert [r.error for r in workers] == [r.error for r in inline]
    assert sum(r.status == STATUS_OK for r in workers) == len(questions) - 3
    assert_same_results(workers, inline, exact=True)


def test_a_worker_that_dies_ends_the_extraction_with_a_clear_error(setup, monkeypatch):
    loaded, questions, images = setup
    _one_family_shows_it(loaded)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "preprocess-worker")  # the workers get the job's environment
    outcome = {}

    def extract():
        try:
            Extractor(loaded, progress=False, batch_size=3, preprocess_workers=1).extract(questions, images)
        except Exception as error:
            outcome["error"] = error

    runner = threading.Thread(target=extract, daemon=True)
    runner.start()
    runner.join(timeout=300)
    assert not runner.is_alive(), "the extraction hangs on a dead worker"
    assert isinstance(outcome.get("error"), PreprocessWorkerError), outcome
    assert "ended unexpectedly" in str(outcome["error"])


# -- settings, the rule and the job -----------------------------------------------------------------------
def test_workers_follow_the_jobs_threads_by_default():
    assert (ExtractionSettings.threads, ExtractionSettings.preprocess_workers) == (4, "auto")
    assert preprocess_workers_for("auto", 4) == 3 and preprocess_workers_for("auto", 1) == 0
    assert preprocess_workers_for(2, 8) == 2 and preprocess_workers_for(0, 8) == 0
    for bad in (-1, "many", True):
        with pytest.raises(ConfigError, match="extraction.preprocess_workers"):
            preprocess_workers_for(bad, 4)


def test_extract_shard_gives_the_engine_its_threads_less_one(monkeypatch):
    calls = []
    monkeypatch.setattr("vlmstates.workflow.gpu_lease.lease_gpu", lambda **kw: None)
    monkeypatch.setattr("vlmstates.extraction.shards.extract_shard", lambda *args, **kw: calls.append(kw))
    common = ["extract-shard", "--settings", '{"name": "m", "model": "x"}', "--table", "t", "--images", "i"]
    common += ["--shard", "0", "--shard-size", "4", "--out", "o.h5"]
    assert cli.main([*common, "--threads", "3", "--preprocess-workers", "auto"]) == 0
    assert cli.main([*common, "--threads", "3", "--preprocess-workers", "1"]) == 0
    assert [kw["preprocess_workers"] for kw in calls] == [2, 1]


def test_the_extraction_rule_declares_the_configs_threads_and_passes_them_on(tmp_path):
    config = default_config()
    config["extraction"].update(threads=3, preprocess_workers="auto")
    workdir = workdir_with_config(tmp_path / "work", config)
    snakemake(workdir, "--cores", "1", "results/dataset/questions.csv")  # the shards are planned from it
    for cores, threads in (("8", 3), ("2", 2)):  # Snakemake caps a job's threads at --cores
        dry = snakemake(workdir, "-n", "-p", "--cores", cores)
        text = dry.stdout + dry.stderr
        jobs = [block for block in text.split("\n\n") if "rule extract_shard:" in block]
        assert jobs, text[-3000:]
        for job in jobs:
            assert f"threads: {threads}\n" in job + "\n", job
            assert f"--threads {threads} --preprocess-workers auto" in job, job


def test_a_remote_code_processor_reaches_the_workers(tmp_path):
    """Molmo's processor class lives in transformers' remote-code modules, which a worker imports itself."""
    from molmo_standin import build_standin_checkpoint

    folder = build_standin_checkpoint(tmp_path / "molmo_standin_checkpoint", layout="molmo")
    settings = ModelSettings.from_config(
        "molmo_standin", {"model": str(folder), "trust_remote_code": True, "max_new_tokens": 2, "batch_size": 3}
    )
    loaded = load_model(settings)
    questions = synthetic_inputs(tmp_path / "images", 6, [(300, 200), (640, 480)], seed=0)
    inline = Extractor(loaded, progress=False, prefetch=0).extract(questions, tmp_path / "images")
    workers = Extractor(loaded, progress=False, preprocess_workers=2).extract(questions, tmp_path / "images")
    assert all(r.status == STATUS_OK for r in workers), [r.error for r in workers]
    assert_same_results(workers, inline, exact=True)


def test_the_schema_checks_threads_and_workers():
    from helpers import REPO

    from vlmstates.workflow.config_check import check_config

    schema = REPO / "workflow" / "schemas" / "config.schema.yaml"
    for good in ({"threads": 8, "preprocess_workers": 2}, {"preprocess_workers": "auto"}, {}):
        config = default_config()
        config["extraction"] = good
        assert check_config(config, schema)["extraction"]["threads"] == good.get("threads", 4)
    for bad in ({"threads": 0}, {"preprocess_workers": -1}, {"preprocess_workers": "many"}):
        config = default_config()
        config["extraction"] = bad
        with pytest.raises(ConfigError, match=next(iter(bad))):
            check_config(config, schema)


def test_a_processor_that_cannot_reach_the_workers_names_the_fix(setup):
    loaded, questions, images = setup
    _one_family_shows_it(loaded)
    unpicklable = replace(loaded, processor=lambda *args: None)
    with pytest.raises(ConfigError, match="preprocess_workers: 0"):
        list(BatchPreparer(unpicklable, 0, untimed, workers=1).ahead([[0]], questions, images))
