"""Tiny random LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

LLaVA-1.5 as ``llava-hf/llava-1.5-7b-hf``: a CLIP ViT (336 px, 14 px patches: 24x24 = 576 patches) whose
second-to-last layer, CLS dropped (``vision_feature_layer -2``, strategy ``default``), goes through a 2-layer
GELU MLP projector into a Llama-2 (Vicuna) decoder; the image is resized and centre-cropped to one square,
so every image gives the same number of ``<image>`` tokens (id 32000, after the 32000-entry vocabulary; pad
32001). The chat template writes ``USER: <image>\\n{text} ASSISTANT:`` and, like the real one, no ``<s>``.

LLaVA-NeXT as ``llava-hf/llama3-llava-next-8b-hf``: the same CLIP tower and projector, "anyres" tiling (the
image resized to the best of the grid pinpoints 336x672, 672x336, 672x672, 1008x336, 336x1008, cut into
336-px tiles, plus the whole image as the base tile), a Llama-3 decoder; the processor expands ``<image>``
(id 128256, the first id after Llama 3's 128256 entries) into the base tile's 576 features and the unpadded
high-resolution grid with one learned ``image_newline`` per row, the last placeholder being the last row's
newline. Chat template modelled on the real one: ``<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n
{text}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` after ``<|begin_of_text|>``.

Tiny geometry, in the real proportions: 28-px tiles of 7-px patches (4x4 = 16 patches per tile), pinpoints
scaled by 28/336; the tower has three layers, so layer -2 is not its last.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import CLIP_MEAN, CLIP_STD
from vlmstates.demo.tiny.text import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    START_HEADER,
    decoder_config,
    llama3_text_config,
)
from vlmstates.demo.tiny.tokenizer import build_tokenizer

TILE = 28  # real 336
PATCH = 7  # real 14; 336/14 = 28/7 = 4 ... patches per side: real 24, here 4
GRID_PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]
IMAGE = "<image>"

VISION = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=TILE,
    patch_size=PATCH,
    projection_dim=32,
    hidden_act="quick_gelu",
    dtype="float32",
)

# -- LLaVA-1.5 -------------------------------------------------------------------------------------------
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# -- LLaVA-NeXT (Llama 3) -----------------------------------------------------------------------------------
LLAMA3_SPECIAL = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT)
NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] + '<|eot_id|>' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_llava(out_dir: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(
        leading_special_tokens=(UNK, BOS, EOS),
        trailing_special_tokens=(IMAGE, PAD),
        named_special_tokens={
            "unk_token": UNK,
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "image_token": IMAGE,
        },
        chat_template=LLAVA_TEMPLATE,
        add_bos_token=True,  # the Llama-2 tokenizer prepends <s>
        padding_side="left",
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token=IMAGE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = decoder_config(  # Llama 2 7B's settings
        len(tokenizer),
        model_type="llama",
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOS),
        pad_token_id=ids(PAD),
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=dict(VISION),
        image_token_index=ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(TILE // PATCH) ** 2,
        tie_word_embeddings=False,
        pad_token_id=text["pad_token_id"],
        dtype="float32",
    )
    model = seeded_model(LlavaForConditionalGeneration, config, seed)
    model.generation_config = generation_config(text["bos_token_id"], text["pad_token_id"], [text["eos_token_id"]])
    return save_checkpoint(model, processor, out_dir)


def build_llava_next(out_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer(
        trailing_special_tokens=(*LLAMA3_SPECIAL, IMAGE, PAD),
        named_special_tokens={"bos_token": BEGIN_OF_TEXT, "eos_token": EOT, "pad_token": PAD, "image_token": IMAGE},
        chat_template=NEXT_TEMPLATE,
        add_bos_token=True,  # the Llama-3 tokenizer prepends <|begin_of_text|>
        padding_side="left",
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        do_pad=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=NEXT_TEMPLATE,
        image_token=IMAGE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = llama3_text_config(
        len(tokenizer), bos_token_id=ids(BEGIN_OF_TEXT), eos_token_id=ids(EOT), pad_token_id=ids(PAD)
    )
    config = LlavaNextConfig(
        text_config=text,
        vision_config=dict(VISION),
        image_token_index=ids(IMAGE),
        image_grid_pinpoints=GRID_PINPOINTS,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(TILE // PATCH) ** 2,
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
        pad_token_id=text["pad_token_id"],
        dtype="float32",
    )
    model = seeded_model(LlavaNextForConditionalGeneration, config, seed)
    eos = [text["eos_token_id"], ids(END_OF_TEXT)]
    model.generation_config = generation_config(text["bos_token_id"], text["pad_token_id"], eos)
    return save_checkpoint(model, processor, out_dir)
