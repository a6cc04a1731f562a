"""Tiny random Molmo2 (``Molmo2ForConditionalGeneration``, native in transformers, model_type ``molmo2``).

Same architecture and processor as ``allenai/Molmo2-8B`` in transformers' native layout: a SigLIP-style ViT
(absolute position embeddings for one fixed square crop, 14-px patches as flattened pixels) runs on every crop
of an image; the outputs of two of its layers (``adapter_config.vision_feature_layer``, real ``[24, 18]`` of
25 layers) are concatenated and the ``multi_modal_projector`` (``Molmo2Adapter``) pools each 2x2 window of
patches with one cross-attention query (the window's mean), then projects the pooled vectors with a SwiGLU MLP
(``image_projector``) into a Qwen3-style decoder (per-head q/k norm), where they are *added* onto the
``<im_patch>`` placeholders' embeddings; image tokens attend to each other both ways in the prefill
(``mm_token_type_ids``). The ``Molmo2ImageProcessor`` gives one low-resolution crop (the whole image resized
to the crop size) and up to ``max_crops`` (real 8) overlapping high-resolution crops of a canvas the image is
resized to (overlap margins of 4 patches on each side); every crop of the batch is concatenated into one
``pixel_values`` [crops, patches, pixels] (no padding crops), ``image_token_pooling`` indexes that flat patch
list, ``image_grids`` holds each image's pooled grids ``[low h, low w, high h, high w]`` and
``image_num_crops`` its crop count. The processor expands ``<|image|>`` into ``<low_res_im_start>`` +
rows of ``<im_patch>`` each closed by ``<im_col>`` + ``<im_end>``, then the same for the high-resolution grid
after ``<im_start>``: the last ``<im_patch>`` (config ``image_patch_id``) is the high-resolution grid's last
token, followed by ``<im_col><im_end>``. It also prepends the tokenizer's bos token, which is ``<|im_end|>``.

Tokenizer: Qwen's ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (bos and eos) after the BPE, then
Molmo2's image and video tokens in the real order (``<im_start>``, ``<im_end>``, ``<im_patch>``, ``<im_col>``,
``<low_res_im_start>``, ``<|image|>``, ``<im_low>``, ``<frame_start>``, ``<frame_end>``, ``<|video|>``) as the
decoder's ``additional_vocab_size`` entries beyond ``vocab_size`` (real: 151936 + 128): the embedding covers
them, the LM head does not. Chat template modelled on the real one: the image placeholder before the turns,
``<|image|><|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n``. Generation config as the real one:
bos and eos ``<|im_end|>``, pad ``<|endoftext|>``.

Tiny geometry: 4-px patches (real 14), 36-px crops of 9x9 patches (real 378, 27x27), overlap margins of 2
patches (real 4), at most 8 high-resolution crops, 2x2 pooling; the ViT has 3 layers, features from layers
[2, 0] (the last and the first, as the real [24, 18] of 25).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "molmo2"

PATCH = 4  # real 14
CROP = 9 * PATCH  # real 378 = 27 x 14
MARGINS = [2, 2]  # real [4, 4]
MAX_CROPS = 8
POOLING = [2, 2]
VIT_LAYERS = 3
FEATURE_LAYERS = [2, 0]  # real [24, 18] of 25 layers

ENDOFTEXT, IM_START_TURN, IM_END_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKENS = (
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
)

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}{% if message['content'] is not string %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if image_count.value == 1 %}{{ '<|image|>' }}"
    "{% elif image_count.value > 1 %}{% for i in range(image_count.value) %}{{ 'Image ' ~ (i + 1) ~ '<|image|>' }}{% endfor %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text_content = message['content'] %}"
    "{% else %}{% set m = namespace(text='') %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{% set m.text = m.text ~ ('' if not m.text else ' ') ~ content['text'] %}{% endif %}"
    "{% endfor %}{% set text_content = m.text %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>user\\n' }}{{ text_content }}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n' }}{{ text_content }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEXT_HIDDEN = 64
VISION_HIDDEN = 32


def build_processor():
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    tokenizer = build_tokenizer(
        trailing_special_tokens=(ENDOFTEXT, IM_START_TURN, IM_END_TURN, *IMAGE_TOKENS),
        named_special_tokens={"bos_token": IM_END_TURN, "eos_token": IM_END_TURN, "pad_token": ENDOFTEXT},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    common = dict(
        patch_size=PATCH, pooling_size=POOLING, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2
    )
    image_processor = Molmo2ImageProcessor(
        size={"height": CROP, "width": CROP}, max_crops=MAX_CROPS, overlap_margins=MARGINS, **common
    )
    video_processor = Molmo2VideoProcessor(size={"height": CROP, "width": CROP}, patch_size=PATCH, pooling_size=[3, 3])
    return Molmo2Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    from transformers import Molmo2Config

    ids = tokenizer.convert_tokens_to_ids
    base_vocab = ids(IMAGE_TOKENS[0])  # the image tokens are the additional vocabulary after it
    if ids(IMAGE_TOKENS[-1]) != len(tokenizer) - 1:
        raise RuntimeError("the image tokens must be the tokenizer's last entries")
    text = dict(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=base_vocab,
        additional_vocab_size=len(IMAGE_TOKENS),
        qk_norm_type="qwen3",
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        dtype="float32",
    )
    vision = dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=VIT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=VISION_HIDDEN // 2,
        image_size=[CROP, CROP],
        patch_size=PATCH,
        dtype="float32",
    )
    adapter = dict(
        vision_feature_layer=FEATURE_LAYERS,
        hidden_size=VISION_HIDDEN,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=VISION_HIDDEN // 2,
        intermediate_size=2 * TEXT_HIDDEN,
        text_hidden_size=TEXT_HIDDEN,
        dtype="float32",
    )
    return Molmo2Config(
        text_config=text,
        vision_config=vision,
        adapter_config=adapter,
        image_start_token_id=ids("<im_start>"),
        low_res_image_start_token_id=ids("<low_res_im_start>"),
        image_end_token_id=ids("<im_end>"),
        image_patch_id=ids("<im_patch>"),
        frame_start_token_id=ids("<frame_start>"),
        frame_end_token_id=ids("<frame_end>"),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Molmo2 checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Molmo2ForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    config = build_config(tokenizer)
    model = seeded_model(Molmo2ForConditionalGeneration, config, seed)
    eos = tokenizer.convert_tokens_to_ids(IM_END_TURN)
    model.generation_config = generation_config(eos, tokenizer.convert_tokens_to_ids(ENDOFTEXT), [eos])
    return save_checkpoint(model, processor, out_dir)
