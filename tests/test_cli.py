"""The command line itself: --version, and a reader of stdout that goes away early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tomllib
from conftest import REPO

from vlmstates.store import VISION_ONLY, SampleResult, write_embeddings

CLI = [sys.executable, "-m", "vlmstates"]


def test_version_is_pyprojects():
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    result = subprocess.run(CLI + ["--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"vlmstates {expected}"


@pytest.fixture
def embeddings(tmp_path):
    rows = [
        SampleResult(
            f"q{i}", f"img{i}.png", "Is there a cat?", "yes", answer="no", vectors={VISION_ONLY: np.ones(4) * i}
        )
        for i in range(3)
    ]
    return write_embeddings(tmp_path / "embeddings.h5", rows, {VISION_ONLY: 4}, {"model": "m", "config_hash": "h"})


def run_into_closed_pipe(arguments, unbuffered):
    """Start the command with its stdout a pipe whose reading end is already closed, as `| head -1` leaves
    it once head has its line (closed before the interpreter has even started, so every write fails).

    Buffered, the failure shows when stdout is flushed; unbuffered, at the first print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": "1"} if unbuffered else {}
    )
    process = subprocess.Popen(CLI + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_a_reader_that_closes_early_ends_inspect_quietly(embeddings, unbuffered):
    code, stderr = run_into_closed_pipe(["inspect", str(embeddings)], unbuffered)
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
    assert code == 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports, so pipefail still sees it


def test_help_into_a_closed_pipe_is_quiet():
    code, stderr = run_into_closed_pipe(["--help"], unbuffered=False)
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr, stderr
    assert code in (0, 128 + signal.SIGPIPE)  # argparse itself ignores a failed write of the help


def test_version_of_an_uninstalled_source_tree_is_pyprojects():
    """As the workflow's jobs import the package: from src/ on PYTHONPATH, in an environment that does not
    have it installed (-S leaves out site-packages, where this one's installation is recorded)."""
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    code = "import vlmstates; print(vlmstates.__version__)"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == expected, result.stderr
