"""The families that fit the common layout, as data: one `FamilyEntry` each, read by `EntryAdapter`.

Most native transformers image-text-to-text models share one layout: an auto class, decoder blocks at
`model.language_model.layers`, a final norm beside them, a vision tower and a projector module whose input is
the vision-only vector, an image token id in the config, and image placeholder tokens in `input_ids`. A family
that fits is an entry here; what differs between them is named, never coded: module paths (resolved with
`torch.nn.Module.get_submodule` on the loaded model), the config attribute of the image token id, how the
projector's input is split into samples (`POOLINGS`) and the processor's quirks. Code stays only where a
family truly differs (Phi-4's projection, Molmo's remote code: their own adapter modules).

This module imports neither torch nor transformers: Snakemake reads the family table when it builds its DAG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

#: How the projector's input is split into samples before each sample's mean (never over padding):
POOLINGS = MappingProxyType({
    # [B, patches, Dv]: one row per sample (Gemma 3, LLaVA-1.5)
    "per_sample": "one row of [B, patches, Dv] per sample",
    # [sum of t*h*w, Dv]: all images' patches concatenated, split by the processor's image_grid_thw (Qwen family)
    "image_grid_thw": "rows of [sum t*h*w, Dv] split by image_grid_thw",
    # [sum of tiles, patches, Dv]: each image's anyres tiles (base image first), split by the image processor's
    # own tile counts for each image's size; the processor's padding tiles never reach the projector
    "tile_counts": "rows of [sum tiles, patches, Dv] split by the image processor's tile counts",
    # [real images, patches, Dv]: the processor pads each sample's image list with all-zero images, which the
    # model drops; split by each sample's number of real (not all-zero) images (Idefics3, SmolVLM)
    "real_images": "rows of [real images, patches, Dv] split by each sample's non-zero images",
})


@dataclass(frozen=True)
class FamilyEntry:
    """What an adapter needs to know about a family in the common layout.

    Required: `family`, `model_types`, `projector`, `vision_tower`, `pooling`. The rest has the common
    layout's value as default. `vision_tower` is read only by the benchmark and the tests (the separate vision
    pass, parameter counts); everything else drives extraction.
    """

    family: str
    #: config.json `model_type` values the family serves
    model_types: tuple[str, ...]
    #: module path of the vision-to-language projector, whose input is the vision-only vector
    projector: str
    #: module path of the vision encoder (benchmark and tests only)
    vision_tower: str
    #: a name in POOLINGS
    pooling: str
    #: transformers auto class that loads the checkpoint
    auto_class: str = "AutoModelForImageTextToText"
    decoder_blocks: str = "model.language_model.layers"
    final_norm: str = "model.language_model.norm"
    #: dotted config attribute holding the image placeholder token id
    image_token_id: str = "image_token_id"
    #: dotted config attribute holding the width of the projector's input
    vision_hidden_size: str = "vision_config.hidden_size"
    #: processor quirk: the images of a batch given nested per sample ([[image], [image]])
    nested_images: bool = False
    #: legacy `image_processor_type` names of the family's checkpoints -> the class they now are
    legacy_image_processors: Mapping[str, str] = field(default_factory=dict)
    #: largest batch the family runs exactly (None: no limit)
    max_batch_size: int | None = None
    #: what the vision token (VT) and vision-only vector (VF) hold for this family (config/README.md too)
    semantics: str = ""
    #: False where the family has no chat template and its processor writes the prompt itself from the text
    #: (PaliGemma: image tokens, <bos>, the text, a newline): the prompt is then the image token + the text
    chat_template: bool = True
    #: processor outputs that are no model input, dropped from the batch (PaliGemma's training `labels`)
    dropped_inputs: tuple[str, ...] = ()
    #: `attn_implementation: auto`: the engine's choice -> the one this family runs instead (a kernel it lacks)
    auto_attention: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.family}: unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")


ENTRIES: dict[str, FamilyEntry] = {
    entry.family: entry
    for entry in (
        FamilyEntry(
            family="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            projector="model.visual.merger",
            vision_tower="model.visual",
            pooling="image_grid_thw",
            # A name some Qwen2.5-VL fine-tunes carry in preprocessor_config.json; transformers has no such
            # class, and the Qwen2.5-VL processor uses Qwen2-VL's image processor (as the hub checkpoint says).
            legacy_image_processors={"Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor"},
            semantics="VT: last <|image_pad|>; VF: the patch merger's input (windowed ViT output), mean over the image's patches",
        ),
        FamilyEntry(
            family="qwen2_vl",
            model_types=("qwen2_vl",),
            projector="model.visual.merger",
            vision_tower="model.visual",
            pooling="image_grid_thw",
            vision_hidden_size="vision_config.embed_dim",  # vision_config.hidden_size is the decoder's width
            semantics="VT: last <|image_pad|>; VF: the patch merger's input (ViT output), mean over the image's patches",
        ),
        FamilyEntry(
            family="gemma3",
            model_types=("gemma3",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="per_sample",
            nested_images=True,
            semantics="VT: last <image_soft_token>; VF: the multi-modal projector's input (SigLIP output), mean over patches",
        ),
        FamilyEntry(
            family="llava_next",
            model_types=("llava_next",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="tile_counts",
            semantics=(
                "VT: the last <image> placeholder, which holds the learned image_newline vector ending the last row "
                "of the high-resolution tiles (the same input embedding for every image); VF: the projector's input "
                "(CLIP layer -2 without CLS), mean over all the image's real tiles and patches (base image included)"
            ),
        ),
        FamilyEntry(
            family="llava",
            model_types=("llava",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="per_sample",
            semantics="VT: last <image> placeholder (the last patch); VF: the projector's input (CLIP layer -2 without CLS), mean over patches",
        ),
        FamilyEntry(
            family="smolvlm",
            model_types=("smolvlm",),
            decoder_blocks="model.text_model.layers",
            final_norm="model.text_model.norm",
            projector="model.connector",
            vision_tower="model.vision_model",
            pooling="real_images",
            nested_images=True,
            semantics=(
                "VT: the last <image> placeholder (the global image's last token); VF: the connector's input "
                "(SigLIP output, before the pixel shuffle), mean over all the sample's real sub-images and the global image"
            ),
        ),
        FamilyEntry(
            family="idefics3",
            model_types=("idefics3",),
            decoder_blocks="model.text_model.layers",
            final_norm="model.text_model.norm",
            projector="model.connector",
            vision_tower="model.vision_model",
            pooling="real_images",
            nested_images=True,
            semantics=(
                "VT: the last <image> placeholder (the global image's last token); VF: the connector's input "
                "(SigLIP output, before the pixel shuffle), mean over all the sample's real sub-images and the global image"
            ),
        ),
        FamilyEntry(
            family="paligemma",
            model_types=("paligemma",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="per_sample",
            # no chat template: the processor puts the image tokens first, then <bos>, the text and a newline,
            # and returns token_type_ids (the prefix the decoder attends to both ways) and training labels
            chat_template=False,
            dropped_inputs=("labels",),
            # eager: PaliGemma 2's Gemma 2 decoder softcaps attention logits, which sdpa cannot (transformers refuses
            # it), and flash-attention takes no mask but the padding's, not the prefix-LM's (untested: no GPU here)
            auto_attention={"sdpa": "eager", "flash_attention_2": "eager"},
            semantics=(
                "VT: the last <image> placeholder (the last patch), which the prefix-LM decoder lets attend to the "
                "whole prompt, the text after it included; VF: the multi-modal projector's input (SigLIP output), "
                "mean over patches"
            ),
        ),
    )
}
