"""The adapter protocol: everything the engine needs to know about one model family.

The engine never names a model. An adapter says how to load a checkpoint, how to turn samples into a
left-padded batch, where the image placeholder tokens are, which modules are the decoder blocks and the
vision-to-language projector, and how to pool the projector's input per sample.

`Adapter` declares what every family must give as abstract members (a family class that lacks one cannot be
instantiated) and implements the rest once, after transformers' image-text-to-text processors (the chat
template, `processor(text=..., images=...)`, `generate`); a family overrides only what differs. `load()` is
one sequence for every family; the hooks it calls are what families vary. What only the tests and the
benchmark read, never extraction, is declared apart, in `BenchmarkAndTestMembers`. The families of the
common layout give every member as data (vlmstates.extraction.adapters.entries); docs/adding-a-family.md
says where else a family is named.
"""

from __future__ import annotations

import copy
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image

from vlmstates.extraction.adapters.processors import load_processor
from vlmstates.extraction.attention import TEXT
from vlmstates.extraction.image_budget import apply_image_budget
from vlmstates.extraction.positions import Positions, find_positions
from vlmstates.settings import DYNAMIC, STATIC, ConfigError, ModelSettings


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    adapter: Adapter
    settings: ModelSettings
    device: torch.device
    dtype: torch.dtype
    #: the decoder's attention implementation (vlmstates.extraction.attention.loaded_attention: each sub-model's)
    attn_implementation: str


@dataclass
class Batch:
    """Model inputs for a left-padded batch, and what the engine needs to find positions."""

    inputs: dict
    input_ids: torch.Tensor  # [B, L], padded on the left
    attention_mask: torch.Tensor  # [B, L]


class BenchmarkAndTestMembers(ABC):
    """What every family gives for the benchmark and the tests only: extraction never calls these."""

    @abstractmethod
    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder's final norm, which output_hidden_states applies to its last entry (tests/oracle.py)."""

    @abstractmethod
    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision encoder, before the projector (its parameters; the vision tokens the benchmark counts)."""

    @abstractmethod
    def vision_features(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """The vision encoder run on its own on one sample's inputs ([tokens, D]): the separate vision
        pass of a HALP-style loop, which the benchmark compares the engine with."""


class Adapter(BenchmarkAndTestMembers):
    """One family's answers to the engine. Arguments throughout: `loaded` (a LoadedModel) where the
    processor or settings matter, else `model`; `batch` (a Batch that this adapter's build_batch made).

    The abstract members are what every family gives; the others are defaults that a family overrides
    where it differs.
    """

    #: Largest batch the family can run exactly; the engine caps the batch size there (None: no limit).
    max_batch_size: ClassVar[int | None] = None
    #: Legacy ``image_processor_type`` names of the family's checkpoints -> the transformers class they
    #: now are (see vlmstates.extraction.adapters.processors); an unknown name stops the load with the fix.
    legacy_image_processors: ClassVar[dict[str, str]] = {}
    #: What the vision token (VT) and the vision-only vector (VF) hold in this family; written into each
    #: file's `semantics` attribute (key "family") and config/README.md.
    semantics: ClassVar[str] = ""
    #: Why the family cannot decode with a static cache (`decoding: static`, `static_compiled`); empty: it can.
    no_static_cache: ClassVar[str] = ""

    @property
    @abstractmethod
    def family(self) -> str:
        """The family's name (a class attribute in each family): the key of the family table, envs/<family>.yaml."""

    # -- loading ---------------------------------------------------------------------------------
    def load(
        self, settings: ModelSettings, device: torch.device, dtype: torch.dtype, attention: dict[str, str]
    ) -> LoadedModel:
        """The checkpoint's processor and model, on `device` in eval mode. `attention`: the implementation of
        each sub-model ({text: ..., vision: ...}, attention.choose_attention). The steps are every family's;
        the hooks are where families differ."""
        revision = self.revision(settings)
        self.check_settings(settings, revision)
        processor = self.load_processor(settings, revision)
        model = self.load_model(settings, revision, dtype, attention, device)
        self.prepare_model(model)
        model.eval()
        return LoadedModel(model, processor, self, settings, device, dtype, self.recorded_attention(attention))

    def revision(self, settings: ModelSettings) -> str | None:
        """The checkpoint revision to load: the configured one."""
        return settings.revision

    def check_settings(self, settings: ModelSettings, revision: str | None) -> None:
        """Refuse, before anything is loaded, settings or a checkpoint the family cannot run (a ConfigError
        naming the key); nothing to refuse by default."""

    def recorded_attention(self, attention: dict[str, str]) -> str:
        """The attention implementation the file records (attribute attn_implementation): the decoder's."""
        return attention[TEXT]

    def load_processor(self, settings: ModelSettings, revision: str | None):
        """The checkpoint's processor (legacy image-processor names mapped), left-padding its tokenizer."""
        processor = load_processor(
            settings.model,
            revision,
            settings.trust_remote_code,
            self.legacy_image_processors,
            f"models.{settings.name}",
        )
        processor.tokenizer.padding_side = "left"
        apply_image_budget(processor, self.family, settings)
        return processor

    @abstractmethod
    def load_model(
        self,
        settings: ModelSettings,
        revision: str | None,
        dtype: torch.dtype,
        attention: dict[str, str],
        device: torch.device,
    ) -> torch.nn.Module:
        """The checkpoint's model, its weights in `dtype` read straight onto `device` (from_pretrained's
        `device_map=device`: no whole copy in host memory first, no later move), each sub-model with its
        `attention` (attention.from_pretrained_argument gives transformers' form)."""

    def prepare_model(self, model: torch.nn.Module) -> None:
        """What the family's model needs once its weights are in, before it runs (none by default)."""

    # -- batches ---------------------------------------------------------------------------------
    def chat_prompt(self, loaded: LoadedModel, text: str) -> str:
        """The model's own chat template: one user turn, the image then the text, generation prompt added."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def processor_images(self, images: list[Image.Image]) -> list:
        return images

    def build_batch(self, loaded: LoadedModel, texts: list[str], images: list[Image.Image]) -> Batch:
        prompts = [self.chat_prompt(loaded, t) for t in texts]
        # The chat template already renders every special token (Gemma's <bos> too), so the
        # tokenizer must not add its own, as transformers' apply_chat_template(tokenize=True) does.
        encoded = loaded.processor(
            text=prompts,
            images=self.processor_images(images),
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        inputs = {k: v.to(loaded.device) if torch.is_tensor(v) else v for k, v in encoded.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        return Batch(inputs=inputs, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

    def batch_group(self, loaded: LoadedModel, width: int, height: int) -> object:
        """Samples are only batched with others of the same group (e.g. equal crop counts). The engine
        plans batches from the image files' headers, before decoding, so a group depends on the size alone."""
        return None

    def image_token_estimate(self, loaded: LoadedModel, width: int, height: int) -> int:
        """Image tokens the processor puts in a prompt for an image of this size, where the processor can
        tell without the pixels (transformers' `_get_num_multimodal_tokens`), else 0. Only orders batches."""
        count = getattr(loaded.processor, "_get_num_multimodal_tokens", None)
        if count is None:
            return 0
        return int(count(image_sizes=[(height, width)]).num_image_tokens[0])

    # -- positions and modules -------------------------------------------------------------------
    def find_positions(self, loaded: LoadedModel, batch: Batch) -> Positions:
        """Last image-placeholder token (the config's image token id) and last prompt token per row."""
        return find_positions(batch.input_ids, batch.attention_mask, self.image_token_id(loaded.model))

    @abstractmethod
    def image_token_id(self, model: torch.nn.Module) -> int:
        """The id of the image placeholder token in `input_ids`."""

    @abstractmethod
    def decoder_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The decoder blocks, in order: their outputs are the recorded layers."""

    def block_hidden_states(self, output) -> torch.Tensor:
        """A decoder block's output -> its hidden states [B, L, D], what VT, QT and MM are taken from."""
        return output[0] if isinstance(output, tuple) else output

    @abstractmethod
    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision-to-language projector: its input, captured by a hook, is the vision-only vector."""

    @abstractmethod
    def pool_projector_input(self, projector_input: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The projector's input of one forward (the whole batch's) -> each sample's mean over its own rows
        and patches, never over padding: [B, Dv]."""

    def hidden_size(self, model: torch.nn.Module) -> int:
        return int(model.config.get_text_config().hidden_size)

    def vision_hidden_size(self, model: torch.nn.Module) -> int:
        """Width of the projector's input, the vision-only vector."""
        return int(model.config.vision_config.hidden_size)

    def max_prompt_tokens(self, model: torch.nn.Module) -> int | None:
        return getattr(model.config.get_text_config(), "max_position_embeddings", None)

    # -- generation ------------------------------------------------------------------------------
    def answer_generation_config(
        self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ):
        """The GenerationConfig the answer's generate() is given: the checkpoint's generation_config.json
        (its authors' settings, e.g. Qwen2.5-VL's repetition_penalty 1.05), the config's `generation`
        fields over it, then what the engine fixes: greedy, one sequence per sample (the captured prefill
        has one row per sample), its length limits, the tokenizer's pad token, and the KV cache: none
        without `use_cache` (prefill-only: nothing reads it), else the one `decoding` chooses."""
        config = copy.deepcopy(loaded.model.generation_config)
        config.update(**loaded.settings.generation)
        config.update(
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=loaded.processor.tokenizer.pad_token_id,
            use_cache=use_cache,
            **(decoding_fields(loaded.settings.decoding) if use_cache else {}),
        )
        return config

    def effective_generation(
        self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ) -> dict:
        """The settings generate() runs the answer with, for the file's attributes (`recorded_generation`)."""
        config = self.answer_generation_config(loaded, max_new_tokens, min_new_tokens, use_cache)
        prepare = getattr(loaded.model, "_prepare_generation_config", None)
        # what generate() does first with a given config: unset fields from the model's, then transformers'
        # defaults (which give the values of the greedy fields nobody set)
        filled = prepare(config)[0] if prepare is not None else config
        return recorded_generation(config, filled)

    def generate(
        self, loaded: LoadedModel, batch: Batch, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ) -> list[str]:
        """Greedy answers, one call: the engine's hooks capture its prefill step. `use_cache` False: without
        a KV cache (prefill-only, whose forward ends after the last recorded block)."""
        tokenizer = loaded.processor.tokenizer
        config = self.answer_generation_config(loaded, max_new_tokens, min_new_tokens, use_cache)
        sequences = loaded.model.generate(**batch.inputs, generation_config=config)
        new_tokens = sequences[:, batch.input_ids.shape[1] :]
        return [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def decoding_fields(decoding: str) -> dict:
    """The GenerationConfig fields of a `decoding` setting (settings.DECODINGS). DYNAMIC sets none, so that
    its record is what files had before the setting existed (transformers' default cache: a checkpoint's
    cache_implementation "hybrid", Gemma 3's, is dropped by generate() itself)."""
    if decoding == DYNAMIC:
        return {}
    if decoding == STATIC:
        # on CUDA transformers compiles a static cache's decoding steps unless told not to
        return {"cache_implementation": "static", "disable_compile": True}
    from transformers import CompileConfig

    compiled = CompileConfig()  # transformers' defaults for generate(): not fullgraph, mode reduce-overhead
    compiled._compile_all_devices = True  # transformers' own switch to compile off CUDA too (the CPU benchmark)
    return {"cache_implementation": "static", "compile_config": compiled, "disable_compile": False}


def check_decoding(adapter: Adapter, settings: ModelSettings) -> None:
    """A `decoding` other than DYNAMIC only for a family that can decode with a static cache (ConfigError naming
    models.<name>.decoding and why otherwise), before any weight is read."""
    if settings.decoding != DYNAMIC and adapter.no_static_cache:
        raise ConfigError(
            f"models.{settings.name}.decoding: {settings.decoding} is not available for the {adapter.family} "
            f"family: {adapter.no_static_cache}; use {DYNAMIC} (the default)"
        )


#: Fields only sampling reads: greedy decoding ignores them, so the record leaves them out.
SAMPLING_ONLY_FIELDS = ("temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
#: Fields that decide a greedy answer, recorded even where nobody set them (with transformers' default).
GREEDY_FIELDS = (
    "do_sample",
    "num_beams",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_new_tokens",
    "min_new_tokens",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _set_fields(config) -> dict:
    values = json.loads(config.to_json_string(use_diff=False, ignore_metadata=True))
    return {k: v for k, v in values.items() if v is not None and not k.startswith("_")}


def recorded_generation(config, filled=None) -> dict:
    """A GenerationConfig as the file records it, sorted: every field it sets (the checkpoint's, the
    config's, the engine's) and the greedy fields' values from `filled` (the config as generate() completes
    it), without transformers' metadata and, for greedy decoding, without the sampling-only fields."""
    values = _set_fields(config)
    defaults = _set_fields(filled) if filled is not None else {}
    for name in GREEDY_FIELDS:
        if name not in values and name in defaults:
            values[name] = defaults[name]
    if not values.get("do_sample"):
        values = {k: v for k, v in values.items() if k not in SAMPLING_ONLY_FIELDS}
    return dict(sorted(values.items()))
