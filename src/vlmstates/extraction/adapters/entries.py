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

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: How the projector's input is split into samples before each sample's mean (never over padding):
POOLINGS = MappingProxyType(
    {
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
        # [sum of crops, patches, Dv]: every image's crops (tiles and the global/thumbnail one) concatenated, none
        # padded; each sample's crop count is its image placeholders over the placeholders one crop gives, which
        # the processor writes alike for every crop (Aya Vision, InternVL: the processors drop their own counts)
        "crops_by_image_tokens": "rows of [sum crops, patches, Dv] split by each sample's image placeholders per crop",
        # [sum of t*h*w / merge**2, Dv]: each image's patches already merged 2x2 (GLM-4.1V's downsample conv runs
        # before its merger), split by image_grid_thw over the vision config's spatial_merge_size squared
        "merged_grid_thw": "rows of [sum t*h*w / merge**2, Dv] split by image_grid_thw",
        # [sum of (h/patch)*(w/patch), Dv]: all images' own patches concatenated (the batch's padding pixels cut off
        # by the tower), split by the processor's image_sizes, before the spatial merge (Mistral 3 / Pixtral)
        "image_sizes": "rows of [sum (h/patch)*(w/patch), Dv] split by image_sizes",
        # [sum of pooled image tokens, Dv]: every crop's pooled 2x2 windows, all images concatenated, split by the
        # processor's image_grids (low-res rows x cols + high-res rows x cols per image; Molmo2)
        "image_grids": "rows of [sum of pooled image tokens, Dv] split by image_grids",
        # [B, images, tiles, CLS + patches, Dv]: every image always has max_num_tiles tiles, the unused ones masked by
        # the processor's aspect_ratio_mask; the sample's real tiles are selected, each with all its rows (Mllama)
        "aspect_ratio_mask": "the real tiles (aspect_ratio_mask) of [B, images, tiles, patches, Dv], per sample",
    }
)


@dataclass(frozen=True)
class FamilyEntry:
    """What an adapter needs to know about a family in the common layout.

    Required: `family`, `model_types`, `projector`, `vision_tower`, `pooling`. The rest has the common
    layout's value as default. `vision_tower` and `final_norm` are read only by the benchmark and the tests
    (the separate vision pass, parameter counts, the check against output_hidden_states); everything else
    drives extraction.
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
    #: module path of the decoder's final norm (tests only: output_hidden_states applies it to its last entry)
    final_norm: str = "model.language_model.norm"
    #: dotted config attribute holding the image placeholder token id
    image_token_id: str = "image_token_id"
    #: dotted config attribute holding the width of the projector's input
    vision_hidden_size: str = "vision_config.hidden_size"
    #: dotted config attribute of the scale of a pixel shuffle between the vision tower and the projector (None:
    #: none there); the projector's input is then (1 / scale)^2 vision vectors side by side (InternVL's 0.5: 4)
    pixel_shuffle_scale: str | None = None
    #: processor quirk: the images of a batch given nested per sample ([[image], [image]])
    nested_images: bool = False
    #: legacy `image_processor_type` names of the family's checkpoints -> the class they now are
    legacy_image_processors: Mapping[str, str] = field(default_factory=dict)
    #: largest batch the family runs exactly (None: no limit)
    max_batch_size: int | None = None
    #: a decoder block outputs [streams, B, L, D] (Gemma 3n's AltUp): the stream VT, QT and MM are taken from
    #: (None: the block outputs [B, L, D], or a tuple holding it first)
    block_output_stream: int | None = None
    #: what the vision token (VT) and vision-only vector (VF) hold for this family (config/README.md too)
    semantics: str = ""
    #: False where the family has no chat template and its processor writes the prompt itself from the text
    #: (PaliGemma: image tokens, <bos>, the text, a newline): the prompt is then the image token + the text
    chat_template: bool = True
    #: processor outputs that are no model input, dropped from the batch (PaliGemma's training `labels`)
    dropped_inputs: tuple[str, ...] = ()
    #: why the family cannot decode with a static cache (`decoding: static`); empty: it can (tested per family)
    no_static_cache: str = ""

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
            family="llava_onevision",
            model_types=("llava_onevision",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="tile_counts",
            semantics=(
                "VT: the last <image> placeholder, which holds the learned image_newline vector ending the last row "
                "of the high-resolution tiles (the same input embedding for every image); VF: the projector's input "
                "(SigLIP last layer, every patch), mean over all the image's real tiles and patches (base image included; "
                "the anyres_max_9 shrinking of large grids comes after the projector)"
            ),
        ),
        FamilyEntry(
            family="aya_vision",
            model_types=("aya_vision",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="crops_by_image_tokens",
            semantics=(
                "VT: the last <|IMG_PATCH|> placeholder (the global tile's last token, before <|END_OF_IMG|>); VF: the "
                "multi-modal projector's module input (SigLIP last layer, every patch, before the projector's own pixel "
                "shuffle), mean over all the image's crop tiles and the global tile"
            ),
        ),
        FamilyEntry(
            family="internvl",
            model_types=("internvl",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="crops_by_image_tokens",
            pixel_shuffle_scale="downsample_ratio",
            semantics=(
                "VT: the last <IMG_CONTEXT> placeholder (the thumbnail's last token, before </img>); VF: the "
                "multi-modal projector's module input, which get_image_features pixel-shuffles first (InternViT last "
                "layer without CLS, each 2x2 patch block as one vector 4x as wide), mean over all the image's crop "
                "tiles and the thumbnail"
            ),
        ),
        FamilyEntry(
            family="qwen3_vl",
            model_types=("qwen3_vl", "qwen3_vl_moe"),  # the MoE differs only in its decoder blocks' MLPs
            projector="model.visual.merger",  # the main merger, not the deepstack_merger_list
            vision_tower="model.visual",
            pooling="image_grid_thw",
            semantics=(
                "VT: last <|image_pad|>; VF: the main patch merger's input (model.visual.merger: the ViT's last block "
                "output, before the merger's LayerNorm), mean over the image's patches; DeepStack adds vision features "
                "at the image positions after decoder blocks 0-2, outside the blocks: block k's recorded output is the "
                "state before that injection (= hidden_states[k + 1]), not block k + 1's input"
            ),
        ),
        FamilyEntry(
            family="glm4v",
            model_types=("glm4v",),
            projector="model.visual.merger",
            vision_tower="model.visual",
            pooling="merged_grid_thw",
            vision_hidden_size="vision_config.out_hidden_size",  # the downsample conv's width, the merger's input
            semantics=(
                "VT: last <|image|> (the image's last token, just before <|end_of_image|>); VF: the merger's input "
                "(the ViT's output after its post-layernorm, each 2x2 group of patches merged by the downsample "
                "conv into one vector of out_hidden_size), mean over the image's merged tokens"
            ),
        ),
        FamilyEntry(
            family="mistral3",
            model_types=("mistral3",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="image_sizes",
            image_token_id="image_token_index",
            semantics=(
                "VT: the last [IMG] placeholder (the image's last merged token, bottom right; it is not the last "
                "image-related token: [IMG_END] follows it, and [IMG_BREAK] ends every other row); VF: the "
                "multi-modal projector's input (Pixtral's last layer, before the projector's norm and 2x2 patch "
                "merger), mean over the image's (h/14)*(w/14) patches"
            ),
        ),
        FamilyEntry(
            family="molmo2",
            model_types=("molmo2",),
            projector="model.multi_modal_projector.image_projector",
            vision_tower="model.vision_tower",
            pooling="image_grids",
            image_token_id="image_patch_id",
            vision_hidden_size="adapter_config.hidden_size",
            semantics=(
                "VT: the last <im_patch> placeholder (the high-resolution grid's last pooled token; <im_col> and "
                "<im_end> follow it); VF: the adapter's image-projector input (each 2x2 patch window of the ViT's "
                "two feature layers pooled by cross-attention, as Molmo's), mean over all the image's pooled "
                "tokens, low-resolution crop and high-resolution crops"
            ),
        ),
        FamilyEntry(
            family="mllama",
            model_types=("mllama",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_model",
            pooling="aspect_ratio_mask",
            vision_hidden_size="vision_config.vision_output_dim",  # the global encoder's output + 5 local layers
            nested_images=True,
            semantics=(
                "VT: the single <|image|> token at the start of the user turn (no per-patch placeholders: the image "
                "enters the decoder only through its cross-attention blocks, which every token from <|image|> on "
                "attends with); VF: the multi-modal projector's input (the vision model's output: the global encoder's "
                "last state concatenated with the local encoder's intermediate layers, vision_output_dim wide), mean "
                "over the image's real tiles (aspect_ratio_mask) and each tile's CLS and patch positions; the padding "
                "tiles and the vision model's padding to a multiple of 8 positions are never averaged in"
            ),
        ),
        FamilyEntry(
            family="fast_vlm",
            model_types=("fast_vlm",),
            projector="model.multi_modal_projector",
            vision_tower="model.vision_tower",
            pooling="per_sample",
            semantics=(
                "VT: the last <image> placeholder (the last cell of the 16x16 grid); VF: the projector's input "
                "(FastViTHD's final_conv map, flattened to 256 cells x 3072), mean over the cells"
            ),
        ),
        FamilyEntry(
            family="gemma3n",
            model_types=("gemma3n",),
            # embed_vision is called with keywords only (and with the vision token ids first); its soft-token
            # norm is called positionally, once per forward, with the embedder's input
            projector="model.embed_vision.soft_embedding_norm",
            vision_tower="model.vision_tower",
            pooling="per_sample",
            nested_images=True,
            block_output_stream=0,
            semantics=(
                "VT: stream 0 (the active AltUp stream) of the last <image_soft_token>; QT, MM likewise stream 0; "
                "VF: embed_vision's input (the MobileNetV5 msfa output times sqrt(2048)), mean over the 256 soft tokens"
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
            no_static_cache=(
                "transformers' PaliGemma forward cannot read the attention mask that generate() builds for a static "
                "cache (AttributeError: 'dict' object has no attribute 'ndim', transformers 5.23)"
            ),
            semantics=(
                "VT: the last <image> placeholder (the last patch), which the prefix-LM decoder lets attend to the "
                "whole prompt, the text after it included; VF: the multi-modal projector's input (SigLIP output), "
                "mean over patches"
            ),
        ),
    )
}
