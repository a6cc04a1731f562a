"""Extraction settings (the shared ones and each model's), the model family read from the checkpoint, and the config hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from vlmstates.errors import VlmstatesError

#: `batch_size: auto`: the largest batch that fits the GPU (see vlmstates.extraction.batching.find_batch_size).
AUTO_BATCH_SIZE = "auto"
#: `layers: all`: every decoder block.
ALL_LAYERS = "all"

#: GenerationConfig fields the engine sets itself, so `generation` may not: why, per field.
ENGINE_GENERATION_FIELDS = {
    "do_sample": "answers are greedy",
    "num_beams": "answers are greedy, and the captured prefill has one row per sample",
    "num_return_sequences": "one answer per sample",
    "max_new_tokens": "set models.<name>.max_new_tokens",
    "min_new_tokens": "the engine fixes it (0, or the benchmark's answer length)",
    "pad_token_id": "the batch is padded with the tokenizer's pad token",
    "return_dict_in_generate": "the engine reads the generated token ids",
    "output_scores": "the engine reads the generated token ids",
    "output_logits": "the engine reads the generated token ids",
    "output_attentions": "the vectors are captured by hooks",
    "output_hidden_states": "the vectors are captured by hooks",
    "use_cache": "the engine sets it (prefill-only runs without a KV cache); models.<name>.decoding chooses the cache",
    "cache_implementation": "set models.<name>.decoding",
    "compile_config": "set models.<name>.decoding",
    "disable_compile": "set models.<name>.decoding",
}

#: `models.<name>.decoding`: how the answer is decoded after the prefill. DYNAMIC: transformers' default
#: cache, growing with the answer. STATIC: a KV cache allocated once at prompt + max_new_tokens, decoding
#: uncompiled. STATIC_COMPILED: the static cache, and each decoding step a torch.compile'd forward (the prefill
#: is never compiled). A measured option (BENCHMARKS.md), not the default.
DYNAMIC, STATIC, STATIC_COMPILED = "dynamic", "static", "static_compiled"
DECODINGS = (DYNAMIC, STATIC, STATIC_COMPILED)


class ConfigError(VlmstatesError, ValueError):
    """A config value cannot be used; the message names the key."""


@dataclass(frozen=True)
class ExtractionSettings:
    """The config's `extraction` section, the same for every model (the defaults are the schema's, tested)."""

    shard_size: int = 500  # questions per extraction job
    #: a job that has finished its shard extracts the model's unclaimed shards with the model it loaded
    reuse_loaded_model: bool = True
    max_failed_share: float = 0.05  # a shard in which more samples failed fails its job
    save_every: int = 64  # a job saves its finished samples every N, so that a rerun continues from there
    threads: int = 4  # CPU cores of an extraction job (the rule's threads; SLURM's cpus-per-gpu)
    #: worker processes that decode images and run the processor; AUTO_WORKERS: the job's threads less one
    preprocess_workers: int | str = "auto"


#: `extraction.preprocess_workers: auto`: one worker per core of the job but one, which drives the model.
AUTO_WORKERS = "auto"


def preprocess_workers_for(setting: int | str, threads: int) -> int:
    """Worker processes of a job with `threads` cores: the setting, or for AUTO_WORKERS `threads - 1`
    (0 with one core: its own process prepares batches, in one background thread)."""
    if setting == AUTO_WORKERS:
        return max(threads - 1, 0)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ConfigError(
            f"extraction.preprocess_workers must be {AUTO_WORKERS} or a whole number >= 0, not {setting!r}"
        )
    return setting


@dataclass(frozen=True)
class ModelSettings:
    """One entry of the config's `models` map (the defaults match workflow/schemas/config.schema.yaml)."""

    name: str
    model: str
    revision: str | None = None
    dtype: str = "auto"
    batch_size: int | str = 8  # or AUTO_BATCH_SIZE
    layers: tuple[int, ...] | str | None = None  # or ALL_LAYERS
    max_new_tokens: int = 200
    #: False: prefill-only extraction, the vectors without an answer (no decoding).
    answers: bool = True
    prompt: str = "{question}"
    trust_remote_code: bool = False
    multimodal_representation: bool = False
    #: True: also record VT at the position the HALP paper's code used for the family (paper_positions.PAPER_VISION_RULES).
    paper_positions: bool = False
    device: str = "auto"
    #: "auto", an implementation, or {text: ..., vision: ...} (vlmstates.extraction.attention checks it)
    attn_implementation: str | dict = "auto"
    options: dict = field(default_factory=dict)
    #: GenerationConfig fields over the checkpoint's generation_config.json for the answer (e.g.
    #: {repetition_penalty: 1.0} for plain greedy); empty keeps the checkpoint's settings.
    generation: dict = field(default_factory=dict)
    #: the image budget: the processor resizes every image to between min_pixels and max_pixels pixels (None: the
    #: checkpoint's own value); only families whose processor has such a control (vlmstates.extraction.image_budget)
    min_pixels: int | None = None
    max_pixels: int | None = None
    #: one of DECODINGS: the answer's KV cache, and whether its decoding steps are compiled
    decoding: str = DYNAMIC

    @classmethod
    def from_config(cls, name: str, entry: dict) -> ModelSettings:
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(f"models.{name}: unknown key(s) {', '.join(unknown)}")
        if "model" not in entry:
            raise ConfigError(f"models.{name}.model is required (a hub id or a local folder)")
        values = dict(entry)
        layers = values.get("layers")
        if isinstance(layers, str) and layers != ALL_LAYERS:
            raise ConfigError(
                f"models.{name}.layers must be a list of decoder blocks, {ALL_LAYERS} or null, not {layers!r}"
            )
        if layers is not None and layers != ALL_LAYERS:
            values["layers"] = tuple(int(k) for k in layers)
        size = values.get("batch_size", cls.batch_size)
        if size != AUTO_BATCH_SIZE and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise ConfigError(f"models.{name}.batch_size must be a positive integer or {AUTO_BATCH_SIZE}, not {size!r}")
        if "{question}" not in values.get("prompt", "{question}"):
            raise ConfigError(f"models.{name}.prompt must contain {{question}}")
        values["generation"] = check_generation_entry(name, values.get("generation", {}))
        check_pixel_budget(name, values.get("min_pixels"), values.get("max_pixels"))
        check_decoding_entry(name, values.get("decoding", cls.decoding), values.get("answers", cls.answers))
        return cls(name=name, **values)

    def identity(self) -> dict:
        """The settings that change the recorded numbers (batch size and device do not)."""
        values = asdict(self)
        for key in ("name", "batch_size", "device"):
            values.pop(key)
        # keys that came later: files written without them keep the hash they had
        if self.answers:
            values.pop("answers")
        if not self.paper_positions:
            values.pop("paper_positions")
        for key in ("min_pixels", "max_pixels"):
            if values[key] is None:
                values.pop(key)
        if self.decoding == DYNAMIC:
            values.pop("decoding")
        return values

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def format_prompt(self, question: str) -> str:
        return self.prompt.replace("{question}", question)


def check_generation_entry(name: str, generation) -> dict:
    """The `generation` mapping, checked without transformers (the workflow reads configs without it):
    a mapping, no field the engine sets itself, no null (which generate() would replace by the
    checkpoint's value). Whether each key is a GenerationConfig field is checked at load
    (`check_generation_fields`)."""
    key = f"models.{name}.generation"
    if generation is None:
        return {}
    if not isinstance(generation, dict):
        raise ConfigError(f"{key} must be a mapping of GenerationConfig fields to values, not {generation!r}")
    for field_name, value in generation.items():
        if field_name in ENGINE_GENERATION_FIELDS:
            raise ConfigError(f"{key}.{field_name} cannot be set: {ENGINE_GENERATION_FIELDS[field_name]}")
        if value is None:
            raise ConfigError(
                f"{key}.{field_name} is null, which generate() fills in from the checkpoint's generation_config.json; "
                f"give the value to use (e.g. repetition_penalty: 1.0 for none)"
            )
    return dict(generation)


def check_decoding_entry(name: str, decoding, answers: bool) -> None:
    """One of DECODINGS; other than DYNAMIC only where answers are decoded."""
    if decoding not in DECODINGS:
        raise ConfigError(f"models.{name}.decoding must be one of {', '.join(DECODINGS)}, not {decoding!r}")
    if decoding != DYNAMIC and answers is False:
        raise ConfigError(
            f"models.{name}.decoding: {decoding} does nothing with answers: false (prefill-only decodes nothing "
            f"and keeps no KV cache); remove the key"
        )


def check_pixel_budget(name: str, min_pixels, max_pixels) -> None:
    """Positive integers (or null), the lower bound not above the upper one."""
    for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"models.{name}.{key} must be a positive number of pixels or null, not {value!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(
            f"models.{name}: min_pixels {min_pixels} is above max_pixels {max_pixels}; the budget must be a range"
        )


def check_generation_fields(settings: ModelSettings) -> None:
    """Every `generation` key is a GenerationConfig field of the installed transformers (ConfigError naming
    models.<name>.generation.<key> otherwise)."""
    import difflib

    from transformers import GenerationConfig

    known = {k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"}
    for field_name in settings.generation:
        if field_name not in known:
            close = difflib.get_close_matches(field_name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"models.{settings.name}.generation.{field_name} is not a GenerationConfig field{hint}; "
                f"the fields are those of transformers' GenerationConfig, e.g. repetition_penalty, no_repeat_ngram_size"
            )


#: How many blocks `default_layers` picks in a model of eight blocks or more: what an extraction job's
#: memory request plans for when the config names no layers.
DEFAULT_LAYER_COUNT = 5


def default_layers(num_layers: int) -> tuple[int, ...]:
    """[0, n//4, n//2, 3n//4, n-1] (DEFAULT_LAYER_COUNT blocks), deduplicated for very shallow models."""
    return tuple(sorted({0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1}))


def recorded_layers(settings: ModelSettings, num_layers: int) -> tuple[int, ...]:
    """The decoder blocks a model with `num_layers` blocks records under these settings."""
    if settings.layers == ALL_LAYERS:
        return tuple(range(num_layers))
    return check_layers(tuple(settings.layers or default_layers(num_layers)), num_layers, settings.name)


def check_layers(layers: tuple[int, ...], num_layers: int, model_key: str) -> tuple[int, ...]:
    bad = [k for k in layers if not 0 <= k < num_layers]
    if bad:
        raise ConfigError(
            f"models.{model_key}.layers: {bad} out of range; the model has {num_layers} decoder blocks (0..{num_layers - 1})"
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
