"""Devices as the user meant: a job given a GPU that torch cannot use stops, naming torch's CUDA and the
driver it needs; leases are taken among an inherited CUDA_VISIBLE_DEVICES; `cuda:N` and a lease agree.

torch.cuda is monkeypatched (this machine has no GPU); the locks are real flocks in a temporary folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from vlmstates import cli
from vlmstates.workflow import gpu_lease
from vlmstates.workflow.gpu_lease import GpuUnavailable, check_gpu_usable, device_after_lease, lease_gpu


def test_leases_are_taken_among_the_inherited_visible_devices(tmp_path):
    first, second, third = ({"CUDA_VISIBLE_DEVICES": "2,3"} for _ in range(3))
    assert lease_gpu(num_gpus=8, lock_dir=tmp_path, env=first) == "2"
    assert lease_gpu(num_gpus=8, lock_dir=tmp_path, env=second) == "3"
    assert first["CUDA_VISIBLE_DEVICES"] == "2" and second["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(TimeoutError):  # both held: the third job waits (cut short here)
        _lease_within(third, tmp_path, seconds=0.3)


def _lease_within(env, lock_dir, seconds):
    import signal

    def give_up(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return lease_gpu(lock_dir=lock_dir, env=env, poll_seconds=0.05)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_an_explicit_index_leases_that_gpu_and_the_model_runs_on_the_one_it_sees(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    leased = lease_gpu(lock_dir=tmp_path, env=env, wanted=1)
    assert leased == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert device_after_lease("cuda:1", leased) == "cuda"
    assert device_after_lease("cpu", leased) == "cpu" and device_after_lease("cuda:1", None) == "cuda:1"
    machine = {}
    assert lease_gpu(num_gpus=4, lock_dir=tmp_path / "machine", env=machine, wanted=2) == "2"


def test_an_index_beyond_the_visible_gpus_is_refused_naming_them(tmp_path):
    with pytest.raises(GpuUnavailable, match=r"cuda:2 .* 2 are visible \(CUDA_VISIBLE_DEVICES=2,3\).*cuda:0 to cuda:1"):
        lease_gpu(lock_dir=tmp_path, env={"CUDA_VISIBLE_DEVICES": "2,3"}, wanted=2)
    with pytest.raises(GpuUnavailable, match="cuda:1"):  # a scheduler's one GPU is cuda:0
        lease_gpu(lock_dir=tmp_path, env={"CUDA_VISIBLE_DEVICES": "5"}, wanted=1)


@pytest.fixture
def no_usable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(gpu_lease, "installed_driver", lambda: "550.54.15")


@pytest.mark.parametrize(
    "device, leased, gpus_here, env",
    [
        ("auto", "0", 1, {}),  # the lease handed it a GPU
        ("cuda:0", None, 0, {}),  # asked for one by name
        ("auto", None, 2, {"CUDA_VISIBLE_DEVICES": ""}),  # a GPU node, the GPUs hidden
    ],
)
def test_a_job_given_a_gpu_that_torch_cannot_use_stops(no_usable_cuda, monkeypatch, device, leased, gpus_here, env):
    monkeypatch.setattr(gpu_lease, "count_gpus", lambda: gpus_here)
    with pytest.raises(GpuUnavailable) as refused:
        check_gpu_usable(device, leased, env)
    message = str(refused.value)
    assert "CUDA 13.0" in message and ">= 580" in message and "550.54.15" in message
    assert "device: cpu" in message  # the fix when the CPU is meant


@pytest.mark.parametrize("device, gpus_here", [("cpu", 2), ("auto", 0)])
def test_the_cpu_on_purpose_or_on_a_machine_without_gpus_runs(no_usable_cuda, monkeypatch, device, gpus_here):
    monkeypatch.setattr(gpu_lease, "count_gpus", lambda: gpus_here)
    check_gpu_usable(device, None, {})


def test_the_extraction_job_stops_before_loading_the_model(tiny_checkpoint, demo, tmp_path, capsys, monkeypatch):
    """On this GPU-less machine a job told `device: cuda:0` exits 1 with the reason (no retry: it repeats)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    table, images = demo
    settings = {"name": "tiny", "model": str(tiny_checkpoint("qwen2_5_vl")), "device": "cuda:0"}
    out = tmp_path / "shard_0000.h5"
    status = cli.main(
        ["extract-shard", "--settings", json.dumps(settings), "--table", str(table), "--images", str(images)]
        + ["--shard", "0", "--shard-size", "8", "--out", str(out)]
    )
    assert status == 1 and not out.exists() and not out.with_suffix(".progress").exists()
    assert "torch cannot use it" in capsys.readouterr().err
