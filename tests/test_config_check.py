"""Config errors: one short line per bad key, with the key's dotted path and the key probably meant."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO
from test_workflow import default_config, snakemake, workdir_with_config

from vlmstates.settings import ConfigError
from vlmstates.workflow.config_check import check_config, fill_defaults, load_schema

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def test_defaults_are_filled_in_for_sections_and_model_entries():
    config = {"dataset": {"csv": "q.csv", "images": "img"}, "models": {"m": {"model": "x"}}}
    check_config(config, SCHEMA)
    assert config["results"] == "results"
    assert config["extraction"]["save_every"] == 64 and config["labels"]["method"] == "halp_paper"
    assert config["models"]["m"]["batch_size"] == 8 and config["models"]["m"]["options"] == {}
    assert config["probes"]["mlp_hidden"] == [512, 256, 128]


def test_filled_defaults_are_copies_of_the_schema_values():
    schema = load_schema(SCHEMA)
    first, second = {"probes": {}}, {"probes": {}}
    fill_defaults(first, schema)
    first["probes"]["mlp_hidden"].append(1)
    fill_defaults(second, schema)
    assert second["probes"]["mlp_hidden"] == [512, 256, 128]


def test_given_values_are_kept():
    config = default_config()
    check_config(config, SCHEMA)
    assert config["labels"] == {"method": "file", "file": "resources/demo/labels.csv"}
    assert config["extraction"]["shard_size"] == 16


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c.update(reslts="out"), "`reslts`: unknown key; did you mean `results`?"),
        (lambda c: c["labels"].update(metod="halp_paper"), "`labels.metod`: unknown key; did you mean `method`?"),
        (
            lambda c: c["models"]["tiny-gemma3"].update(batchsize=2),
            "`models.tiny-gemma3.batchsize`: unknown key; did you mean `batch_size`?",
        ),
        (
            lambda c: c["labels"].update(method="judge"),
            "`labels.method`: 'judge' is not one of: halp_paper, difflib_lenient, yesno, exact, file\n",
        ),
        (
            lambda c: c["labels"].update(method="halp"),
            "`labels.method`: 'halp' is not one of: halp_paper, difflib_lenient, yesno, exact, file; renamed: "
            "`halp_paper` is the HALP paper's label (the rule its probes learn), `difflib_lenient` is what `halp` was",
        ),
        (lambda c: c["extraction"].update(shard_size="big"), "`extraction.shard_size`: expected integer, got 'big'"),
        (lambda c: c["dataset"].pop("csv"), "`dataset.csv`: required, but not set"),
        (lambda c: c["models"]["tiny-gemma3"].update(batch_size=0), "`models.tiny-gemma3.batch_size`: 0 is none of"),
        (lambda c: c.update(xyzzy=1), "`xyzzy`: unknown key; allowed: dataset, export, extraction, labels"),
    ],
)
def test_each_problem_names_the_key_and_the_fix(change, expected):
    config = default_config()
    change(config)
    with pytest.raises(ConfigError) as error:
        check_config(config, SCHEMA, source="my.yaml")
    message = str(error.value)
    assert expected in message
    assert "Fix it in my.yaml" in message
    assert len(message.splitlines()) <= 4


def test_many_problems_are_cut_short():
    config = default_config()
    config["models"]["tiny-gemma3"].update({f"typo{k}": k for k in range(20)})
    with pytest.raises(ConfigError) as error:
        check_config(config, SCHEMA)
    assert "... and 15 more" in str(error.value) and len(str(error.value).splitlines()) < 10


@pytest.mark.parametrize(
    "where, change, expected",
    [
        ("top level", lambda c: c.update(reslts="out"), "`reslts`: unknown key; did you mean `results`?"),
        (
            "section",
            lambda c: c["extraction"].update(shard_sise=4),
            "`extraction.shard_sise`: unknown key; did you mean `shard_size`?",
        ),
        (
            "model entry",
            lambda c: c["models"]["tiny-qwen2_5_vl"].update(max_new_token=4),
            "`models.tiny-qwen2_5_vl.max_new_token`: unknown key; did you mean `max_new_tokens`?",
        ),
    ],
)
def test_workflow_prints_a_short_config_error(tmp_path, where, change, expected):
    config = default_config()
    change(config)
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump(config))
    result = snakemake(
        workdir_with_config(tmp_path / "w", default_config()), "-n", "--configfile", str(user), check=False
    )
    output = result.stdout + result.stderr  # Snakemake prints a Snakefile's error on stdout
    assert result.returncode != 0
    assert expected in output, output
    assert f"Fix it in {user}" in output
    assert len(output.splitlines()) < 15, output
    assert not re.search(r"additionalProperties|\$schema|description:", output)  # no schema dump


def schema_keys(schema: dict, path: tuple = ()) -> list[tuple]:
    """Every key the schema knows, as a path: sections, their keys and a model entry's keys."""
    keys = []
    for key, spec in schema.get("properties", {}).items():
        keys.append((*path, key))
        keys += schema_keys(spec, (*path, key))
    if isinstance(schema.get("additionalProperties"), dict):
        keys += schema_keys(schema["additionalProperties"], (*path, "<name>"))
    return keys


def documented_keys(readme: str) -> dict[str, set[str]]:
    """Per section of config/README.md (a "## `section`" heading), the keys its table rows describe: the
    names in backticks in a row's first cell (one row may describe several, e.g. the three fractions)."""
    sections: dict[str, set[str]] = {}
    section = None
    for line in readme.splitlines():
        if heading := re.match(r"## `(\w+)`", line):
            section = heading[1]
            sections[section] = set()
        elif section and line.startswith("| `"):
            sections[section] |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return sections


def test_every_schema_key_has_a_row_in_the_config_readme():
    documented = documented_keys((REPO / "config" / "README.md").read_text())
    keys = schema_keys(load_schema(SCHEMA))
    assert ("extraction", "save_every") in keys and ("models", "<name>", "batch_size") in keys
    # a section is documented by its heading, each key below it by a row of the section's table
    missing = [
        ".".join(key) for key in keys if key[0] not in documented or key[-1] not in documented[key[0]] | {key[0]}
    ]
    assert not missing, f"config/README.md has no row for: {', '.join(missing)}"
