"""scripts/device_check.py runs end to end on the CPU with a tiny checkpoint (its GPU mode is the same code
with full-size models; BENCHMARKS.md), saving each check as it completes."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def test_the_device_check_runs_on_the_cpu_and_saves_every_check(tmp_path):
    out = tmp_path / "check.jsonl"
    command = [sys.executable, str(REPO / "scripts" / "device_check.py"), "--families", "qwen2_5_vl"]
    command += ["--batch", "2", "--new-tokens", "2", "--out", str(out), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["check"], r["status"]) for r in records] == [
        ("cuda", "ok"),
        ("load", "ok"),
        ("benchmark", "ok"),
        ("batch_error", "ok"),
        ("oom", "ok"),
    ]
    cuda, _, _, error, oom = records
    assert cuda["torch"] and cuda["cuda_available"] is False
    assert error["worst_p99"] < 1e-4 and error["answer_agreement"] == 1.0  # fp32: batches equal batch 1
    assert oom["ran_out_at"] == [2] and oom["fitted_at"] == 1 and oom["all_ok"]
    table = result.stdout.splitlines()
    assert table[0].split(" | ")[0].strip() == "check" and len(table) == 1 + len(records)
