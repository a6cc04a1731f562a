"""An extraction attempt whose error a retry would repeat marks it; the retry then ends at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import REPO, extract_shard_args

from vlmstates.workflow.retry_guard import repeats_on_retry


class FakeHubError(OSError):
    """Stands for requests' and huggingface_hub's errors, which subclass OSError."""


FakeHubError.__module__ = "requests.exceptions"


class FakeOutOfMemory(RuntimeError):
    """Stands for torch.OutOfMemoryError, a RuntimeError."""


@pytest.mark.parametrize(
    "error, repeats",
    [
        (ModuleNotFoundError("No module named 'peft'"), True),
        (OSError("checkpoint does not appear to have a file named model.safetensors"), True),
        (FileNotFoundError("no such file"), True),
        (ValueError("Unrecognized configuration class"), True),
        (SystemExit(2), True),
        (FakeOutOfMemory("CUDA out of memory"), False),
        (RuntimeError("CUDA error: an illegal memory access"), False),
        (MemoryError(), False),
        (ConnectionError("reset by peer"), False),
        (FakeHubError("502 Bad Gateway"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_which_errors_a_retry_repeats(error, repeats):
    assert repeats_on_retry(error) is repeats


def attempt(tmp_path, number: int, settings: dict, table, images) -> tuple[int, str, float]:
    """One attempt as rule extract_shard runs it: the guard's output redirected into the job's log."""
    log = tmp_path / "shard_0000.log"
    command = [
        sys.executable, "-m", "vlmstates.workflow.retry_guard", "--attempt", str(number), "--log", str(log),
        "--marker", str(tmp_path / "shard_0000.no-retry.log"), "--",
        *extract_shard_args(settings, table, images, tmp_path / "shard_0000.h5", shard_size=4, attempt=number),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.monotonic()
    with log.open("w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    return status, log.read_text(), time.monotonic() - start


def test_a_bad_checkpoint_is_tried_once_per_run(tmp_path, demo):
    table, images = demo
    checkpoint = tmp_path / "broken"  # a family's config.json, but no weights
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    settings = {"name": "broken", "model": str(checkpoint), "device": "cpu"}
    marker = tmp_path / "shard_0000.no-retry.log"

    status, first_log, _ = attempt(tmp_path, 1, settings, table, images)
    assert status == 1 and marker.exists()
    error_line = [line for line in first_log.splitlines() if line.strip()][-1]
    assert marker.read_text() == first_log  # the first attempt's log, kept from the retry's redirect

    status, retry_log, seconds = attempt(tmp_path, 2, settings, table, images)
    assert status == 1
    assert len(retry_log.splitlines()) == 1 and "not retried" in retry_log and error_line in retry_log, retry_log
    assert str(marker) in retry_log and "Traceback" not in retry_log
    assert seconds < 20  # nothing loaded: torch is not even imported

    # a later run (attempt 1 again) tries afresh, since the checkpoint may have been fixed
    marker.write_text("stale\n")
    status, again, _ = attempt(tmp_path, 1, settings, table, images)
    assert status == 1 and "not retried" not in again and marker.read_text() == again


def test_an_error_a_retry_may_fix_leaves_no_marker(tmp_path, monkeypatch):
    import vlmstates.cli
    from vlmstates.workflow import retry_guard

    def out_of_memory(argv):
        raise FakeOutOfMemory("CUDA out of memory")

    monkeypatch.setattr(vlmstates.cli, "main", out_of_memory)
    log, marker = tmp_path / "x.log", tmp_path / "x.no-retry.log"
    with pytest.raises(FakeOutOfMemory):
        retry_guard.main(["--attempt", "1", "--log", str(log), "--marker", str(marker), "--", "extract-shard"])
    assert not marker.exists()


def test_a_job_ended_for_a_fresh_process_is_retried_not_marked(tmp_path, monkeypatch):
    """Out of device memory: the command saves its samples and exits EXIT_RESTART; Snakemake retries it."""
    import vlmstates.cli
    from vlmstates.errors import EXIT_RESTART, OutOfDeviceMemory
    from vlmstates.workflow import retry_guard

    def ran_out(args):
        raise OutOfDeviceMemory(8, "OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(vlmstates.cli, "_merge", ran_out)  # any command's body: the CLI's handling is shared
    log, marker = tmp_path / "x.log", tmp_path / "x.no-retry.log"
    command = ["merge", "--table", "t.csv", "--out", "o.h5", "s.h5"]
    status = retry_guard.main(["--attempt", "1", "--log", str(log), "--marker", str(marker), "--", *command])
    assert status == EXIT_RESTART and not marker.exists()
