"""The docs against the tree: the README's stage table names modules that exist."""

from __future__ import annotations

import re

from helpers import REPO

PACKAGE = REPO / "src" / "vlmstates"


def stage_table_modules(readme: str) -> list[str]:
    """The module column's names, each made relative to src/vlmstates/: a name without a folder inside
    parentheses after one with a folder is in that folder (`extraction/engine.py` (`batching.py`))."""
    table = re.search(r"^\| stage \|.*?\n\n", readme, re.M | re.S)
    assert table, "README.md: no stage table"
    names = []
    for row in table.group(0).strip().splitlines()[2:]:
        folder = ""
        for name in re.findall(r"`([^`]+)`", row.split("|")[4]):
            if "/" in name.rstrip("/"):
                folder = name.rsplit("/", 1)[0] + "/" if name.endswith(".py") else name
                names.append(name)
            else:
                names.append(folder + name if (PACKAGE / folder / name).exists() else name)
    return names


def test_the_readme_stage_table_names_modules_that_exist():
    names = stage_table_modules((REPO / "README.md").read_text())
    assert "analysis/screen.py" in names and "extraction/batching.py" in names
    assert [name for name in names if not (PACKAGE / name).exists()] == []
