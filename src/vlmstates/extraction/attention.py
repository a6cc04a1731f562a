"""Which attention implementations give each family the states `eager` gives, per sub-model, and the choice.

transformers builds each decoder's mask from the config's implementation. For `eager`, `sdpa` and
`flex_attention` it is the full mask (causal, or causal with bidirectional blocks); for flash-attention it is
only the padding mask, and the kernel applies plain causal attention: transformers 5.23 drops, without a warning,
the bidirectional blocks that Gemma 3 (each image's tokens), PaliGemma (the prefix: image and prompt) and Molmo2
(the image tokens) attend with. Those families' decoders refuse flash-attention here. Everything else in this
table is what transformers 5.23 itself can load (its `_supports_*` flags, Gemma 2's missing sdpa, timm towers).
tests/test_attention.py checks every row at mask level on the tiny checkpoints: an implementation is allowed
exactly when its states equal eager's (flash-attention run through transformers' own unpadding and varlen path
with a reference kernel in place of the CUDA one).

`attn_implementation` in a model's config: `auto`, one implementation for both sub-models, or
`{text: ..., vision: ...}` (each `auto` or an implementation; a missing key is `auto`). `auto` takes the fastest
allowed implementation that is available: flash_attention_3, then flash_attention_2 (on CUDA, as transformers'
own availability checks say), then sdpa, then eager; never flex_attention, whose compilation costs more than
it saves for one pass. This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from vlmstates.settings import ConfigError

AUTO = "auto"
EAGER, SDPA, FLASH_2, FLASH_3, FLEX = "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
IMPLEMENTATIONS = (EAGER, SDPA, FLASH_2, FLASH_3, FLEX)
FLASH = (FLASH_2, FLASH_3)
#: `auto`'s order, fastest first (flex_attention is never picked)
AUTO_ORDER = (FLASH_3, FLASH_2, SDPA, EAGER)
TEXT, VISION = "text", "vision"
SUB_MODELS = (TEXT, VISION)

# why an implementation is refused; MASK_* reasons are the ones the mask-level test proves
MASK_IMAGE_BLOCKS = (
    "flash-attention takes only the padding mask and ignores the bidirectional block mask transformers 5.23 gives "
    "each image's tokens (token_type_ids): image tokens would attend causally, and every state from the image on change"
)
MASK_PREFIX_LM = (
    "flash-attention takes only the padding mask and ignores the prefix-LM mask transformers 5.23 builds from "
    "token_type_ids (the image and the prompt attend to each other both ways): every prompt state would change"
)
MASK_MOLMO2_IMAGE = (
    "flash-attention takes only the padding mask and ignores the bidirectional block mask transformers 5.23 gives "
    "the image tokens (mm_token_type_ids): image tokens would attend causally, and every state from the image on change"
)
NO_FLASH_MLLAMA = "transformers 5.23 has no flash-attention for Mllama (its cross-attention takes a 4D mask)"
NO_SDPA_GEMMA2 = (
    "PaliGemma 2's Gemma 2 decoder softcaps attention logits, which sdpa cannot (transformers 5.23 refuses it); "
    "eager and flex_attention apply the softcap"
)
NO_FLEX = "transformers 5.23 has no flex_attention for this model"
TIMM_TOWER = "the vision tower is a timm model (TimmWrapperModel), which runs only sdpa or eager"
MASK_REASONS = (MASK_IMAGE_BLOCKS, MASK_PREFIX_LM, MASK_MOLMO2_IMAGE)


def _refuse(reason: str, *implementations: str) -> dict[str, str]:
    return dict.fromkeys(implementations, reason)


@dataclass(frozen=True)
class FamilyAttention:
    """The implementations a family's sub-models refuse (-> why); every other one gives eager's states."""

    text: Mapping[str, str] = field(default_factory=dict)
    vision: Mapping[str, str] = field(default_factory=dict)
    #: the config keys (transformers' sub-configs) that each sub-model's implementation is set on; "" is the
    #: top-level config (the multimodal model, which builds the decoder's masks from the text config's choice)
    text_configs: tuple[str, ...] = ("", "text_config")
    vision_configs: tuple[str, ...] = ("vision_config",)
    #: the checkpoint's own code chooses its attention: only `auto`, and nothing is passed to from_pretrained
    remote_code: bool = False

    def refused(self, sub_model: str) -> Mapping[str, str]:
        return self.text if sub_model == TEXT else self.vision


_QWEN_LIKE = FamilyAttention(text=_refuse(NO_FLEX, FLEX), vision=_refuse(NO_FLEX, FLEX))
_TIMM_VISION = _refuse(TIMM_TOWER, FLASH_2, FLASH_3, FLEX)

#: family -> its refusals, for all 20 families (config/README.md shows the same table)
ATTENTION: Mapping[str, FamilyAttention] = MappingProxyType(
    {
        "qwen2_5_vl": _QWEN_LIKE,
        "qwen2_vl": _QWEN_LIKE,
        "qwen3_vl": _QWEN_LIKE,
        "glm4v": _QWEN_LIKE,
        "gemma3": FamilyAttention(text=_refuse(MASK_IMAGE_BLOCKS, *FLASH)),
        "paligemma": FamilyAttention(text={**_refuse(MASK_PREFIX_LM, *FLASH), SDPA: NO_SDPA_GEMMA2}),
        "molmo2": FamilyAttention(
            text=_refuse(MASK_MOLMO2_IMAGE, *FLASH),
            # the adapter's attention pooling of the ViT's 2x2 windows runs with the vision tower's choice
            vision_configs=("vision_config", "adapter_config"),
        ),
        "mllama": FamilyAttention(text=_refuse(NO_FLASH_MLLAMA, *FLASH), vision=_refuse(NO_FLASH_MLLAMA, *FLASH)),
        "fast_vlm": FamilyAttention(vision=_TIMM_VISION),
        "gemma3n": FamilyAttention(vision=_TIMM_VISION),
        "llava": FamilyAttention(),
        "llava_next": FamilyAttention(),
        "llava_onevision": FamilyAttention(),
        "smolvlm": FamilyAttention(),
        "idefics3": FamilyAttention(),
        "aya_vision": FamilyAttention(),
        "internvl": FamilyAttention(),
        "mistral3": FamilyAttention(),
        # the decoder is the top-level model (no text_config)
        "phi4_multimodal": FamilyAttention(text_configs=("",)),
        "molmo": FamilyAttention(remote_code=True),
    }
)


def family_attention(family: str) -> FamilyAttention:
    if family not in ATTENTION:
        raise ConfigError(f"no attention table for model family {family!r}; known: {', '.join(ATTENTION)}")
    return ATTENTION[family]


def requested(setting, key: str) -> dict[str, str]:
    """The config value as {text: ..., vision: ...} (each `auto` or an implementation), checked."""
    if isinstance(setting, str):
        values = dict.fromkeys(SUB_MODELS, setting)
    elif isinstance(setting, Mapping):
        unknown = sorted(set(setting) - set(SUB_MODELS))
        if unknown:
            raise ConfigError(
                f"{key}: unknown sub-model(s) {', '.join(map(str, unknown))}; give {{text: ..., vision: ...}}"
            )
        values = {sub: setting.get(sub, AUTO) for sub in SUB_MODELS}
    else:
        raise ConfigError(f"{key} must be auto, an implementation or {{text: ..., vision: ...}}, not {setting!r}")
    for sub, value in values.items():
        if value != AUTO and value not in IMPLEMENTATIONS:
            raise ConfigError(
                f"{key}: {value!r} for the {sub} model is no attention implementation; "
                f"give {AUTO} or one of {', '.join(IMPLEMENTATIONS)}"
            )
    return values


def check_attention(family: str, setting, key: str) -> dict[str, str]:
    """The requested implementations per sub-model, an explicit one that the family refuses stopped with a
    ConfigError naming the key, the family and why (no transformers needed: the workflow's config check)."""
    table = family_attention(family)
    values = requested(setting, key)
    if table.remote_code:
        if any(value != AUTO for value in values.values()):
            raise ConfigError(f"{key}: {family}'s remote code chooses its own attention; leave it at {AUTO}")
        return values
    for sub, value in values.items():
        reason = table.refused(sub).get(value)
        if reason is not None:
            fix = f"use {AUTO}" + (f" or {{{TEXT}: {value}, {VISION}: {AUTO}}}" if sub == VISION else "")
            raise ConfigError(f"{key}: {value} is refused for the {sub} model of the {family} family: {reason}; {fix}")
    return values


def available(implementation: str, device_type: str) -> bool:
    """Whether this machine runs the implementation, by transformers' own checks (not a bare import)."""
    if implementation in (EAGER, SDPA):
        return True
    if device_type != "cuda":
        return False
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return {FLASH_2: is_flash_attn_2_available, FLASH_3: is_flash_attn_3_available}[implementation]()


def choose_attention(family: str, setting, device_type: str, key: str) -> dict[str, str]:
    """{text: implementation, vision: implementation}: explicit ones checked, `auto` the fastest allowed and
    available one. A remote-code family keeps `auto` (its code chooses)."""
    values = check_attention(family, setting, key)
    table = family_attention(family)
    if table.remote_code:
        return values
    chosen = {}
    for sub, value in values.items():
        if value == AUTO:
            refused = table.refused(sub)
            value = next(i for i in AUTO_ORDER if i not in refused and available(i, device_type))
        chosen[sub] = value
    return chosen


def from_pretrained_argument(family: str, chosen: Mapping[str, str]) -> dict[str, str]:
    """transformers' per-config form of `attn_implementation` ({"": ..., "text_config": ..., ...})."""
    table = family_attention(family)
    argument = dict.fromkeys(table.text_configs, chosen[TEXT])
    argument.update(dict.fromkeys(table.vision_configs, chosen[VISION]))
    return argument


def loaded_attention(model, family: str) -> dict[str, str]:
    """{text: ..., vision: ...}: the implementation each sub-model of a loaded model runs, read from its configs
    in this table's terms (what the contract test holds the table to; the file records every config's:
    attention_implementations)."""
    table = family_attention(family)

    def of(config_key: str) -> str:
        config = model.config if config_key == "" else getattr(model.config, config_key)
        return str(getattr(config, "_attn_implementation", None) or AUTO)

    if table.remote_code:  # one config, whatever the remote code does with it
        return dict.fromkeys(SUB_MODELS, of(""))
    return {TEXT: of(table.text_configs[-1]), VISION: of(table.vision_configs[0])}


def attention_implementations(model) -> dict[str, str]:
    """The attention implementation each (sub-)model was loaded with, as transformers reports it: "model"
    for the top config, then each sub-config by name (text_config, vision_config, ...); "" where a config
    does not say (remote code that picks its own)."""
    config = getattr(model, "config", None)
    found = {"model": str(getattr(config, "_attn_implementation", None) or "")}
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            found[name] = str(getattr(sub, "_attn_implementation", None) or "")
    return found
