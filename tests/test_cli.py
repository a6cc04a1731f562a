"""The command line itself: --version, and a reader of stdout that goes away early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tomllib
from helpers import REPO, VLMSTATES

from vlmstates.analysis.probes.saved import SavedProbe, write_saved_probes
from vlmstates.cli import main
from vlmstates.store import VISION_ONLY, SampleResult, write_embeddings

CLI = VLMSTATES


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


# -- a file that is not an embeddings file: one line naming it, exit status 1 --------------------------------
def garbage_file(folder):
    path = folder / "garbage.h5"
    path.write_bytes(b"not an HDF5 file\n" * 64)
    return path


def foreign_file(folder):
    """An HDF5 file of someone else's layout."""
    path = folder / "foreign.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((3, 4), dtype=np.float32)
    return path


def saved_probe_folder(folder):
    probe = SavedProbe(
        id="VF_logreg", kind="logreg", representation="VF", key=VISION_ONLY, layer=None, dim=4,
        mean=np.zeros(4), std=np.ones(4), params={"coef": np.ones(4), "intercept": np.zeros(1)},
        threshold=0.0, threshold_rule="risk 0.5", metrics={"val_auroc": 0.5},
    )  # fmt: skip
    return write_saved_probes(folder / "saved", [probe], {})


def command_line(command, bad, folder, table) -> list[str]:
    return {
        "label": ["label", str(bad)],
        "probe": ["probe", str(bad), str(folder / "labels.csv")],
        "screen": ["screen", str(saved_probe_folder(folder)), str(bad), "-o", str(folder / "scores.csv")],
        "inspect": ["inspect", str(bad)],
        "merge": ["merge", "--table", str(table), "--out", str(folder / "merged.h5"), str(bad)],
    }[command]


@pytest.mark.parametrize("make_file", [garbage_file, foreign_file])
@pytest.mark.parametrize("command", ["label", "probe", "screen", "inspect", "merge"])
def test_a_file_that_is_not_an_embeddings_file_is_one_line_naming_it(command, make_file, tmp_path, demo, capsys):
    bad = make_file(tmp_path)
    assert main(command_line(command, bad, tmp_path, demo[0])) == 1
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if not line[:4].isdigit()]  # log lines start with the date
    assert len(messages) == 1 and messages[0].startswith(f"vlmstates {command}: "), err
    assert str(bad) in messages[0]
