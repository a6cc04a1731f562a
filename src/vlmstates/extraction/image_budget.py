"""The image budget: how many pixels, hence image tokens, a model's processor gives one image.

The Qwen-family processors (and GLM-4.1V's) resize every image to between `min_pixels` and `max_pixels` pixels
(their `size` {shortest_edge, longest_edge}, in pixels) and then give one token per 28x28 (Qwen2.5-VL) or 32x32
(Qwen3-VL) block: a checkpoint's default `max_pixels` of 12.8 MP is up to ~16k tokens for one photograph, which
decides the batch's memory. A model's config sets `min_pixels` / `max_pixels`; they are set on the processor when it
loads, recorded in the file (attribute IMAGE_BUDGET_ATTR: the processor's effective values) and part of the config
hash. The other families' processors bound an image by a fixed resolution or a maximum number of crops, and have
no pixel budget: the keys are refused for them, naming what bounds their images instead.

`vlmstates image-budget` (the workflow's rule image_budget, on the CPU, before any extraction job of the model)
estimates the tokens of the dataset's largest image with the processor's own count and stops the run when it
exceeds the model's context. This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from vlmstates.settings import ConfigError, ModelSettings

log = logging.getLogger(__name__)

BUDGET_KEYS = ("min_pixels", "max_pixels")
#: the image processor's `size` keys that hold the budget, in pixels
SIZE_KEYS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}
#: families whose image processor resizes to a pixel budget (GLM-4.1V counts an image as its temporal patch size,
#: 2 frames, so its max_pixels bounds twice the image's own pixels)
PIXEL_BUDGET_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "glm4v")
#: what bounds the image tokens of every other family (why it has no pixel budget)
FIXED_IMAGE_TOKENS: Mapping[str, str] = MappingProxyType(
    {
        "gemma3": "its processor resizes every image to 896x896 (256 tokens; pan-and-scan off)",
        "paligemma": "its processor resizes every image to the checkpoint's fixed resolution",
        "llava": "its processor resizes every image to 336x336 (576 tokens)",
        "llava_next": "its processor tiles every image into one of image_grid_pinpoints (bounded tokens)",
        "llava_onevision": "its processor tiles every image into one of image_grid_pinpoints (bounded tokens)",
        "smolvlm": "its processor splits images into at most max_image_size sub-images (bounded tokens)",
        "idefics3": "its processor splits images into at most max_image_size sub-images (bounded tokens)",
        "aya_vision": "its processor crops every image into at most max_patches tiles (bounded tokens)",
        "internvl": "its processor crops every image into at most max_patches tiles (bounded tokens)",
        "mistral3": "its processor bounds images by size.longest_edge (an edge, not a pixel count)",
        "molmo2": "its processor crops every image into at most max_crops crops (bounded tokens)",
        "mllama": "its processor tiles every image into at most max_image_tiles tiles (bounded tokens)",
        "fast_vlm": "its processor resizes every image to a fixed resolution (256 tokens)",
        "gemma3n": "its processor resizes every image to 768x768 (256 tokens)",
        "phi4_multimodal": "its processor crops every image into at most dynamic_hd crops (bounded tokens)",
        "molmo": "its processor crops every image into at most max_crops crops (bounded tokens)",
    }
)
#: a largest image above this many tokens, with no max_pixels in the config, is warned about
LARGE_IMAGE_TOKENS = 4096


def has_pixel_budget(family: str) -> bool:
    return family in PIXEL_BUDGET_FAMILIES


def check_image_budget(family: str, settings: ModelSettings) -> None:
    """A budget is only given to a family whose processor has one (ConfigError naming the key otherwise)."""
    given = [key for key in BUDGET_KEYS if getattr(settings, key) is not None]
    if given and not has_pixel_budget(family):
        reason = FIXED_IMAGE_TOKENS.get(family, "its processor has no pixel budget")
        raise ConfigError(
            f"models.{settings.name}.{given[0]}: the {family} family has no pixel budget: {reason}; remove the key "
            f"(pixel budgets exist for {', '.join(PIXEL_BUDGET_FAMILIES)})"
        )


def apply_image_budget(processor, family: str, settings: ModelSettings) -> None:
    """Set the config's budget on the loaded processor's image processor (the checkpoint's value for a bound the
    config leaves out)."""
    check_image_budget(family, settings)
    if not has_pixel_budget(family) or all(getattr(settings, key) is None for key in BUDGET_KEYS):
        return
    image_processor = processor.image_processor
    size = {SIZE_KEYS[key]: image_processor.size[SIZE_KEYS[key]] for key in BUDGET_KEYS}
    for key in BUDGET_KEYS:
        if getattr(settings, key) is not None:
            size[SIZE_KEYS[key]] = getattr(settings, key)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ConfigError(
            f"models.{settings.name}: the budget {size} would have min_pixels above max_pixels (the checkpoint's "
            f"other bound); set both min_pixels and max_pixels"
        )
    image_processor.size = size


def effective_image_budget(processor, family: str) -> dict[str, int] | None:
    """{min_pixels, max_pixels} the processor resizes to (None for a family without a pixel budget)."""
    if not has_pixel_budget(family):
        return None
    size = processor.image_processor.size
    return {key: int(size[SIZE_KEYS[key]]) for key in BUDGET_KEYS}


def image_tokens(processor, width: int, height: int) -> int:
    """Image tokens the processor gives an image of this size (its own count, without the pixels)."""
    return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0])


def largest_image(processor, sizes: Mapping[str, tuple[int, int]]) -> tuple[str, tuple[int, int], int]:
    """(image id, (width, height), tokens) of the image that gives the most tokens (each distinct size counted once)."""
    counts: dict[tuple[int, int], int] = {}
    best = None
    for image_id, size in sizes.items():
        if size not in counts:
            counts[size] = image_tokens(processor, *size)
        if best is None or counts[size] > best[2]:
            best = (image_id, size, counts[size])
    if best is None:
        raise ConfigError("no readable image in the dataset to estimate the image budget from")
    return best


def image_budget_report(settings: ModelSettings, table_path, images_dir, out_path) -> dict:
    """Estimate the tokens of the dataset's largest image for this model, write the report (JSON) and stop with a
    ConfigError when one image alone exceeds the model's context. Loads only the processor."""
    from vlmstates.dataset import read_validated_table
    from vlmstates.extraction.adapters import adapter_for_family, family_of_model_type
    from vlmstates.extraction.batching import read_image_size
    from vlmstates.settings import model_type_of, read_checkpoint_config

    key = f"models.{settings.name}"
    family = family_of_model_type(model_type_of(settings.model, settings.revision), key)
    check_image_budget(family, settings)
    adapter = adapter_for_family(family)
    processor = adapter.load_processor(settings, settings.revision)
    table = read_validated_table(table_path)
    sizes = {}
    for image_id in dict.fromkeys(table["image_id"]):
        size = read_image_size(Path(images_dir), image_id)
        if size is not None:  # an unreadable image fails its own sample, as validation reported
            sizes[image_id] = size
    image_id, (width, height), tokens = largest_image(processor, sizes)
    checkpoint_config = read_checkpoint_config(settings.model, settings.revision)
    context = checkpoint_config.get("text_config", {}).get("max_position_embeddings") or checkpoint_config.get(
        "max_position_embeddings"
    )
    report = {
        "model": settings.model,
        "family": family,
        "image_budget": effective_image_budget(processor, family),
        "images": len(sizes),
        "largest_image": {"image_id": image_id, "width": width, "height": height, "image_tokens": tokens},
        "context": context,
    }
    Path(out_path).write_text(json.dumps(report, indent=2) + "\n")
    log.info("%s: the largest image, %s (%dx%d), gives %d image tokens", key, image_id, width, height, tokens)
    if context is not None and tokens > context:
        raise ConfigError(
            f"{key}: image {image_id} ({width}x{height}) alone gives {tokens} image tokens, more than the model's "
            f"context of {context}; set {key}.max_pixels to bound every image (e.g. 1003520 = 1280 tokens of 28x28)"
        )
    if tokens > LARGE_IMAGE_TOKENS and settings.max_pixels is None:
        log.warning(
            "%s: image %s (%dx%d) gives %d image tokens under the checkpoint's own max_pixels; a batch of such images "
            "needs that much memory per sample; set %s.max_pixels to bound it",
            key,
            image_id,
            width,
            height,
            tokens,
            key,
        )
    return report
