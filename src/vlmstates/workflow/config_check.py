"""The workflow's config checked against its schema, with one short line per problem.

snakemake.utils.validate prints the whole schema with an error (hundreds of lines for a typo); this names
the key by its dotted path (`models.qwen.batchsize`), says what is wrong and, for an unknown key, which
allowed key it probably meant. Defaults are filled in first, as validate(set_default=True) does.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import jsonschema
import yaml

from vlmstates.analysis.labels import FILE, RENAMED_METHODS
from vlmstates.analysis.probes.saved import parse_probe_spec
from vlmstates.settings import ConfigError

#: Values a key no longer takes, by its dotted path, with what to write instead.
RENAMED_VALUES = {"labels.method": RENAMED_METHODS}
MAX_PROBLEMS = 5  # more than a few problems at once is a wrong file; the first ones say so
MAX_VALUE_CHARS = 60


def load_schema(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def fill_defaults(instance, schema: dict) -> None:
    """Set the schema's `default` of every absent key, section defaults first so that their own keys'
    defaults follow; model entries (additionalProperties) get theirs too."""
    if not isinstance(instance, dict):
        return
    properties = schema.get("properties", {})
    for key, spec in properties.items():
        if key not in instance and "default" in spec:
            instance[key] = copy.deepcopy(spec["default"])  # never share the schema's own lists and dicts
        if key in instance:
            fill_defaults(instance[key], spec)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in properties:
                fill_defaults(value, extra)


def key_path(parts) -> str:
    return ".".join(str(part) for part in parts) or "(top level)"


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def unknown_key_problems(error) -> list[str]:
    """One line per key that additionalProperties: false refuses, with the closest allowed key."""
    allowed = sorted(error.schema.get("properties", {}))
    lines = []
    for key in sorted(set(error.instance) - set(allowed)):
        where = key_path([*error.absolute_path, key])
        guess = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean `{guess[0]}`?" if guess else f"allowed: {', '.join(allowed)}"
        lines.append(f"`{where}`: unknown key; {hint}")
    return lines


def problem_lines(error) -> list[str]:
    """What is wrong at one key, in a line, without the schema or the whole instance."""
    where = key_path(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        return unknown_key_problems(error)
    if kind == "required":
        missing = [key for key in error.validator_value if key not in error.instance]
        return [f"`{key_path([*error.absolute_path, key])}`: required, but not set" for key in missing]
    if kind == "enum":
        choices = ", ".join(map(str, error.validator_value))
        renamed = RENAMED_VALUES.get(where, {}).get(error.instance)
        return [f"`{where}`: {short(error.instance)} is not one of: {choices}" + (f"; {renamed}" if renamed else "")]
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [f"`{where}`: expected {expected}, got {short(error.instance)}"]
    if kind == "propertyNames":
        return [f"`{where}`: the name {short(error.instance)} is not allowed ({error.message.split(' does ')[-1]})"]
    if kind == "oneOf":
        described = [spec.get("enum") or spec.get("type") for spec in error.validator_value]
        return [f"`{where}`: {short(error.instance)} is none of: {', '.join(map(str, described))}"]
    message = error.message.replace(repr(error.instance), short(error.instance))
    return [f"`{where}`: {message}"]


def unlabelled_models(config: dict) -> list[str]:
    """The prefill-only models (`answers: false`) when the label method judges answers: they have none to
    judge, so the workflow extracts and inspects them but leaves them out of labels and probes. Method
    `file`, which reads the labels from a file, labels them too."""
    if config["labels"]["method"] == FILE:
        return []
    return [name for name, entry in config["models"].items() if entry.get("answers") is False]


def unlabelled_line(config: dict) -> str | None:
    """The one line a run starts with when it leaves models out of labels and probes, else None."""
    names = unlabelled_models(config)
    if not names:
        return None
    return (
        f"vlmstates: {', '.join(names)}: prefill-only (answers: false), so extracted and inspected but left out "
        f"of labels and probes (labels.method {config['labels']['method']} judges answers; labels.method: file "
        f"with a labels file brings {'them' if len(names) > 1 else 'it'} in)"
    )


def dataset_problems(config: dict) -> list[str]:
    """`dataset` names its questions one way: `csv` with `images`, or `source`."""
    dataset = config["dataset"]
    if "source" in dataset:
        extra = [key for key in ("csv", "images") if key in dataset]
        if extra:
            return [f"`dataset.{extra[0]}`: set together with `dataset.source`; give one of the two"]
        sources = dataset["source"] if isinstance(dataset["source"], list) else []
        names = [entry.get("name") for entry in sources]
        if len(sources) > 1 and (None in names or len(set(names)) < len(names)):
            return ["`dataset.source`: a list of sources needs a different `name` for each (its `dataset` column)"]
        return []
    return [
        f"`dataset.{key}`: required, but not set (or give `dataset.source`)"
        for key in ("csv", "images")
        if key not in dataset
    ]


def screen_problems(config: dict) -> list[str]:
    """`screen` must name a model of `models` and a probe that the probe settings train and keep."""
    screen = config.get("screen")
    if not screen:
        return []
    if screen["model"] not in config["models"]:
        known = ", ".join(config["models"])
        return [f"`screen.model`: {screen['model']!r} is not a model of `models` (known: {known})"]
    if screen["model"] in unlabelled_models(config):
        return [
            f"`screen.model`: {screen['model']} is prefill-only (answers: false) and labels.method "
            f"{config['labels']['method']} judges answers, so it has no probes to screen with; choose a model "
            "with answers, or set labels.method: file (with labels.file)"
        ]
    probes = config["probes"]
    if probes["split"] == "kfold":
        return ["`screen`: probes.split kfold keeps no probe to screen with; set probes.split: grouped (or halp)"]
    spec = parse_probe_spec(screen["probe"])  # the schema's pattern has let only parseable names through
    if spec is None:
        return []
    if spec.representation not in probes["representations"] or spec.kind not in probes["probes"]:
        return [
            f"`screen.probe`: {screen['probe']} is not trained (probes.representations "
            f"{probes['representations']}, probes.probes {probes['probes']}); add it there or choose another"
        ]
    return []


def check_config(config: dict, schema_path, source: str = "the config file") -> dict:
    """Fill in defaults and validate `config` in place; raise ConfigError naming every bad key.
    `source` names where the config came from, for the fix."""
    schema = load_schema(schema_path)
    fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    lines = [line for error in errors for line in problem_lines(error)]
    if not lines:
        lines = dataset_problems(config) + screen_problems(config)
    if lines:
        shown = lines[:MAX_PROBLEMS]
        if len(lines) > MAX_PROBLEMS:
            shown.append(f"... and {len(lines) - MAX_PROBLEMS} more")
        raise ConfigError(
            "invalid config (config/README.md lists every key):\n  "
            + "\n  ".join(shown)
            + f"\nFix it in {source} (or the --config value), then run again."
        )
    return config
