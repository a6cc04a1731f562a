"""Tiny random Gemma 3 checkpoint (``Gemma3ForConditionalGeneration``).

Same architecture and processor as ``google/gemma-3-*-it``: a SigLIP vision
tower on a fixed square image, the ``multi_modal_projector`` average-pooling
the patch grid to ``mm_tokens_per_image`` soft tokens and projecting them into
a Gemma 3 decoder with interleaved sliding-window and global attention layers.
The ``Gemma3Processor`` replaces each ``<start_of_image>`` of the prompt by
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` +
``<end_of_image>\\n\\n``, whatever the image size.  Only the sizes are small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD, siglip_vision_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "gemma3"

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# As in the real tokenizer: pad/eos/bos/unk take ids 0-3, the turn and image
# tokens come after the ordinary vocabulary.
LEADING_SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)
TRAILING_SPECIAL_TOKENS = (START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT)

# Vision geometry: a 64x64 image in 8x8 patches is an 8x8 grid, pooled 2x2 to
# a 4x4 grid = 16 soft tokens per image (real: 896 px, 14 px patches, 64x64
# grid pooled 4x4 to 256 tokens).
IMAGE_SIZE = 64
PATCH_SIZE = 8
MM_TOKENS_PER_IMAGE = 16
_side = int(round(MM_TOKENS_PER_IMAGE**0.5))
assert _side * _side == MM_TOKENS_PER_IMAGE and (IMAGE_SIZE // PATCH_SIZE) % _side == 0

TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = 16
NUM_LAYERS = 4
# Real Gemma 3 has 5 sliding-window layers per global one; with 4 layers keep
# both kinds: three local layers, then a global one.
LAYER_TYPES = ["sliding_attention"] * (NUM_LAYERS - 1) + ["full_attention"]
# Shorter than a typical prompt (~60 tokens with the 16 image tokens), so that
# the sliding-window code path really cuts, as it does for real long prompts.
SLIDING_WINDOW = 32


def gemma_chat_template(content_item: str) -> str:
    """A chat template modelled on the real Gemma 3 ones: bos, a system message folded into the first user turn,
    the assistant role named "model", texts trimmed; ``content_item`` writes one item of a content list (the
    image, and the audio, placeholders are what Gemma 3 and Gemma 3n differ in). No whitespace control: the
    only whitespace in the output is the explicit \\n and the message texts."""
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% if messages[0]['content'] is string %}"
        "{% set first_user_prefix = messages[0]['content'] ~ '\n\n' %}"
        "{% else %}"
        "{% set first_user_prefix = messages[0]['content'][0]['text'] ~ '\n\n' %}"
        "{% endif %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{% set first_user_prefix = '' %}"
        "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "<start_of_turn>{{ role }}\n"
        "{% if loop.first %}{{ first_user_prefix }}{% endif %}"
        "{% if message['content'] is string %}"
        "{{ message['content'] | trim }}"
        "{% else %}"
        "{% for item in message['content'] %}" + content_item + "{% endfor %}"
        "{% endif %}"
        "<end_of_turn>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )


# Images as <start_of_image>.
CHAT_TEMPLATE = gemma_chat_template(
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<start_of_image>"
    "{% elif item['type'] == 'text' or 'text' in item %}"
    "{{ item['text'] | trim }}"
    "{% endif %}"
)


def build_processor():
    """The ``Gemma3Processor`` (tokenizer and image processor)."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = build_tokenizer(
        leading_special_tokens=LEADING_SPECIAL_TOKENS,
        trailing_special_tokens=TRAILING_SPECIAL_TOKENS,
        named_special_tokens={
            "pad_token": PAD,
            "eos_token": EOS,
            "bos_token": BOS,
            "unk_token": UNK,
            "boi_token": BOI,
            "eoi_token": EOI,
            "image_token": IMAGE_SOFT,
        },
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,  # like the real Gemma tokenizer: tokenizer(text) starts with <bos>
        padding_side="left",  # as the real tokenizer_config.json
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,  # bilinear
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )


def build_config(tokenizer):
    from transformers import Gemma3Config

    def tid(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    pad_id, bos_id = tid(PAD), tid(BOS)
    eos_ids = [tid(EOS), tid(END_OF_TURN)]
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        sliding_window=SLIDING_WINDOW,
        layer_types=LAYER_TYPES,
        sliding_window_pattern=NUM_LAYERS,  # kept consistent with layer_types in config.json
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        dtype="float32",
    )
    vision_config = siglip_vision_config(
        IMAGE_SIZE, PATCH_SIZE, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tid(BOI),
        eoi_token_index=tid(EOI),
        image_token_index=tid(IMAGE_SOFT),
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_ids,
        tie_word_embeddings=True,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Gemma 3 checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Gemma3ForConditionalGeneration

    processor = build_processor()
    config = build_config(processor.tokenizer)
    model = seeded_model(Gemma3ForConditionalGeneration, config, seed)
    # transformers initialises the projection to zeros (a trained checkpoint never has that), which would
    # make the text blind to the image. Give it random weights, scaled so that the projected image tokens
    # (unit-RMS normed vision features times this matrix) have the spread of the text embeddings
    # (initializer_range times the sqrt(hidden) scale).
    text = config.text_config
    std = text.initializer_range * text.hidden_size**0.5 / config.vision_config.hidden_size**0.5
    generator = torch.Generator().manual_seed(seed)
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    model.generation_config = generation_config(text.bos_token_id, text.pad_token_id, text.eos_token_id)
    return save_checkpoint(model, processor, out_dir)
