"""Tiny random LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

As ``llava-hf/llava-onevision-qwen2-7b-ov-hf``: a SigLIP ViT (so400m, 384 px, 14-px patches: 27x27 = 729
patches, no pooling head) whose last layer, every patch kept (``vision_feature_layer -1``, strategy ``full``),
goes through a 2-layer GELU MLP projector into a Qwen2 decoder. "anyres" tiling as LLaVA-NeXT's: the image is
resized to the best of 36 grid pinpoints (384 x 384 up to 2304 x 2304, every grid of 1 to 6 tiles a side), cut
into 384-px tiles, the whole image as the base tile first; the processor expands ``<image>`` (id 151646, after
Qwen2's ``<|endoftext|>`` 151643, ``<|im_start|>``, ``<|im_end|>``; ``<video>`` 151647) into the base tile's
features and the unpadded high-resolution grid with one learned ``image_newline`` per row, the grid
bilinearly shrunk after the projector where it exceeds 9 tiles' worth (``vision_aspect_ratio anyres_max_9``);
the last placeholder is the last row's newline. Chat template modelled on the real one:
``<|im_start|>user <image>\\n{text}<|im_end|><|im_start|>assistant\\n``, no system turn, no bos.
generation_config.json as the real one: bos 151643 (``<|endoftext|>``), eos 151645 (``<|im_end|>``); the
tokenizer's pad is ``<|endoftext|>``.

Tiny geometry, in the real proportions: 28-px tiles of 7-px patches (4x4 = 16 patches per tile), the 36
pinpoints scaled by 28/384; the tower has two layers.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD, siglip_vision_config
from vlmstates.demo.tiny.text import ENDOFTEXT, IM_END, IM_START, qwen2_text_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

TILE = 28  # real 384
PATCH = 7  # real 14
GRID_PINPOINTS = [[TILE * rows, TILE * cols] for rows in range(1, 7) for cols in range(1, 7)]

IMAGE, VIDEO = "<image>", "<video>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ '\n' + item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = build_tokenizer(
        trailing_special_tokens=SPECIAL_TOKENS,
        named_special_tokens={"eos_token": IM_END, "pad_token": ENDOFTEXT, "image_token": IMAGE, "video_token": VIDEO},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        padding_side="left",
    )
    size = {"height": TILE, "width": TILE}
    common = dict(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, resample=3)
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=GRID_PINPOINTS, do_pad=True, **common)
    video_processor = LlavaOnevisionVideoProcessor(**common)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        video_token=VIDEO,
        vision_aspect_ratio="anyres_max_9",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = qwen2_text_config(
        len(tokenizer),
        use_sliding_window=False,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=siglip_vision_config(TILE, PATCH),
        image_token_index=ids[IMAGE],
        video_token_index=ids[VIDEO],
        image_grid_pinpoints=GRID_PINPOINTS,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(LlavaOnevisionForConditionalGeneration, config, seed)
    model.generation_config = generation_config(ids[ENDOFTEXT], ids[ENDOFTEXT], [ids[IM_END]])
    return save_checkpoint(model, processor, out_dir)
