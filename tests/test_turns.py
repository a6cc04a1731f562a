"""Jobs take turns at a model's shards (vlmstates.extraction.turns): one load serves every shard no other job
has claimed, each shard still gets its own output from its own job, the vectors do not depend on which job
extracted a shard, and claims of dead jobs are taken over."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest

from vlmstates.extraction import engine, turns
from vlmstates.extraction.shards import FINISHED, extract_shard, progress_folder
from vlmstates.extraction.turns import Claim, TimeBudget, claim_path, extract_shard_taking_turns
from vlmstates.settings import ModelSettings
from vlmstates.store import read_results

SHARD_SIZE = 12  # the demo's 36 questions: 3 shards


@pytest.fixture(scope="module")
def settings(tiny_checkpoint):
    return ModelSettings.from_config(
        "tiny", {"model": str(tiny_checkpoint("qwen2_5_vl")), "max_new_tokens": 3, "batch_size": 4}
    )


@pytest.fixture
def loads(monkeypatch):
    """The model loads of this test, counted where every job loads (engine.load_model)."""
    calls = []

    def counting_load_model(settings):
        calls.append(settings.model)
        return load_model(settings)

    load_model = engine.load_model
    monkeypatch.setattr(engine, "load_model", counting_load_model)
    return calls


@pytest.fixture(scope="module")
def reference(settings, demo, tmp_path_factory):
    """Each shard extracted by its own job, without turns."""
    table, images = demo
    folder = tmp_path_factory.mktemp("reference")
    return [extract_shard(settings, table, images, k, SHARD_SIZE, folder / f"shard_{k:04d}.h5") for k in range(3)]


def shard(folder, k):
    return folder / f"shard_{k:04d}.h5"


def assert_same_shard(got, expected):
    a, b = read_results(got), read_results(expected)
    assert [(r.question_id, r.answer) for r in a] == [(r.question_id, r.answer) for r in b]
    for x, y in zip(a, b):
        for key in x.vectors:
            np.testing.assert_array_equal(x.vectors[key], y.vectors[key])


def test_the_first_job_extracts_every_shard_with_one_load_and_the_others_only_put_theirs_in_place(
    settings, demo, reference, tmp_path, loads
):
    table, images = demo
    extract_shard_taking_turns(settings, table, images, 0, SHARD_SIZE, shard(tmp_path, 0))
    assert loads == [settings.model]
    # the others' outputs are their own jobs' to place; their finished shards wait in their progress folders
    assert not shard(tmp_path, 1).exists() and not shard(tmp_path, 2).exists()
    assert all((progress_folder(shard(tmp_path, k)) / FINISHED).exists() for k in (1, 2))
    for k in (1, 2):
        extract_shard_taking_turns(settings, table, images, k, SHARD_SIZE, shard(tmp_path, k))
    assert loads == [settings.model]  # the later jobs loaded nothing
    for k in range(3):
        assert_same_shard(shard(tmp_path, k), reference[k])
    assert not list(tmp_path.glob("*.claim"))


def test_without_turns_each_shard_loads_the_model(settings, demo, tmp_path, loads):
    """The count above can fail: a job per shard, each loading the model, is what turns replace."""
    table, images = demo
    for k in range(3):
        extract_shard(settings, table, images, k, SHARD_SIZE, shard(tmp_path, k))
    assert len(loads) == 3


def test_a_shard_whose_output_exists_is_not_taken_again(settings, demo, reference, tmp_path, loads):
    """After a merge has removed the progress folders, a rerun of one shard does not redo the others."""
    table, images = demo
    for k in (1, 2):
        shutil.copyfile(reference[k], shard(tmp_path, k))
    before = {k: shard(tmp_path, k).stat().st_mtime_ns for k in (1, 2)}
    extract_shard_taking_turns(settings, table, images, 0, SHARD_SIZE, shard(tmp_path, 0))
    assert {k: shard(tmp_path, k).stat().st_mtime_ns for k in (1, 2)} == before
    assert not any(progress_folder(shard(tmp_path, k)).exists() for k in (1, 2))
    assert_same_shard(shard(tmp_path, 0), reference[0])


def test_a_job_whose_shard_another_job_holds_helps_with_the_others_then_waits(
    settings, demo, reference, tmp_path, loads, monkeypatch
):
    table, images = demo
    monkeypatch.setattr(turns, "WAIT_POLL_S", 0.05)
    other = Claim.take(claim_path(shard(tmp_path, 0)), "another job")  # a live job holds shard 0
    done = {}

    def job():
        extract_shard_taking_turns(settings, table, images, 0, SHARD_SIZE, shard(tmp_path, 0))
        done["at"] = time.monotonic()

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 300
    while not all((progress_folder(shard(tmp_path, k)) / FINISHED).exists() for k in (1, 2)):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    time.sleep(0.3)
    assert thread.is_alive() and not shard(tmp_path, 0).exists()  # waiting for its own shard
    other.release()  # the other job gave up on it: the waiting job takes it
    thread.join(300)
    assert "at" in done
    assert_same_shard(shard(tmp_path, 0), reference[0])
    assert loads == [settings.model]


def test_a_failing_shard_is_left_to_its_own_job_and_does_not_fail_this_one(settings, demo, tmp_path, loads):
    table, images = demo
    broken = tmp_path / "images"
    shutil.copytree(images, broken)
    for image_id in set(pd.read_csv(table, dtype=str)["image_id"].iloc[2 * SHARD_SIZE :]):  # shard 2's alone
        (broken / image_id).write_bytes(b"not an image")
    out = tmp_path / "shards"
    out.mkdir()
    extract_shard_taking_turns(settings, table, broken, 0, SHARD_SIZE, shard(out, 0), max_failed_share=0.0)
    assert shard(out, 0).exists()
    assert (progress_folder(shard(out, 1)) / FINISHED).exists()
    assert not (progress_folder(shard(out, 2)) / FINISHED).exists()  # left, with no claim, to its own job
    assert not list(out.glob("*.claim"))


def test_no_turn_past_the_time_limit(settings, demo, tmp_path, loads):
    table, images = demo
    extract_shard_taking_turns(settings, table, images, 0, SHARD_SIZE, shard(tmp_path, 0), time_limit_s=1)
    assert shard(tmp_path, 0).exists()
    assert not any(progress_folder(shard(tmp_path, k)).exists() for k in (1, 2))


def test_the_time_budget_counts_the_rate_of_the_shards_done(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(turns.time, "monotonic", lambda: now[0])
    budget = TimeBudget(limit_s=1000)
    assert budget.allows(500)  # nothing measured yet: one more shard is tried
    now[0] = 400.0
    budget.add(400.0, 500)
    assert budget.allows(500)  # 400 + 400 + margin 120 <= 1000
    assert not budget.allows(700)  # 400 + 560 + 120 > 1000
    assert TimeBudget(limit_s=None).allows(10**9)


def test_a_live_claim_is_refused_and_released_only_by_its_holder(tmp_path):
    path = tmp_path / "shard_0000.claim"
    held = Claim.take(path, "job A")
    assert held is not None and Claim.take(path, "job B") is None
    assert json.loads(path.read_text())["job"] == "job A"
    stranger = Claim(path, token="not A's")
    stranger.release()
    assert path.exists()
    held.release()
    assert not path.exists()


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / "shard_0000.claim"
    gone = _dead_pid()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": gone, "job": "killed job", "token": "x"}))
    claim = Claim.take(path, "job B")
    assert claim is not None and json.loads(path.read_text())["job"] == "job B"
    claim.release()


def test_a_claim_from_another_host_is_taken_over_only_once_stale(tmp_path):
    path = tmp_path / "shard_0000.claim"
    path.write_text(json.dumps({"host": "node-17", "pid": 1, "job": "job on node-17", "token": "x"}))
    assert Claim.take(path, "job B") is None  # touched just now: alive, as far as this host can tell
    old = time.time() - turns.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    assert Claim.take(path, "job B") is not None


def test_a_held_claim_is_kept_fresh_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(turns, "HEARTBEAT_S", 0.05)
    path = tmp_path / "shard_0000.claim"
    claim = Claim.take(path, "job A")
    old = time.time() - 1000
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    claim.release()


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
