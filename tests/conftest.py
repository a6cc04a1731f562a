"""Shared fixtures: tiny checkpoints of the real architectures and the demo set, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmstates.dataset import validate_dataset, write_validation_outputs
from vlmstates.demo.dataset import write_demo_dataset
from vlmstates.demo.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """family -> folder of its tiny checkpoint (built on first use)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_checkpoint(family, root / f"tiny-{family}")
        return built[family]

    return get


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo set, validated: (validated table path, images folder)."""
    root = tmp_path_factory.mktemp("demo")
    csv = write_demo_dataset(root)
    table = root / "validated.csv"
    write_validation_outputs(validate_dataset(csv, root / "images"), table, root / "v.json", root / "v.md")
    return table, root / "images"
