"""The demo on a real SLURM cluster: one node on this host (tests/slurm/local_slurm.py), the profile
profiles/slurm, and the commands of its guide (profiles/slurm/README.md), word for word (plus the temporary
Snakefile/working-directory paths). The merged results must equal a local run's, every extraction shard must
have been a SLURM job with a GPU, and rerunning the command must redo a missing shard alone.

Needs root (it starts munged, slurmctld and slurmd) and Debian's slurm-wlm and munge plus
snakemake-executor-plugin-slurm (.ci/slurm-setup.sh). Skipped when not root; when the programs are missing it
is skipped, except under CI (CI set), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO

from vlmstates.settings import ExtractionSettings
from vlmstates.store import read_embeddings
from vlmstates.workflow import resources as job_resources

pytestmark = pytest.mark.slow

# A hung status query makes Snakemake wait rather than fail: each run is interrupted (SIGINT, as Ctrl-C)
# after this many seconds. A run takes about 5 minutes on a 2-core machine.
RUN_TIMEOUT_S = 1200
RERUN_TIMEOUT_S = 600
# The node's size: GPUs for shards of both demo models at once; CPUs and memory for the profile's requests
# (declared, not real: SlurmdParameters=config_overrides).
TEST_NODE = dict(gpus=4, cpus=32, memory_mb=256_000)


def _load_local_slurm():
    spec = importlib.util.spec_from_file_location("local_slurm", REPO / "tests" / "slurm" / "local_slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


local_slurm = _load_local_slurm()


def _require_slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("SLURM test skipped: it starts munged, slurmctld and slurmd and must run as root (CI does)")
    missing = local_slurm.missing_binaries()
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        missing.append("snakemake-executor-plugin-slurm (pip)")
    if missing:
        message = f"SLURM test needs {', '.join(missing)}: run `bash .ci/slurm-setup.sh`"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the SLURM test must run, but: {message}")
        pytest.skip(message)


# ------------------------------------------------------------------------------------------ the guide
SLURM_GUIDE = REPO / "profiles" / "slurm" / "README.md"


def test_the_readme_links_to_the_slurm_guide():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## On a cluster[^\n]*\n.*?(?=^## |\Z)", readme, re.M | re.S)
    assert match and "(profiles/slurm/README.md)" in match.group(0), "README.md: no link to the SLURM guide"


def documented_commands() -> list[str]:
    """The `snakemake ...` lines of the guide's ```sh blocks, in order: the run, then the rerun."""
    source, section = SLURM_GUIDE, SLURM_GUIDE.read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.M | re.S)
    commands = [
        line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("snakemake ")
    ]
    assert len(commands) >= 2, f"{source}: expected the run and the rerun command, found {commands}"
    return commands


def test_documented_commands_use_the_slurm_profile():
    run, rerun = documented_commands()[:2]
    assert run == rerun, "failed shards are rerun with the same command"
    argv = shlex.split(run)
    assert argv[:3] == ["snakemake", "--profile", "profiles/slurm"], run
    assert "--workflow-profile" in argv and argv[argv.index("--workflow-profile") + 1] == "none", run
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["set-resources"]["extract_shard"]["gpu"] == 1


# ------------------------------------------------------------------------------------------ running
def _snakemake_argv(command: str, workdir: Path) -> list[str]:
    """The documented command, run by this Python, on a temporary working directory."""
    argv = shlex.split(command)
    assert argv[0] == "snakemake"
    return [
        sys.executable,
        "-m",
        "snakemake",
        *argv[1:],
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
    ]


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(process: subprocess.Popen, log: Path, timeout: float, what: str, cluster) -> str:
    """Wait for a Snakemake run; past `timeout`, interrupt it like Ctrl-C (it then cancels its SLURM jobs)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        pytest.fail(f"{what} timed out after {timeout} s and was interrupted:\n{_tail(log)}\n{cluster.logs()}")
    output = log.read_text(errors="replace")
    if process.returncode != 0:
        pytest.fail(f"{what} exited with {process.returncode}:\n{_tail(log)}\n{cluster.logs()}")
    return output


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _workdir(path: Path) -> Path:
    """The demo config, its models on the CPU on purpose: the test node's GPUs are dummy devices, and a job
    that was handed a GPU torch cannot use stops rather than run on the CPU unasked (gpu_lease.check_gpu_usable)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for entry in config["models"].values():
        entry["device"] = "cpu"
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _models() -> list[str]:
    return list(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"])


SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


@pytest.fixture(scope="module")
def slurm_demo(tmp_path_factory):
    """The cluster, the demo run through it, and a local run of the same config, side by side."""
    _require_slurm()
    base = tmp_path_factory.mktemp("slurm")
    cluster = local_slurm.LocalSlurm(base / "cluster", **TEST_NODE)
    started = time.monotonic()
    try:
        cluster.start()
        env = cluster.env()
        slurm_dir, local_dir = _workdir(base / "slurm-run"), _workdir(base / "local-run")
        command = documented_commands()[0]
        # the reference, meanwhile: the README's local run, for the merged files only
        targets = [f"results/{model}/embeddings.h5" for model in _models()]
        local = _start(
            [
                sys.executable,
                "-m",
                "snakemake",
                "--cores",
                "2",
                "--snakefile",
                str(REPO / "Snakefile"),
                "--directory",
                str(local_dir),
                *targets,
            ],
            base / "local.log",
            {k: v for k, v in env.items() if k != "SLURM_CONF"},
        )
        remote = _start(_snakemake_argv(command, slurm_dir), base / "slurm.log", env)
        output = _finish(remote, base / "slurm.log", RUN_TIMEOUT_S, command, cluster)
        _finish(local, base / "local.log", RUN_TIMEOUT_S, "the local reference run", cluster)
        print(f"\nSLURM demo run and local reference: {time.monotonic() - started:.0f} s")
        yield {
            "cluster": cluster,
            "env": env,
            "command": command,
            "output": output,
            "slurm": slurm_dir,
            "local": local_dir,
            "base": base,
            "jobs": cluster.show_jobs(),
        }
    finally:
        cluster.stop()
        print(f"SLURM test cluster up for {time.monotonic() - started:.0f} s")


def assert_same_embeddings(path: Path, reference: Path) -> None:
    got, expected = read_embeddings(path), read_embeddings(reference)
    assert got.table["question_id"].tolist() == expected.table["question_id"].tolist()
    assert got.table["answer"].tolist() == expected.table["answer"].tolist()
    assert got.table["status"].tolist() == expected.table["status"].tolist()
    assert got.representation_keys() == expected.representation_keys()
    for key in expected.representation_keys():
        np.testing.assert_allclose(got.load(key), expected.load(key), rtol=1e-4, atol=1e-6, err_msg=f"{path} {key}")


def test_slurm_run_merges_the_same_results_as_a_local_run(slurm_demo):
    for model in _models():
        assert_same_embeddings(
            slurm_demo["slurm"] / "results" / model / "embeddings.h5",
            slurm_demo["local"] / "results" / model / "embeddings.h5",
        )
        assert (slurm_demo["slurm"] / "results" / model / "inspection" / "summary.json").exists()


def _extract_jobs(jobs: list[dict[str, str]]) -> list[dict[str, str]]:
    return [job for job in jobs if job.get("Comment", "").startswith("rule_extract_shard_")]


def test_every_step_was_a_slurm_job_and_extraction_asked_for_a_gpu(slurm_demo):
    jobs = slurm_demo["jobs"]  # `scontrol -d show job`: finished jobs stay for MinJobAge (1 h here)
    shards = {
        model: sorted((slurm_demo["local"] / "results" / model / "shards").glob("shard_*.h5")) for model in _models()
    }
    extract = _extract_jobs(jobs)
    assert len(extract) == sum(map(len, shards.values())) > len(shards), [j.get("Comment") for j in jobs]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["set-resources"]["extract_shard"]["cpus_per_gpu"] == "threads"  # the rule's threads
    extraction = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["extraction"]
    cpus_per_gpu = extraction.get("threads", ExtractionSettings.threads)
    for job in extract:
        assert job["JobState"] == "COMPLETED", job
        assert "gres:gpu:1" in job.get("TresPerJob", "") + job.get("TresPerNode", ""), job  # sbatch --gpus=1
        assert re.fullmatch(r"gpu(:\w+)?:1", job.get("JOB_GRES", "")), job  # and SLURM gave it one GPU
        assert job.get("CpusPerTres") == f"gres:gpu:{cpus_per_gpu}", job
    others = [job for job in jobs if job not in extract]
    rules = {re.sub(r"_wildcards_.*", "", job.get("Comment", "")) for job in others}
    assert {
        "rule_demo_dataset",
        "rule_validate_dataset",
        "rule_tiny_checkpoint",
        "rule_merge_shards",
        "rule_inspect_embeddings",
    } <= rules
    for job in others:
        assert job["JobState"] == "COMPLETED", job
        assert "gpu" not in job.get("TresPerJob", "") + job.get("TresPerNode", "") + job.get("JOB_GRES", ""), job
    # the plugin's own account of it: one sbatch per extraction shard, with its SLURM log path
    submitted = [path for _, path in SUBMITTED.findall(slurm_demo["output"]) if "/rule_extract_shard/" in path]
    assert len(submitted) == len(extract)


def test_shards_of_different_models_ran_at_the_same_time(slurm_demo):
    def span(job):
        return datetime.fromisoformat(job["StartTime"]), datetime.fromisoformat(job["EndTime"])

    def model(job):
        return re.fullmatch(r"rule_extract_shard_wildcards_(.+)_\d{4}", job["Comment"]).group(1)

    extract = _extract_jobs(slurm_demo["jobs"])
    overlapping = [
        (a["Comment"], b["Comment"])
        for i, a in enumerate(extract)
        for b in extract[i + 1 :]
        if model(a) != model(b) and span(a)[0] < span(b)[1] and span(b)[0] < span(a)[1]
    ]
    assert overlapping, [(j["Comment"], j["StartTime"], j["EndTime"]) for j in extract]


def _dry_run_extract_resources(profile_text: str, tmp_path: Path, slurm_demo) -> dict[str, str]:
    """Each model's extraction resources, as a dry run of the documented command with this profile shows them."""
    (tmp_path / "config.yaml").write_text(profile_text)
    command = shlex.split(documented_commands()[0])
    command[command.index("profiles/slurm")] = str(tmp_path)
    argv = _snakemake_argv(shlex.join(command), slurm_demo["slurm"]) + ["-n", "--forcerun", "extract_shard"]
    result = subprocess.run(argv, cwd=REPO, env=slurm_demo["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = re.findall(r"wildcards: model=(\S+), shard=\d{4}\n\s+resources: (.*)", result.stdout + result.stderr)
    return dict(found)


def test_extraction_memory_and_runtime_are_estimated_per_model(slurm_demo, tmp_path):
    """Without site overrides, each model's job asks the memory and time the rule estimates for it."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    by_model = _dry_run_extract_resources(text, tmp_path, slurm_demo)
    assert set(by_model) == set(_models()), by_model
    models = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]
    for model, resources in by_model.items():
        weights = job_resources.checkpoint_bytes(str(slurm_demo["slurm"] / models[model]["model"]))
        floor = job_resources.extraction_memory_mb(weights, 1, 1, 1)
        mem_mb = int(re.search(r"mem_mb=(\d+)", resources).group(1))
        runtime = int(re.search(r"runtime=(\d+)", resources).group(1))
        assert floor <= mem_mb < floor + 100, (model, resources)  # tiny: the base plus a few MB
        assert runtime >= job_resources.SAFETY_FACTOR * job_resources.LOAD_MINUTES, (model, resources)


def test_profile_sets_gpu_model_memory_and_runtime_per_model(slurm_demo, tmp_path):
    """The profile's per-model tables, uncommented and filled in as a site would, reach each extraction job."""
    second = _models()[1]
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    text = re.sub(r"^    # (mem_mb|runtime): ", r"    \1: ", text, flags=re.M)
    tables = re.findall(r"dict\(\[\(.*?\)\]\)", text)
    assert len(tables) == 3, tables  # gpu_model, mem_mb, runtime of extract_shard
    extract = yaml.safe_load(text)["set-resources"]["extract_shard"]
    fallback = {
        key: re.search(r"\.get\(wildcards\.model, (\d+)\)", extract[key]).group(1) for key in ("mem_mb", "runtime")
    }
    for table, value in zip(tables, ("'testgpu'", "12345", "77")):
        text = text.replace(table, f"dict([('{second}', {value})])")
    by_model = _dry_run_extract_resources(text, tmp_path, slurm_demo)
    assert set(by_model) == set(_models()), by_model
    assert "gpu_model=testgpu" in by_model[second], by_model
    assert "mem_mb=12345" in by_model[second] and "runtime=77" in by_model[second], by_model[second]
    for model in set(by_model) - {second}:  # not in the tables: '' = any GPU, and their fallbacks (x attempt 1)
        assert "gpu=1" in by_model[model] and re.search(r"gpu_model=(,|$)", by_model[model]), by_model[model]
        assert f"mem_mb={fallback['mem_mb']}," in by_model[model], by_model[model]
        assert f"runtime={fallback['runtime']}," in by_model[model], by_model[model]


def test_rerunning_the_command_redoes_a_missing_shard_alone(slurm_demo):
    """The SLURM guide's way to redo a failed shard: its file is gone, the same command runs it, then the merge."""
    model = _models()[0]
    results = slurm_demo["slurm"] / "results" / model
    (results / "shards" / "shard_0001.h5").unlink()
    (results / "embeddings.h5").unlink()
    rerun = documented_commands()[1]
    log = slurm_demo["base"] / "rerun.log"
    started = time.monotonic()
    process = _start(_snakemake_argv(rerun, slurm_demo["slurm"]), log, slurm_demo["env"])
    output = _finish(process, log, RERUN_TIMEOUT_S, rerun, slurm_demo["cluster"])
    print(f"\nrerun of one shard: {time.monotonic() - started:.0f} s")
    logs = [path for _, path in SUBMITTED.findall(output)]
    extract = [path for path in logs if "/rule_extract_shard/" in path]
    assert len(extract) == 1 and f"/rule_extract_shard/{model}_0001/" in extract[0], logs
    assert sum("/rule_merge_shards/" in path for path in logs) == 1, logs
    assert_same_embeddings(results / "embeddings.h5", slurm_demo["local"] / "results" / model / "embeddings.h5")
