"""Ctrl-C and SIGTERM: an extraction job saves what it finished and exits non-zero, and the next run goes on
from there; a finished shard whose output Snakemake throws away is put back without recomputing it.

The first tests drive `extract_shard` with a stand-in extractor (no model: deterministic batches, an
interrupt after a chosen batch); the later ones send real signals to `python -m vlmstates extract-shard`
on the tiny Qwen2.5-VL checkpoint, and one to a running Snakemake.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from helpers import REPO, VLMSTATES, extract_shard_args
from oracle import assert_same_results

from vlmstates.extraction import shards
from vlmstates.extraction.shards import FINISHED, Progress, extract_shard, interrupts_deferred, merge_model_shards
from vlmstates.settings import ModelSettings
from vlmstates.store import STATUS_FAILED, VISION_ONLY, SampleResult, read_results

# -- extract_shard with a stand-in extractor -----------------------------------------------------------


class StandInExtractor:
    """The part of `engine.Extractor` that extract_shard uses. Batches of two; each sample's vector is its
    position in the shard; questions in `fail` fail; Ctrl-C (KeyboardInterrupt) after `stop_after` batches."""

    adapter = SimpleNamespace(family="stand-in")
    loaded = SimpleNamespace(device="cpu", dtype="float32", attn_implementation="eager")
    layers = ()
    batch_size = 2

    def __init__(self, settings, stop_after=None, fail=()):
        self.settings, self.stop_after, self.fail = settings, stop_after, set(fail)
        self.computed: list[str] = []

    def attributes(self):
        return {"model": self.settings.model, "config_hash": self.settings.config_hash()}

    def vector_dims(self):
        return {VISION_ONLY: 2}

    def extract(self, questions, images_dir, finished, on_batch):
        results = []
        for batch, start in enumerate(range(0, len(questions), 2), start=1):
            indices = range(start, min(start + 2, len(questions)))
            if all(questions[i].question_id in finished for i in indices):
                results += [finished[questions[i].question_id] for i in indices]
                continue
            computed = [self._result(questions[i], i) for i in indices]
            self.computed += [r.question_id for r in computed]
            on_batch(computed)
            results += computed
            if batch == self.stop_after:
                raise KeyboardInterrupt
        return results

    def _result(self, q, i):
        if q.question_id in self.fail:
            return SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, "no image")
        return SampleResult(
            q.question_id, q.image_id, q.question, q.answer, answer="yes", vectors={VISION_ONLY: np.full(2, i)}
        )


SHARD = 8


@pytest.fixture
def settings():
    return ModelSettings.from_config("stand-in", {"model": "org/model"})


def run(settings, demo, out, extractor, save_every=100):
    table, images = demo
    return extract_shard(
        settings,
        table,
        images,
        0,
        SHARD,
        out,
        max_failed_share=0.5,
        save_every=save_every,
        get_extractor=lambda: extractor,
    )


def saved_ids(out):
    return sorted(r.question_id for part in out.with_suffix(".progress").glob("part_*.h5") for r in read_results(part))


def test_an_interrupt_saves_every_finished_sample_and_the_rerun_goes_on(settings, demo, tmp_path):
    out = tmp_path / "shard_0000.h5"
    interrupted = StandInExtractor(settings, stop_after=3)
    with pytest.raises(KeyboardInterrupt):  # passed on, for the CLI to exit non-zero
        run(settings, demo, out, interrupted)  # save_every 100: nothing was saved before the interrupt
    assert not out.exists()
    assert saved_ids(out) == sorted(interrupted.computed)  # all 6 finished samples, saved on the interrupt
    rerun = StandInExtractor(settings)
    run(settings, demo, out, rerun)
    assert len(rerun.computed) == SHARD - 6  # only what was not done
    assert [r.question_id for r in read_results(out)] == interrupted.computed + rerun.computed


def test_failed_samples_are_not_saved_on_an_interrupt(settings, demo, tmp_path):
    out = tmp_path / "shard_0000.h5"
    table = shards.read_validated_table(demo[0])
    failing = table["question_id"].iloc[1]
    with pytest.raises(KeyboardInterrupt):
        run(settings, demo, out, StandInExtractor(settings, stop_after=2, fail=[failing]))
    assert saved_ids(out) == sorted(table["question_id"].iloc[[0, 2, 3]])  # the failed one is tried again


def test_a_finished_shard_whose_output_was_deleted_is_put_back_without_the_model(settings, demo, tmp_path):
    out = tmp_path / "shard_0000.h5"
    run(
        settings,
        demo,
        out,
        StandInExtractor(settings, fail=[shards.read_validated_table(demo[0])["question_id"].iloc[0]]),
    )
    written = read_results(out)
    out.unlink()  # what Snakemake's --rerun-incomplete does to the output of a job it saw no end of
    table, images = demo

    def no_model():
        raise AssertionError("the model was loaded to recover a finished shard")

    extract_shard(settings, table, images, 0, SHARD, out, get_extractor=no_model)
    assert_same_results(read_results(out), written, exact=True)  # its failed sample too, not retried
    assert read_results(out)[0].status == STATUS_FAILED


def test_a_finished_shard_of_other_settings_is_not_put_back(settings, demo, tmp_path, caplog):
    out = tmp_path / "shard_0000.h5"
    run(settings, demo, out, StandInExtractor(settings))
    out.unlink()
    other = ModelSettings.from_config("stand-in", {"model": "org/model", "max_new_tokens": 5})
    extractor = StandInExtractor(other)
    run(other, demo, out, extractor)
    assert len(extractor.computed) == SHARD  # extracted again
    assert "does not fit (['config_hash'])" in caplog.text


def test_merging_removes_the_progress_folders(settings, demo, tmp_path):
    out = tmp_path / "shard_0000.h5"
    run(settings, demo, out, StandInExtractor(settings))
    assert (tmp_path / "shard_0000.progress" / FINISHED).samefile(out)  # kept until the merge
    limited = tmp_path / "table.csv"
    shards.read_validated_table(demo[0]).head(SHARD).to_csv(limited, index=False)
    merge_model_shards(limited, [out], tmp_path / "embeddings.h5")
    assert not (tmp_path / "shard_0000.progress").exists()
    assert out.exists()


def test_a_progress_line_per_save(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    now = [0.0]
    monkeypatch.setattr(shards.time, "monotonic", lambda: now[0])
    progress = Progress(tmp_path, {"config_hash": "h"}, {VISION_ONLY: 2}, save_every=128, label="shard 0003", total=500)
    progress.load()  # nothing to resume; the rate counts from here
    progress.add([SampleResult.failed(f"f{i}", "i.png", "q", "a", "no image") for i in range(2)])
    now[0] = 42.0
    progress.add([SampleResult(f"q{i}", "i.png", "q", "a", vectors={VISION_ONLY: np.zeros(2)}) for i in range(128)])
    # saved at 42 s: 130 samples computed, 370 left
    assert "shard 0003: 128/500 samples saved (2 failed), 3.1 samples/s, ~2 min left" in caplog.messages


def test_an_interrupt_during_a_save_is_acted_on_after_it():
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler would run here, were it not deferred
                steps.append("saved")
        assert steps == ["saved"]
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- signals to a real extraction job -------------------------------------------------------------------

QUESTIONS = 36  # the whole demo set: long enough for a signal to arrive mid-shard
SETTINGS = {"name": "tiny", "batch_size": 2, "max_new_tokens": 8}


def shard_command(checkpoint, demo, out, save_every=4):
    table, images = demo
    settings = SETTINGS | {"model": str(checkpoint)}
    return [*VLMSTATES, *extract_shard_args(settings, table, images, out, QUESTIONS, save_every=save_every)]


def wait_for(path: Path, process: subprocess.Popen, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the job ended (status {process.returncode}) before {path} appeared"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="module")
def reference(qwen, demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "shard_0000.h5"
    subprocess.run(shard_command(qwen, demo, out), check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_job_saves_its_progress_and_the_rerun_finishes_it(qwen, demo, reference, tmp_path, signum):
    out = tmp_path / "shard_0000.h5"
    job = subprocess.Popen(shard_command(qwen, demo, out), stderr=subprocess.PIPE, text=True)
    wait_for(out.with_suffix(".progress") / "part_0000.h5", job)
    time.sleep(0.1)  # about a batch more, not yet saved
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    saved = len(saved_ids(out))
    assert 4 <= saved < QUESTIONS
    assert f"interrupted; {saved}/{QUESTIONS} samples are saved" in stderr  # every finished one: the log agrees

    rerun = subprocess.run(shard_command(qwen, demo, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {saved} samples already done" in rerun.stderr
    assert_same_results(read_results(out), read_results(reference), exact=True)


def test_a_job_logs_a_progress_line_per_save(reference, qwen, demo, tmp_path):
    result = subprocess.run(
        shard_command(qwen, demo, tmp_path / "shard_0000.h5", save_every=12),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stderr.splitlines() if "samples saved" in line]
    assert [line.split("INFO ")[1].split(",")[0] for line in lines] == [
        f"shard 0000: {n}/{QUESTIONS} samples saved (0 failed)" for n in (12, 24, 36)
    ], result.stderr
    assert all("samples/s, ~" in line and " left" in line for line in lines)


# -- Ctrl-C to Snakemake itself (its process, not its process group) ------------------------------------

MODEL = "tiny-qwen2_5_vl"


def one_model_workdir(path: Path) -> tuple[Path, Path]:
    """A working directory running one shard of the demo's first 16 questions on the tiny Qwen, from
    config/config.yaml as it is now; returns it and the shard's path."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"] = {MODEL: config["models"][MODEL]}
    config["extraction"].update(shard_size=16, save_every=4)
    config["dataset"]["limit"] = 16
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return path, Path(config.get("results", "results")) / MODEL / "shards" / "shard_0000.h5"


@pytest.mark.slow
def test_ctrl_c_to_snakemake_alone_keeps_the_shard_it_let_finish(tmp_path):
    workdir, shard = one_model_workdir(tmp_path / "run")
    # jobs run `python` from PATH: this interpreter's
    env = os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    snakemake = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--cores",
        "1",
        "-d",
        str(workdir),
        str(shard),
    ]
    run = subprocess.Popen(snakemake, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for(workdir / shard.with_suffix(".progress") / "part_0000.h5", run)
    os.kill(run.pid, signal.SIGINT)  # Snakemake only: the job, in its process group, gets no signal
    assert run.wait(timeout=600) != 0
    job_log = workdir / "logs" / "extract" / MODEL / "shard_0000.log"
    finished = "samples written to" in job_log.read_text()  # Snakemake 9 waits for the running job...
    kept = read_results(workdir / shard) if finished else None  # ...and marks its output incomplete

    rerun = subprocess.run(snakemake + ["--rerun-incomplete"], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = job_log.read_text()
    if finished:
        assert "nothing recomputed" in log and "attention, layers" not in log, log
        assert_same_results(read_results(workdir / shard), kept, exact=True)
    else:
        assert "resuming:" in log, log
