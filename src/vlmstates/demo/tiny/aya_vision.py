"""Tiny random Aya Vision (``AyaVisionForConditionalGeneration``).

As ``CohereLabs/aya-vision-8b``: a SigLIP ViT (364 px, 14-px patches: 26x26 = 676 patches, no pooling head)
whose last layer, every patch kept (``vision_feature_layer -1``, strategy ``full``), enters the multi-modal
projector, which pixel-shuffles it (``downsample_factor 2``: 13x13 = 169 tokens of 4x the width), then
LayerNorm and a SwiGLU MLP (``alignment_intermediate_size`` 7x the decoder's width) into a Cohere2 decoder
(three sliding-window layers to one global, ``logit_scale`` 0.25, tied embeddings). The ``GotOcr2ImageProcessor``
crops each image into a grid of 364-px tiles chosen by its aspect ratio (1 to 12 tiles; the processor
asks for ``crop_to_patches``) plus the whole image as a global tile last, one flat list of crops for the batch.
The processor writes ``<|START_OF_IMG|>``, for each tile ``TILE_<i>`` (plain text) and 169 ``<|IMG_PATCH|>``
(the image token, id 255036 in the real vocabulary), then ``TILE_GLOBAL`` and the global tile's 169, then
``<|END_OF_IMG|>``: the last placeholder is the global tile's last token. Cohere's special tokens
(``<PAD>`` 0 ... ``<BOS_TOKEN>`` 5 first, the turn and image tokens after the BPE entries); chat template
modelled on the real one, with its system preamble shortened: ``<BOS_TOKEN><|START_OF_TURN_TOKEN|>
<|SYSTEM_TOKEN|>...<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|><image>{text}<|END_OF_TURN_TOKEN|>
<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>``; eos ``<|END_OF_TURN_TOKEN|>``.

Tiny geometry, in the real proportions: 42-px tiles of 7-px patches (6x6 = 36 patches, shuffled to 3x3 = 9
tokens a tile, an odd side as the real 13); the decoder's sliding window (real 4096, beyond every prompt of
this workflow) is 64 tokens, so that the tiny prompts do slide.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD, siglip_vision_config
from vlmstates.demo.tiny.text import TEXT_HIDDEN, decoder_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

TILE = 42  # real 364
PATCH = 7  # real 14
DOWNSAMPLE = 2
MAX_PATCHES = 12

PAD, UNK, CLS, SEP, MASK, BOS, EOS = "<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>"
START_TURN, END_TURN = "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"
USER, CHATBOT, SYSTEM = "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"
START_RESPONSE, END_RESPONSE = "<|START_RESPONSE|>", "<|END_RESPONSE|>"
START_IMG, END_IMG, IMG_PATCH, IMG_LINE_BREAK = (
    "<|START_OF_IMG|>",
    "<|END_OF_IMG|>",
    "<|IMG_PATCH|>",
    "<|IMG_LINE_BREAK|>",
)
LEADING = (PAD, UNK, CLS, SEP, MASK, BOS, EOS)
TRAILING = (
    START_TURN,
    END_TURN,
    USER,
    CHATBOT,
    SYSTEM,
    START_RESPONSE,
    END_RESPONSE,
    START_IMG,
    END_IMG,
    IMG_PATCH,
    IMG_LINE_BREAK,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are Aya Vision, a vision-language model. "
    "You are capable of interpreting images.<|END_OF_TURN_TOKEN|>"
    "{% for message in messages %}"
    "{{ '<|START_OF_TURN_TOKEN|>' + message['role'] | replace('user', '<|USER_TOKEN|>') "
    "| replace('assistant', '<|CHATBOT_TOKEN|><|START_RESPONSE|>') | replace('system', '<|SYSTEM_TOKEN|>') }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|END_RESPONSE|>' }}{% endif %}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|><|START_RESPONSE|>' }}{% endif %}"
)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        GotOcr2ImageProcessor,
    )

    tokenizer = build_tokenizer(
        leading_special_tokens=LEADING,
        trailing_special_tokens=TRAILING,
        named_special_tokens={"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": END_TURN},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,  # Cohere's tokenizer prepends <BOS_TOKEN> (the template writes its own)
        padding_side="left",
    )
    # as the real preprocessor_config.json: crop_to_patches false there, the processor asks for it
    image_processor = GotOcr2ImageProcessor(
        size={"height": TILE, "width": TILE},
        crop_to_patches=False,
        min_patches=1,
        max_patches=MAX_PATCHES,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resample=3,
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH * DOWNSAMPLE,
        img_size=TILE,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = decoder_config(
        len(tokenizer),
        model_type="cohere2",
        logit_scale=0.25,
        layer_norm_eps=1e-5,
        max_position_embeddings=8192,
        sliding_window=64,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        bos_token_id=ids(BOS),
        eos_token_id=ids(END_TURN),
        pad_token_id=ids(PAD),
        tie_word_embeddings=True,
    )
    config = AyaVisionConfig(
        text_config=text,
        vision_config=siglip_vision_config(TILE, PATCH),
        image_token_index=ids(IMG_PATCH),
        downsample_factor=DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        adapter_layer_norm_eps=1e-6,
        alignment_intermediate_size=7 * TEXT_HIDDEN,
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = seeded_model(AyaVisionForConditionalGeneration, config, seed)
    model.generation_config = generation_config(ids(BOS), ids(PAD), [ids(END_TURN)])
    return save_checkpoint(model, processor, out_dir)
