"""Tiny random InternVL3 (``InternVLForConditionalGeneration``).

As ``OpenGVLab/InternVL3-8B-hf``: an InternViT (448 px, 14-px patches: 32x32 = 1024 patches and a CLS token,
LayerScale, mean-pooling layout so no final norm) whose last layer, CLS dropped (``vision_feature_layer -1``,
strategy ``default``), is pixel-shuffled in the model's ``get_image_features`` (``downsample_ratio 0.5``:
16x16 = 256 tokens of 4x the width) and then enters the multi-modal projector (LayerNorm and a 2-layer GELU
MLP) into a Qwen2.5 decoder. The ``GotOcr2ImageProcessor`` crops each image into a grid of 448-px tiles chosen
by its aspect ratio (1 to 12 tiles; the processor asks for ``crop_to_patches``) plus a thumbnail of the whole
image last (when there is more than one tile), one flat list of crops for the batch; the processor writes
``<img>``, 256 ``<IMG_CONTEXT>`` (the image token, id 151667 after Qwen2.5's tokens and ``<img>`` 151665,
``</img>`` 151666) per crop, ``</img>``: the last placeholder is the thumbnail's last token. Chat template
modelled on the real (Qwen2.5) one with a default system turn, the image as ``<IMG_CONTEXT>\\n`` before the
text; generation_config as Qwen2.5's: eos ``<|im_end|>`` and ``<|endoftext|>``, pad ``<|endoftext|>``.

Tiny geometry, in the real proportions: 28-px crops of 7-px patches (4x4 = 16 patches, shuffled to 2x2 = 4
tokens a crop), ImageNet normalisation as the real one.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.text import ENDOFTEXT, IM_END, IM_START, qwen2_text_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

TILE = 28  # real 448
PATCH = 7  # real 14
DOWNSAMPLE_RATIO = 0.5
MAX_PATCHES = 12
IMAGE_SEQ_LENGTH = int((TILE // PATCH) ** 2 * DOWNSAMPLE_RATIO**2)  # real 256
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are InternVL, a multimodal large language model.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = build_tokenizer(
        trailing_special_tokens=SPECIAL_TOKENS,
        named_special_tokens={
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        padding_side="left",
    )
    normalise = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    image_processor = GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE},
        crop_to_patches=False,
        min_patches=1,
        max_patches=MAX_PATCHES,
        resample=3,
        **normalise,
    )
    video_processor = InternVLVideoProcessor(size={"height": TILE, "width": TILE}, **normalise)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = qwen2_text_config(
        len(tokenizer),
        use_sliding_window=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[TILE, TILE],
        patch_size=[PATCH, PATCH],
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
        use_qk_norm=False,
        dtype="float32",
    )
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMG_CONTEXT],
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(InternVLForConditionalGeneration, config, seed)
    model.generation_config = generation_config(ids[ENDOFTEXT], ids[ENDOFTEXT], [ids[IM_END], ids[ENDOFTEXT]])
    return save_checkpoint(model, processor, out_dir)
