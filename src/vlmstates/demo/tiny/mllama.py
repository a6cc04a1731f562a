"""Tiny random Llama-3.2-Vision (``MllamaForConditionalGeneration``), as ``meta-llama/Llama-3.2-11B-Vision-Instruct``.

The real model: the image is resized (aspect ratio kept) onto the best canvas of 560-px tiles among the
supported arrangements of at most ``max_image_tiles`` 4 (1x1, 1x2, 1x3, 1x4, 2x1, 2x2, 3x1, 4x1), zero-padded to
that canvas and cut into tiles; ``pixel_values`` is always [B, images, 4 tiles, 3, 560, 560], the unused tiles
all zero and masked by ``aspect_ratio_mask``; ``aspect_ratio_ids`` names the arrangement (1-based). The vision
model (14-px patches: 40x40 = 1600 patches + a CLS per tile = 1601, padded inside the model to 1608, a multiple
of 8, and cut back to 1601 at its output) has a 32-layer local encoder and an 8-layer gated global encoder; its
output, the multi-modal projector's input, is the global encoder's last state concatenated with the local
encoder's layers 3, 7, 15, 23 and 30 (``intermediate_layers_indices``): 6 x 1280 = 7680 wide
(``vision_output_dim``). The projector (one Linear to 4096) feeds the decoder only through cross-attention:
40 decoder blocks at ``model.language_model.layers``, of which 3, 8, 13, 18, 23, 28, 33, 38 are tanh-gated
cross-attention blocks (``cross_attention_layers``). The prompt holds ONE ``<|image|>`` (id 128256, the first id
after the 128256 entries of Llama 3's vocabulary, so the LM head, of ``vocab_size`` 128256, never produces it;
the embedding has ``vocab_size + 8`` rows) and no placeholders per patch; the processor's
``cross_attention_mask`` [B, tokens, images, 4 tiles] lets each token from the ``<|image|>`` on attend to the
image's real tiles.

The chat template is modelled on the real one: ``<|begin_of_text|>`` (the bos token), then, with an image,
no system block (a system message with an image raises, as in the real template; without images the real
"Cutting Knowledge Date" system block is written, with the fixed date the real template falls back to), each
turn ``<|start_header_id|>{role}<|end_header_id|>\\n\\n`` + its contents in order (an image as ``<|image|>``, so
the image sits at the start of the user turn) + ``<|eot_id|>``, and the generation prompt
``<|start_header_id|>assistant<|end_header_id|>\\n\\n``. Llama 3's special tokens in their real order
(``<|begin_of_text|>`` 128000, ``<|end_of_text|>`` 128001, two reserved, ``<|finetune_right_pad_id|>`` 128004
the pad, one reserved, ``<|start_header_id|>`` 128006, ``<|end_header_id|>`` 128007, ``<|eom_id|>`` 128008,
``<|eot_id|>`` 128009, ``<|python_tag|>`` 128010) follow the small BPE; ``<|image|>`` comes last and is
``text_config.vocab_size``, as in the real checkpoint. generation_config.json as the Instruct checkpoint's:
eos [<|end_of_text|>, <|eom_id|>, <|eot_id|>], pad <|finetune_right_pad_id|>, sampling (do_sample,
temperature 0.6, top_p 0.9) that the engine's greedy settings override.

Tiny geometry, in the real proportions: 28-px tiles of 7-px patches (4x4 = 16 patches + CLS = 17 per tile,
padded to 24 inside the vision model, as 1601 is to 1608), 4 tiles at most with the real arrangements; an
8-layer local encoder whose layers 0, 1, 3, 5, 6 are concatenated with the 2-layer global encoder's output
(6 x 16 = 96 = ``vision_output_dim``); 5 decoder blocks, block 3 a cross-attention block (the real pattern: every
fifth from 3). The gates, which transformers initialises to zero (so that a random model would ignore the
image), are set to non-zero values, as trained weights have them: the image reaches the text through every
cross-attention block, and the aspect-ratio and tile position embeddings matter.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import CLIP_MEAN, CLIP_STD
from vlmstates.demo.tiny.text import BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOM, EOT, START_HEADER
from vlmstates.demo.tiny.tokenizer import build_tokenizer

TILE = 28  # real 560
PATCH = 7  # real 14: 4x4 patches per tile (real 40x40)
MAX_TILES = 4

PAD, PYTHON = "<|finetune_right_pad_id|>", "<|python_tag|>"
IMAGE = "<|image|>"
# Llama 3's first special tokens in their real order (ids 128000-128010 there)
LLAMA3_SPECIAL = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    PYTHON,
)

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set image_ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{%- set image_ns.has_images = true %}{%- endif %}"
    "{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if image_ns.has_images and not system_message == '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not image_ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}{{- 'Today Date: 26 Jul 2024\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

TEXT_HIDDEN = 64
NUM_LAYERS = 5
CROSS_ATTENTION_LAYERS = [3]  # real [3, 8, 13, 18, 23, 28, 33, 38] of 40
VISION_HIDDEN = 16
INTERMEDIATE_LAYERS = [0, 1, 3, 5, 6]  # real [3, 7, 15, 23, 30] of 32
VISION = dict(
    hidden_size=VISION_HIDDEN,
    intermediate_size=2 * VISION_HIDDEN,
    num_hidden_layers=8,
    num_global_layers=2,
    attention_heads=2,
    image_size=TILE,
    patch_size=PATCH,
    max_num_tiles=MAX_TILES,
    intermediate_layers_indices=INTERMEDIATE_LAYERS,
    vision_output_dim=VISION_HIDDEN * (1 + len(INTERMEDIATE_LAYERS)),
    hidden_act="gelu",
    norm_eps=1e-5,
)


def _open_gates(model) -> None:
    """Non-zero gates, fixed values (transformers initialises them to zero, which would cut the image off)."""
    import torch

    with torch.no_grad():
        vision = model.model.vision_model
        vision.gated_positional_embedding.gate.fill_(0.6)
        vision.pre_tile_positional_embedding.gate.fill_(0.5)
        vision.post_tile_positional_embedding.gate.fill_(0.4)
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.8)
                layer.cross_attn_mlp_gate.fill_(0.7)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tokenizer = build_tokenizer(
        trailing_special_tokens=(*LLAMA3_SPECIAL, IMAGE),
        named_special_tokens={"bos_token": BEGIN_OF_TEXT, "eos_token": EOT, "pad_token": PAD, "image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,  # the Llama-3 tokenizer prepends <|begin_of_text|>
        padding_side="left",
    )
    ids = tokenizer.convert_tokens_to_ids
    image_token_id = ids(IMAGE)
    assert image_token_id == len(tokenizer) - 1
    image_processor = MllamaImageProcessor(
        size={"height": TILE, "width": TILE},
        max_image_tiles=MAX_TILES,
        resample=2,
        do_pad=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    eos = [ids(END_OF_TEXT), ids(EOM), ids(EOT)]
    text = dict(
        vocab_size=image_token_id,  # <|image|> is the first id past the LM head's vocabulary, as in the real model
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=CROSS_ATTENTION_LAYERS,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=ids(BEGIN_OF_TEXT),
        eos_token_id=eos,
        pad_token_id=ids(PAD),
        tie_word_embeddings=False,
    )
    config = MllamaConfig(
        text_config=text, vision_config=dict(VISION), image_token_index=image_token_id, dtype="float32"
    )
    model = seeded_model(MllamaForConditionalGeneration, config, seed)
    _open_gates(model)
    model.generation_config = generation_config(
        ids(BEGIN_OF_TEXT),
        ids(PAD),
        eos,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    return save_checkpoint(model, processor, out_dir)
