"""Every family is in the seven places docs/adding-a-family.md lists, or declared exempt from one (EXEMPT).

The places are found as the code and the docs name them: the family table's adapter (an entry of
adapters/entries.py or an adapter module of its own), the tiny checkpoint's builder in demo/tiny/ and the row
that registers it, envs/<family>.yaml, a case of tests/test_family_contract.py, a model of
config/all-families.yaml and a row of config/README.md's Models table (which says each checkpoint's family,
so it is how the example config's models are told apart).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml
from test_family_contract import CASES

from vlmstates.demo.tiny import TINY_FAMILIES, tiny_builder
from vlmstates.extraction.adapters import adapter_class, families
from vlmstates.extraction.adapters.entries import ENTRIES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "vlmstates"
GUIDE = "docs/adding-a-family.md"

PLACES = (
    "adapter",
    "tiny builder",
    "tiny registry row",
    "env file",
    "contract case",
    "example config",
    "Models table",
)

_MOLMO_HAS_NO_TINY_CHECKPOINT = (
    "Molmo exists only as remote code with a full-size CLIP tower written into it, so no tiny checkpoint of the "
    "real code can be built; tests/molmo_standin/ builds a stand-in of its interface instead"
)
#: (family, place) -> why the family has no such place, and what stands in for it
EXEMPT = {
    ("molmo", "tiny builder"): _MOLMO_HAS_NO_TINY_CHECKPOINT,
    ("molmo", "tiny registry row"): _MOLMO_HAS_NO_TINY_CHECKPOINT,
    ("molmo", "contract case"): (
        "tests/test_molmo.py checks the same contract on the stand-in, under transformers 5.x and, in the second "
        "test environment (.ci/molmo-env.sh), the 4.48.3 that the real remote code needs"
    ),
}


def models_table() -> dict[str, str]:
    """config/README.md's Models table: checkpoint (the `model` column) -> family (the family column's first word)."""
    lines = (REPO / "config" / "README.md").read_text().split("\n## Models\n", 1)[1].splitlines()
    rows = [line for line in lines[2:] if line.startswith("|")]  # after the header and its rule, up to the text
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table[re.search(r"`([^`]+)`", cells[1]).group(1)] = cells[3].split()[0]
    return table


def example_config_models() -> dict[str, str]:
    """config/all-families.yaml: model name -> its checkpoint."""
    config = yaml.safe_load((REPO / "config" / "all-families.yaml").read_text())
    return {name: entry["model"] for name, entry in config["models"].items()}


def tiny_builders_in_source() -> dict[str, tuple[str, str]]:
    """family -> (module, function) of each builder in demo/tiny/: `build` in <family>.py, or a `build_<family>`."""
    found = {}
    for path in sorted((PACKAGE / "demo" / "tiny").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "build":
                found.setdefault(path.stem, (path.stem, node.name))
            elif isinstance(node, ast.FunctionDef) and node.name.startswith("build_"):
                found[node.name.removeprefix("build_")] = (path.stem, node.name)
    return found


def find(family: str, place: str) -> str | None:
    """Where `family` is in `place`, or None."""
    if place == "adapter":
        adapter = adapter_class(family)
        if inspect.isabstract(adapter) or adapter.family != family:
            return None
        if family in ENTRIES:
            return "an entry of adapters/entries.py"
        own = Path(inspect.getsourcefile(adapter))
        return f"adapters/{own.name}" if own.parent == PACKAGE / "extraction" / "adapters" else None
    if place == "tiny builder":
        module, function = tiny_builders_in_source().get(family, (None, None))
        return module and f"demo/tiny/{module}.py: {function}"
    if place == "tiny registry row":
        if family not in TINY_FAMILIES:
            return None
        builder = tiny_builder(family)
        named = (builder.__module__.rsplit(".", 1)[-1], builder.__name__)
        return "demo/tiny/__init__.py" if named == tiny_builders_in_source().get(family) else None
    if place == "env file":
        path = REPO / "envs" / f"{family}.yaml"
        return (
            str(path) if path.is_file() and yaml.safe_load(path.read_text())["name"] == f"vlmstates-{family}" else None
        )
    if place == "contract case":
        return "tests/test_family_contract.py" if family in {case.family for case in CASES} else None
    if place == "example config":
        table = models_table()
        names = [name for name, model in example_config_models().items() if table.get(model) == family]
        return f"config/all-families.yaml: {names[0]}" if len(names) == 1 else None
    if place == "Models table":
        return "config/README.md" if family in models_table().values() else None
    raise ValueError(place)


@pytest.mark.parametrize("family", families())
def test_every_family_is_in_every_place_or_declared_exempt(family):
    """Each place holds the family (the example config exactly one model of it), or EXEMPT says why it cannot;
    an exemption whose place exists is stale."""
    missing = [place for place in PLACES if find(family, place) is None and (family, place) not in EXEMPT]
    assert missing == [], f"{family}: missing from {', '.join(missing)} (see {GUIDE})"
    stale = [place for place in PLACES if (family, place) in EXEMPT and find(family, place) is not None]
    assert stale == [], f"{family}: exempt from {', '.join(stale)}, which it has: remove the exemption"


def test_exemptions_name_families_and_places_and_every_example_model_is_in_the_models_table():
    assert {family for family, _ in EXEMPT} <= set(families())
    assert {place for _, place in EXEMPT} <= set(PLACES)
    table = models_table()
    assert set(table.values()) <= set(families()), "a Models table row names no family of the family table"
    unknown = {name: model for name, model in example_config_models().items() if model not in table}
    assert unknown == {}, "config/all-families.yaml: checkpoints missing from config/README.md's Models table"
