"""What tests share besides fixtures: the repository's paths and the commands' command lines."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
