"""Tiny random Mistral Small 3.1 (``Mistral3ForConditionalGeneration``, model_type ``mistral3``).

Same architecture and processor as ``mistralai/Mistral-Small-3.1-24B-Instruct-2503``: a Pixtral vision tower
(14-px patches, 2D RoPE, no CLS, variable image size) whose last layer (``vision_feature_layer -1``) goes
through the ``multi_modal_projector`` (RMSNorm, a learned 2x2 ``patch_merger`` over each image's patch grid,
a 2-layer GELU MLP, no biases) into a Mistral decoder. The ``PixtralProcessor`` resizes each image so that its
longest edge is at most 1540 px, rounds both sides up to a multiple of patch x merge = 28 px, pads the batch's
``pixel_values`` to its largest image and gives each image's real size in ``image_sizes``; the tower takes
only each image's own patches ((h/14) x (w/14)), all images' patches concatenated into one sequence with a
block-diagonal attention mask. The prompt's ``[IMG]`` is expanded into one ``[IMG]`` per merged token, one
``[IMG_BREAK]`` ending each row, the last row's ``[IMG_BREAK]`` replaced by ``[IMG_END]``: the last ``[IMG]``
(the config's ``image_token_index`` 10) is the last image feature, and ``[IMG_END]`` follows it.

Tokenizer: Tekken's control tokens keep their real ids (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``[INST]`` 3,
``[/INST]`` 4, ..., ``[IMG]`` 10, ``<pad>`` 11, ``[IMG_BREAK]`` 12, ``[IMG_END]`` 13, ..., ``[SYSTEM_PROMPT]``
17, ``[/SYSTEM_PROMPT]`` 18, ``[TOOL_CONTENT]`` 19); the real one reserves ids up to 999 for more control
tokens before its 131072-entry vocabulary, here the small BPE follows id 19. The chat template, modelled on
the real one, writes ``<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]`` + ``[IMG]`` + ``{text}[/INST]``;
like the real one it puts in a default system message where the messages have none, and that message
holds the day's date (``strftime_now``), so the prompt depends on the day it is rendered (the real default
message is longer; this one keeps its shape). Generation config: bos 1, eos 2, pad 11.

Tiny geometry, in the real proportions where the CPU allows: 4-px patches, merge 2 (8-px merged tokens,
real 28), longest edge 64 px (real 1540): at most 8x8 merged tokens per image (real 55x55).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import CLIP_MEAN, CLIP_STD
from vlmstates.demo.tiny.text import decoder_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "mistral3"

PATCH = 4  # real 14
SPATIAL_MERGE = 2  # real 2
LONGEST_EDGE = 64  # real 1540

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
INST, END_INST = "[INST]", "[/INST]"
IMG, IMG_BREAK, IMG_END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SYSTEM, END_SYSTEM = "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"
# Tekken's control tokens in their real order: ids 0-19.
CONTROL_TOKENS = (
    UNK,
    BOS,
    EOS,
    INST,
    END_INST,
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    IMG,
    PAD,
    IMG_BREAK,
    IMG_END,
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    SYSTEM,
    END_SYSTEM,
    "[TOOL_CONTENT]",
)
REAL_IDS = {
    UNK: 0,
    BOS: 1,
    EOS: 2,
    INST: 3,
    END_INST: 4,
    IMG: 10,
    PAD: 11,
    IMG_BREAK: 12,
    IMG_END: 13,
    SYSTEM: 17,
    END_SYSTEM: 18,
}

CHAT_TEMPLATE = (
    "{%- set today = strftime_now('%Y-%m-%d') %}"
    "{%- set default_system_message = 'You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI. "
    "The current date is ' + today + '.' %}"
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}"
    "{{- '[INST]' }}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{{- '[/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
)

VISION_HIDDEN = 32


def build_processor():
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = build_tokenizer(
        leading_special_tokens=CONTROL_TOKENS,
        named_special_tokens={"unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,  # the Tekken tokenizer prepends <s>
        padding_side="left",
    )
    wrong = {t: i for t, i in REAL_IDS.items() if tokenizer.convert_tokens_to_ids(t) != i}
    if wrong:
        raise RuntimeError(f"control tokens without their real ids: {wrong}")
    image_processor = PixtralImageProcessor(
        size={"longest_edge": LONGEST_EDGE},
        patch_size={"height": PATCH, "width": PATCH},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        spatial_merge_size=SPATIAL_MERGE,
        chat_template=CHAT_TEMPLATE,
        image_token=IMG,
        image_break_token=IMG_BREAK,
        image_end_token=IMG_END,
    )


def build_config(tokenizer):
    from transformers import Mistral3Config

    ids = tokenizer.convert_tokens_to_ids
    text = decoder_config(
        len(tokenizer),
        model_type="mistral",
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
        sliding_window=None,
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOS),
        pad_token_id=ids(PAD),
    )
    vision = dict(
        model_type="pixtral",
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=VISION_HIDDEN // 2,
        patch_size=PATCH,
        image_size=LONGEST_EDGE,
        hidden_act="silu",
        rope_parameters={"rope_theta": 10000.0},  # rope_type "axial" (2D), the config's default
        dtype="float32",
    )
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=ids(IMG),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        spatial_merge_size=SPATIAL_MERGE,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Mistral Small 3.1 checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Mistral3ForConditionalGeneration

    processor = build_processor()
    config = build_config(processor.tokenizer)
    model = seeded_model(Mistral3ForConditionalGeneration, config, seed)
    text = config.text_config
    model.generation_config = generation_config(text.bos_token_id, text.pad_token_id, [text.eos_token_id])
    return save_checkpoint(model, processor, out_dir)
