"""Tiny random SmolVLM2 checkpoint (``SmolVLMForConditionalGeneration``).

Same architecture and processor as ``HuggingFaceTB/SmolVLM2-2.2B-Instruct``: each image is resized so that its
longest edge is 4 tiles (real: 1536 px, 4 x 384), split into a grid of square sub-images of the tower's size
plus the whole image resized to one tile (the global image); a SigLIP tower (14-px patches) encodes every
sub-image, and the ``connector`` pixel-shuffles each one's patch grid by ``scale_factor`` 3 and projects it
into a SmolLM2 (Llama) decoder: ``image_seq_len`` tokens per sub-image (real: (384/14 -> 27)^2 / 9 = 81).
The processor writes each sub-image as ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x
image_seq_len, then ``<fake_token_around_image><global-img>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>``, and pads every sample's image list to the batch's longest with all-zero
images, which the model drops. The chat template, modelled on the real one, gives
``<|im_start|>User:<image>{text}<end_of_utterance>\\nAssistant:``. The processor needs the num2words package.

Tiny geometry: 84-px tiles (6x6 patches of the real 14 px), pooled 3x3 -> 4 tokens per sub-image; longest
edge 4 x 84 = 336 px, so up to a 4x4 grid. Special-token ids are not the real ones (49152 + ...): the
vocabulary is small; their names and order are.
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD
from vlmstates.demo.tiny.text import ENDOFTEXT, IM_END, IM_START, decoder_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "smolvlm"

PATCH = 14
TILE = 6 * PATCH  # 84; real 384 (27 patches per side)
SCALE_FACTOR = 3
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2  # 4
LONGEST_EDGE = 4 * TILE
MAX_GRID = 4

GLOBAL, FAKE, IMAGE, END_OF_UTTERANCE = "<global-img>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"
ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1))

CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_processor():
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer = build_tokenizer(
        leading_special_tokens=(ENDOFTEXT, IM_START, IM_END),
        trailing_special_tokens=(GLOBAL, *ROW_COL, FAKE, IMAGE, END_OF_UTTERANCE),
        named_special_tokens={
            "bos_token": IM_START,
            "eos_token": END_OF_UTTERANCE,
            "pad_token": IM_END,
            "unk_token": ENDOFTEXT,
        },
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
    size = {"longest_edge": LONGEST_EDGE}
    image_processor = SmolVLMImageProcessor(
        do_image_splitting=True,
        size=size,
        max_image_size={"longest_edge": TILE},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resample=1,
    )
    video_processor = SmolVLMVideoProcessor(size=size, max_image_size={"longest_edge": TILE})
    return SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    text = decoder_config(  # SmolLM2: a Llama without grouped-query attention
        len(tokenizer),
        model_type="llama",
        num_key_value_heads=4,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 130000.0},
        bos_token_id=ids(IM_START),
        eos_token_id=ids(END_OF_UTTERANCE),
        pad_token_id=ids(IM_END),
    )
    vision = dict(
        model_type="smolvlm_vision",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        dtype="float32",
    )
    config = SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE_FACTOR,
        image_token_id=ids(IMAGE),
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(SmolVLMForConditionalGeneration, config, seed)
    eos = [text["eos_token_id"], ids(IM_END)]
    model.generation_config = generation_config(text["bos_token_id"], text["pad_token_id"], eos)
    return save_checkpoint(model, processor, out_dir)
