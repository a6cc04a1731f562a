"""Tiny random Qwen2.5-VL checkpoint (``Qwen2_5_VLForConditionalGeneration``).

Same architecture and processor as ``Qwen/Qwen2.5-VL-*-Instruct``: a windowed
ViT with 14-pixel patches, 2x2 spatial merge and temporal patch 2, its
``merger`` projecting into a Qwen2 decoder with multimodal RoPE (mrope); the
``Qwen2VLImageProcessor`` resizes each image to multiples of 28 pixels inside a
pixel budget, so the number of image tokens depends on the image size.  Only the
sizes are small.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.text import TEXT_HIDDEN, decoder_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "qwen2_5_vl"

# Special tokens of the real Qwen2.5-VL tokenizer, in their real order (they
# follow the BPE vocabulary there too).
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Vision geometry: real values (patch 14, merge 2, temporal patch 2 -> resize factor 28).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
# Pixel budget: between 4 and 32 image tokens (16 to 128 patches) per image,
# instead of 4 to 16384 tokens for the real model.  E.g. 96x64 -> 6 tokens,
# 64x128 -> 8 tokens, 640x480 -> 24 tokens.
MIN_PIXELS = 4 * FACTOR * FACTOR
MAX_PIXELS = 32 * FACTOR * FACTOR

#: The fields of Qwen/Qwen2.5-VL-*-Instruct's generation_config.json besides the token ids: sampling with
#: a near-zero temperature, and a repetition penalty.
REAL_GENERATION_SETTINGS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 1e-06}

TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 16
# mrope splits head_dim/2 = 8 rotary frequencies over (time, height, width) in the
# proportions of the real [16, 24, 24] (head_dim 128).
MROPE_SECTION = [2, 3, 3]
assert sum(MROPE_SECTION) == HEAD_DIM // 2


def qwen_vl_chat_template(default_system_prompt: str | None) -> str:
    """A chat template modelled on the real Qwen-VL ones: images as <|vision_start|><|image_pad|><|vision_end|>
    (videos likewise) where the content list puts them, optional "Picture N: " labels, the assistant's turn
    opened last. With ``default_system_prompt`` (Qwen2.5-VL's), a system turn of it comes first when the
    messages give none; without it (Qwen3-VL's), there is a system turn only when the messages give one.
    No whitespace control: the only whitespace in the output is the explicit \\n."""
    default_system_turn = (
        ""
        if default_system_prompt is None
        else (
            "{% if loop.first and message['role'] != 'system' %}"
            f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n"
            "{% endif %}"
        )
    )
    return (
        "{% set image_count = namespace(value=0) %}"
        "{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}" + default_system_turn + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif item['type'] == 'video' or 'video' in item %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in item %}"
        "{{ item['text'] }}"
        "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "<|im_start|>assistant\n"
        "{% endif %}"
    )


CHAT_TEMPLATE = qwen_vl_chat_template("You are a helpful assistant.")


def qwen_vl_tokenizer(special_tokens, chat_template: str):
    """The Qwen-VL tokenizer: ``special_tokens`` after the BPE entries, <|endoftext|> the pad, <|im_end|> the eos,
    no bos."""
    return build_tokenizer(
        trailing_special_tokens=special_tokens,
        named_special_tokens={"pad_token": PAD_TOKEN, "eos_token": IM_END},
        chat_template=chat_template,
        add_bos_token=False,
        padding_side="right",  # as the real tokenizer_config.json; generation needs "left"
        extra_init_kwargs={"errors": "replace", "split_special_tokens": False},
    )


def build_processor():
    """The ``Qwen2_5_VLProcessor`` (tokenizer, image and video processors)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = qwen_vl_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE)
    geometry = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **geometry)
    # cap_pixels_per_frame=True: the reference (qwen-vl-utils) behaviour, and it
    # silences transformers' warning about the default changing.
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=True, **geometry
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pad_id, eos_id = ids[PAD_TOKEN], ids[IM_END]
    bos_id = pad_id  # the real config's bos_token_id is <|endoftext|> too
    text_config = decoder_config(
        len(tokenizer),
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": MROPE_SECTION},
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        hidden_act="silu",
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        tokens_per_second=2,
        window_size=112,  # real value: windows of 8x8 patches (4x4 merged tokens)
        fullatt_block_indexes=[1],  # last block full attention, block 0 windowed
        out_hidden_size=TEXT_HIDDEN,
        dtype="float32",
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Qwen2.5-VL checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = build_processor()
    config = build_config(processor.tokenizer)
    # generate(do_sample=False) still applies the real settings' repetition penalty.
    return save_qwen_vl_checkpoint(
        Qwen2_5_VLForConditionalGeneration, config, processor, REAL_GENERATION_SETTINGS, out_dir, seed
    )


def save_qwen_vl_checkpoint(model_class, config, processor, real_generation_settings, out_dir: Path, seed: int) -> Path:
    """``model_class(config)`` from ``seed``, saved with ``processor`` and a generation_config.json as the real
    Qwen-VL ones: stop on <|im_end|> or <|endoftext|>, and ``real_generation_settings``, its authors' decoding
    settings."""
    model = seeded_model(model_class, config, seed)
    text = config.text_config
    model.generation_config = generation_config(
        text.bos_token_id, text.pad_token_id, [text.eos_token_id, text.pad_token_id], **real_generation_settings
    )
    return save_checkpoint(model, processor, out_dir)
