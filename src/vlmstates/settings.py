"""Per-model extraction settings, the model family read from the checkpoint, and the config hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


#: `batch_size: auto`: the largest batch that fits the GPU (see vlmstates.engine.AUTO_BATCH_START).
AUTO_BATCH_SIZE = "auto"


class ConfigError(ValueError):
    """A config value cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelSettings:
    """One entry of the config's `models` map (the defaults match workflow/schemas/config.schema.yaml)."""

    name: str
    model: str
    revision: str | None = None
    dtype: str = "auto"
    batch_size: int | str = 8  # or AUTO_BATCH_SIZE
    layers: tuple[int, ...] | None = None
    max_new_tokens: int = 200
    prompt: str = "{question}"
    trust_remote_code: bool = False
    multimodal_representation: bool = False
    device: str = "auto"
    attn_implementation: str = "auto"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, entry: dict) -> "ModelSettings":
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {', '.join(unknown)}")
        if "model" not in entry:
            raise ConfigError(f"models.{name}.model is required (a hub id or a local folder)")
        values = dict(entry)
        if values.get("layers") is not None:
            values["layers"] = tuple(int(k) for k in values["layers"])
        size = values.get("batch_size", cls.batch_size)
        if size != AUTO_BATCH_SIZE and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ConfigError(f"models.{name}.batch_size must be a positive integer or {AUTO_BATCH_SIZE}, not {size!r}")
        if "{question}" not in values.get("prompt", "{question}"):
            raise ConfigError(f"models.{name}.prompt must contain {{question}}")
        return cls(name=name, **values)

    def identity(self) -> dict:
        """The settings that change the recorded numbers (batch size and device do not)."""
        values = asdict(self)
        for key in ("name", "batch_size", "device"):
            values.pop(key)
        return values

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def format_prompt(self, question: str) -> str:
        return self.prompt.replace("{question}", question)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """[0, n//4, n//2, 3n//4, n-1], deduplicated for very shallow models."""
    return tuple(sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1}))


def check_layers(layers: tuple[int, ...], num_layers: int, model_name: str) -> tuple[int, ...]:
    bad = [k for k in layers if not 0 <= k < num_layers]
    if bad:
        raise ConfigError(
            f"models.{model_name}.layers: {bad} out of range; the model has {num_layers} decoder blocks (0..{num_layers - 1})"
        )
    return tuple(sorted(set(layers)))


def read_checkpoint_config(model: str, revision: str | None = None) -> dict:
    """The checkpoint's config.json: from a local folder, or from the Hugging Face cache/hub."""
    local = Path(model)
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model}: a local folder without config.json is not a checkpoint")
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ConfigError(f"{model}: no such local folder, and not a hub id of the form owner/name")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model, "config.json", revision=revision)
        except Exception as error:  # offline, gated or unknown: say which and why
            raise ConfigError(f"{model}: cannot read config.json (revision {revision}): {error}") from error
    with open(path) as f:
        return json.load(f)


def model_type_of(model: str, revision: str | None = None) -> str:
    config = read_checkpoint_config(model, revision)
    if "model_type" not in config:
        raise ConfigError(f"{model}: config.json has no model_type")
    return config["model_type"]
