"""Nothing lost: kill -9 at several points of a shard, resume, and compare with an uninterrupted run.

The extraction job is run as the workflow runs it (`python -m vlmstates extract-shard`); the failpoints of
vlmstates.failpoints make it SIGKILL itself at a named point, as a crash or a pre-empted job would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO, VLMSTATES, extract_shard_args
from oracle import assert_same_results

from vlmstates.store import STATUS_FAILED, STATUS_OK, read_embeddings, read_results
from vlmstates.workflow.gpu_lease import lease_gpu

SHARD_SIZE = 16


def run_shard(checkpoint, demo, out, *, failpoint=None, save_every=4, layers=None, images=None, max_failed_share=0.05):
    table, demo_images = demo
    settings = {"name": "tiny", "model": str(checkpoint), "batch_size": 4, "max_new_tokens": 4}
    if layers:
        settings["layers"] = layers
    env = {k: v for k, v in os.environ.items() if k != "VLMSTATES_FAILPOINT"}
    if failpoint:
        env["VLMSTATES_FAILPOINT"] = failpoint
    command = [
        *VLMSTATES,
        *extract_shard_args(
            settings, table, images or demo_images, out, SHARD_SIZE, save_every=save_every,
            max_failed_share=max_failed_share,
        ),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def assert_identical(path, reference):
    assert_same_results(read_results(path), read_results(reference), exact=True)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="module")
def reference(qwen, demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "shard_0000.h5"
    result = run_shard(qwen, demo, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "failpoint, save_every, resumed",
    [
        ("batch:1", 8, 0),  # killed before the first save
        ("batch:3", 8, 8),  # between saves: one part saved, one batch lost
        ("rename:part_0001.h5", 4, 4),  # during a save: the second part's temporary file is left behind
        ("rename:finished.h5", 4, 16),  # writing the finished shard: everything is in the progress parts
        ("rename:shard_0000.h5", 4, "put back"),  # placing the output: the finished shard is kept, nothing redone
    ],
)
def test_killed_shard_resumes_to_the_uninterrupted_result(
    qwen, demo, reference, tmp_path, failpoint, save_every, resumed
):
    out = tmp_path / "shard_0000.h5"
    killed = run_shard(qwen, demo, out, failpoint=failpoint, save_every=save_every)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # never a partial output that looks complete
    rerun = run_shard(qwen, demo, out, save_every=save_every)
    assert rerun.returncode == 0, rerun.stderr
    if resumed == "put back":
        assert "nothing recomputed" in rerun.stderr and "attention, layers" not in rerun.stderr  # no model loaded
    elif resumed:
        assert f"resuming: {resumed} samples already done" in rerun.stderr
    else:
        assert "resuming" not in rerun.stderr
    assert_identical(out, reference)
    assert_only_the_finished_shard_is_kept(out)


def assert_only_the_finished_shard_is_kept(out):
    """Once the shard is written its parts are gone; the progress folder keeps the finished shard itself,
    the same file as the output (a hard link), until the shards are merged."""
    kept = list(out.with_suffix(".progress").iterdir())
    assert [p.name for p in kept] == ["finished.h5"]
    assert kept[0].samefile(out)


def test_progress_from_another_config_is_not_reused(qwen, demo, tmp_path):
    out = tmp_path / "shard_0000.h5"
    assert run_shard(qwen, demo, out, failpoint="batch:3").returncode == -signal.SIGKILL
    rerun = run_shard(qwen, demo, out, layers=[0, 1])
    assert rerun.returncode == 0, rerun.stderr
    assert "different ['config_hash']" in rerun.stderr and "starting the shard over" in rerun.stderr
    assert "resuming" not in rerun.stderr
    assert read_embeddings(out).layers == [0, 1]


def copy_demo_images(demo, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(demo[1], images)
    return images


def test_image_corrupted_after_validation_is_recorded_and_the_shard_goes_on(qwen, demo, tmp_path):
    images = copy_demo_images(demo, tmp_path)
    first_image = sorted(images.glob("*.png"))[0]
    first_image.write_bytes(b"not an image any more")
    out = tmp_path / "shard_0000.h5"
    result = run_shard(qwen, demo, out, images=images, max_failed_share=0.5)
    assert result.returncode == 0, result.stderr
    emb = read_embeddings(out)
    failed = emb.table[emb.table["status"] == STATUS_FAILED]
    assert len(failed) >= 1 and (failed["image_id"] == first_image.name).all()
    assert failed["error"].str.contains(first_image.name).all()
    assert (emb.table["status"] == STATUS_OK).sum() == SHARD_SIZE - len(failed)


def test_too_many_failures_fail_the_job_naming_them_after_saving_progress(qwen, demo, tmp_path):
    images = copy_demo_images(demo, tmp_path)
    for image in sorted(images.glob("*.png"))[:3]:
        image.write_bytes(b"")
    out = tmp_path / "shard_0000.h5"
    result = run_shard(qwen, demo, out, images=images)
    assert result.returncode == 1
    assert "samples failed (more than 5%)" in result.stderr and "image:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert list(out.with_suffix(".progress").glob("part_*.h5"))  # what was done is kept


# -- GPU leases (simulated device counts: no GPU needed) -----------------------------------------

LEASE_AND_HOLD = """
import sys, time
from vlmstates.workflow.gpu_lease import lease_gpu
env = {}
print(lease_gpu(num_gpus=int(sys.argv[1]), lock_dir=sys.argv[2], env=env, poll_seconds=0.1), flush=True)
time.sleep(60)
"""


def start_holder(num_gpus, lock_dir):
    process = subprocess.Popen(
        [sys.executable, "-c", LEASE_AND_HOLD, str(num_gpus), str(lock_dir)], stdout=subprocess.PIPE, text=True
    )
    return process, process.stdout.readline().strip()


def test_concurrent_jobs_lease_distinct_gpus_and_a_dead_job_frees_its_gpu(tmp_path):
    first, gpu_a = start_holder(2, tmp_path)
    second, gpu_b = start_holder(2, tmp_path)
    try:
        assert {gpu_a, gpu_b} == {"0", "1"}
        third = subprocess.Popen(
            [sys.executable, "-c", LEASE_AND_HOLD, "2", str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(1.0)
        assert third.poll() is None  # all GPUs leased: it waits
        first.send_signal(signal.SIGKILL)  # however a job dies, its lease is released
        assert third.stdout.readline().strip() == gpu_a
        third.kill()
    finally:
        for process in (first, second):
            process.kill()


def test_a_scheduler_set_device_is_kept(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "3"}
    assert lease_gpu(num_gpus=8, lock_dir=tmp_path, env=env) == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and not list(tmp_path.iterdir())


def test_no_gpu_means_no_lease(tmp_path):
    env = {}
    assert lease_gpu(num_gpus=0, lock_dir=tmp_path, env=env) is None and "CUDA_VISIBLE_DEVICES" not in env


# -- the whole snakemake process killed --------------------------------------------------------------


SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "1"]
MODEL = "tiny-qwen2_5_vl"
MERGED = f"results/{MODEL}/embeddings.h5"


def small_workdir(path):
    """A working directory whose config runs the demo's first 16 questions on one model, in two shards."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["models"] = {MODEL: config["models"][MODEL]}
    config["extraction"].update(shard_size=8, save_every=4)
    config["dataset"]["limit"] = 16
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def workflow_reference(tmp_path_factory):
    """An uninterrupted run of the workflow up to the merged file."""
    reference = small_workdir(tmp_path_factory.mktemp("workflow") / "reference")
    subprocess.run(SNAKEMAKE + ["-d", str(reference), MERGED], check=True, capture_output=True, timeout=900)
    return reference


@pytest.mark.slow
def test_killed_snakemake_reruns_with_rerun_incomplete(workflow_reference, tmp_path):
    killed = small_workdir(tmp_path / "killed")
    # the first shard job to run (Snakemake picks which) stops after its first saved batch, so that the
    # kill lands mid-shard
    stalled = os.environ | {"VLMSTATES_FAILPOINT": "stall:batch:1"}
    process = subprocess.Popen(
        SNAKEMAKE + ["-d", str(killed), MERGED],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=stalled,
    )
    shards = killed / "results" / MODEL / "shards"
    deadline = time.time() + 600
    while not list(shards.glob("shard_*.progress/part_*.h5")):
        assert process.poll() is None and time.time() < deadline, "no shard saved progress"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # snakemake and its running job, as a lost node would
    process.wait()
    # a killed snakemake leaves its lock behind: unlock, then rerun what was incomplete
    subprocess.run(SNAKEMAKE + ["-d", str(killed), "--unlock"], check=True, capture_output=True, timeout=300)
    rerun = subprocess.run(
        SNAKEMAKE + ["-d", str(killed), "--rerun-incomplete", MERGED], capture_output=True, text=True, timeout=900
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_identical(killed / MERGED, workflow_reference / MERGED)


@pytest.mark.slow
def test_a_truncated_shard_is_refused_and_deleting_it_repairs_the_run(workflow_reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(workflow_reference, run)
    shard = run / "results" / MODEL / "shards" / "shard_0001.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a partial copy, a full disk
    refused = subprocess.run(SNAKEMAKE + ["-d", str(run), MERGED], capture_output=True, text=True, timeout=900)
    log = (run / "logs" / "merge" / f"{MODEL}.log").read_text()
    assert refused.returncode != 0 and "shard_0001.h5" in log and "unreadable" in log, log
    assert not (run / MERGED).exists()  # no partial result that looks complete
    shard.unlink()
    repaired = subprocess.run(SNAKEMAKE + ["-d", str(run), MERGED], capture_output=True, text=True, timeout=900)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "rule extract_shard" in repaired.stdout + repaired.stderr
    assert (repaired.stdout + repaired.stderr).count("rule extract_shard") == 1  # shard 0001 alone
    assert_identical(run / MERGED, workflow_reference / MERGED)
