"""Tiny random GLM-4.1V checkpoint (``Glm4vForConditionalGeneration``).

As ``zai-org/GLM-4.1V-9B-Thinking``: a ViT with 14-pixel patches and temporal patch 2, a learned position grid
resampled (bicubic) to each image's grid, RMSNorm after its last block; a 2x2 convolution (``downsample``) merges
each 2x2 group of patches into one vector of the decoder's width, which the ``merger`` (an MLP) projects into a
GLM-4 decoder (extra norms after attention and MLP, partial rotary with multimodal RoPE, ``mrope_section``). The
``Glm4vImageProcessor`` resizes each image to multiples of 28 pixels inside a pixel budget (counted over the
two temporal frames of a still image), so the number of image tokens depends on the image size. The chat
template starts with ``[gMASK]<sop>``, writes no system turn unless given one, opens the user turn with
``<|user|>\\n`` and puts each image as ``<|begin_of_image|><|image|><|end_of_image|>`` where the message puts it
(the processor expands ``<|image|>``), the text right after it, then ``<|assistant|>\\n``. The tokenizer adds no
special tokens of its own (the template writes them). As the real generation_config.json: sampling settings and
several stop ids: ``<|endoftext|>`` (also the pad token), ``<|user|>`` and ``<|observation|>``, so a turn ends when
the model starts the next role's turn; the real file lists a fourth id (151348) whose token this tiny vocabulary
does not carry. The Thinking model answers ``<think>...</think><answer>...</answer>``; the tokens are here, the
tiny model's answers are random. Only the sizes are small:

* 2 heads of width 32 with one key-value head (real 32 heads of 128, 2 key-value heads), rotary over half of
  each head (partial_rotary_factor 0.5, real), mrope_section [2, 3, 3] of 8 frequencies (real [8, 12, 12] of 32);
* a learned position grid of 8x8 (real 24x24: ``image_size`` 336 / patch 14);
* 4 decoder blocks (real 40), 2 vision blocks (real 24).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.text import TEXT_HIDDEN, decoder_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "glm4v"

# Special tokens of the real GLM-4.1V tokenizer, in their real order after the BPE vocabulary (<|endoftext|> is
# 151329 there, <|image|> 151343).
ENDOFTEXT = "<|endoftext|>"
GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
BEGIN_OF_VIDEO = "<|begin_of_video|>"
END_OF_VIDEO = "<|end_of_video|>"
IMAGE = "<|image|>"
VIDEO = "<|video|>"
SPECIAL_TOKENS = (
    ENDOFTEXT,
    "[MASK]",
    GMASK,
    "[sMASK]",
    SOP,
    "<eop>",
    SYSTEM,
    USER,
    ASSISTANT,
    OBSERVATION,
    BEGIN_OF_IMAGE,
    END_OF_IMAGE,
    BEGIN_OF_VIDEO,
    END_OF_VIDEO,
    IMAGE,
    VIDEO,
)
#: the Thinking model's reasoning and answer markers (added tokens of the real vocabulary, later ids)
THINKING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Vision geometry: real values (patch 14, merge 2, temporal patch 2 -> resize factor 28).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
# Pixel budget over both temporal frames of a still image: between 4 and 24 image tokens per image (real:
# preprocessor_config.json's size {"shortest_edge": 12544, "longest_edge": 9633792}, 8 to 6144 tokens).
MIN_PIXELS = TEMPORAL_PATCH_SIZE * 4 * FACTOR * FACTOR
MAX_PIXELS = TEMPORAL_PATCH_SIZE * 24 * FACTOR * FACTOR

#: zai-org/GLM-4.1V-9B-Thinking's generation_config.json besides the token ids: sampling.
REAL_GENERATION_SETTINGS = {"do_sample": True, "temperature": 0.8, "top_p": 0.6, "top_k": 2, "repetition_penalty": 1.1}

TEXT_HEADS = 2
TEXT_KV_HEADS = 1
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 32
PARTIAL_ROTARY_FACTOR = 0.5
MROPE_SECTION = [2, 3, 3]
assert sum(MROPE_SECTION) == int(HEAD_DIM * PARTIAL_ROTARY_FACTOR) // 2

# Modelled on the real GLM-4.1V-Thinking chat template (no whitespace control: the only whitespace in the
# output is the explicit \n).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "<|system|>\n{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}"
    "<|user|>\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}"
    "<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "<|assistant|>\n{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|assistant|>\n"
    "{% endif %}"
)


def build_processor():
    """The ``Glm4vProcessor`` (tokenizer, image and video processors)."""
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    tokenizer = build_tokenizer(
        trailing_special_tokens=SPECIAL_TOKENS + THINKING_TOKENS,
        named_special_tokens={"pad_token": ENDOFTEXT, "eos_token": ENDOFTEXT},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        padding_side="left",
    )
    geometry = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Glm4vImageProcessor(size=size, **geometry)
    video_processor = Glm4vVideoProcessor(size=size, **geometry)
    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    from transformers import Glm4vConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pad_id = ids[ENDOFTEXT]
    text_config = decoder_config(
        len(tokenizer),
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": MROPE_SECTION,
            "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
        },
        eos_token_id=[ids[ENDOFTEXT], ids[USER], ids[OBSERVATION]],
        pad_token_id=pad_id,
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=2 * TEXT_HIDDEN,  # the merger's inner width (real 13696, the decoder's MLP width)
        num_heads=2,
        hidden_act="silu",
        in_channels=3,
        image_size=8 * PATCH_SIZE,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=TEXT_HIDDEN,
        rms_norm_eps=1e-5,
        dtype="float32",
    )
    return Glm4vConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE],
        video_token_id=ids[VIDEO],
        image_start_token_id=ids[BEGIN_OF_IMAGE],
        image_end_token_id=ids[END_OF_IMAGE],
        video_start_token_id=ids[BEGIN_OF_VIDEO],
        video_end_token_id=ids[END_OF_VIDEO],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny GLM-4.1V checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Glm4vForConditionalGeneration

    processor = build_processor()
    config = build_config(processor.tokenizer)
    model = seeded_model(Glm4vForConditionalGeneration, config, seed)
    text = config.text_config
    # no bos token: the template writes [gMASK]<sop>
    model.generation_config = generation_config(None, text.pad_token_id, text.eos_token_id, **REAL_GENERATION_SETTINGS)
    return save_checkpoint(model, processor, out_dir)
