"""Tiny random Idefics3 checkpoint (``Idefics3ForConditionalGeneration``).

Same architecture and processor as ``HuggingFaceM4/Idefics3-8B-Llama3``: each image is resized so that its
longest edge is 4 tiles (real: 1456 px, 4 x 364), split into a grid of square sub-images of the tower's size
plus the whole image resized to one tile (the global image); a SigLIP tower (14-px patches) encodes every
sub-image, and the ``connector`` pixel-shuffles each one's patch grid by ``scale_factor`` 2 and projects it
into a Llama 3.1 decoder: ``image_seq_len`` tokens per sub-image (real: (364/14 = 26)^2 / 4 = 169). The
processor writes each sub-image as ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x image_seq_len
(a newline after each row of the grid), then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` x
image_seq_len + ``<fake_token_around_image>``, and pads every sample's image list to the batch's longest with
all-zero images, which the model drops. The chat template, modelled on the real one, gives
``<|begin_of_text|>User:<image>{text}<end_of_utterance>\\nAssistant:``; like Llama 3's, the tokenizer adds
``<|begin_of_text|>`` to a plain ``tokenizer(text)``. The real generation_config.json stops on four ids
(``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``, ``<end_of_utterance>``) and pads with 128002
(``<|reserved_special_token_0|>``); so does this one, with its own ids.

Tiny geometry: 56-px tiles (4x4 patches of the real 14 px), shuffled 2x2 -> 4 tokens per sub-image; longest
edge 4 x 56 = 224 px, so up to a 4x4 grid. Special-token ids are not the real ones (128000 + ...): the
vocabulary is small; their names and order are (Llama 3's first, then ``<fake_token_around_image>``,
``<image>``, ``<end_of_utterance>`` as the real 128256-128258, then the grid tags).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.image import SIGLIP_MEAN, SIGLIP_STD
from vlmstates.demo.tiny.text import BEGIN_OF_TEXT, END_OF_TEXT, EOM, EOT, llama3_text_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "idefics3"

PATCH = 14
TILE = 4 * PATCH  # 56; real 364 (26 patches per side)
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2  # 4
LONGEST_EDGE = 4 * TILE
GRID_TAGS = 6  # the processor looks up <row_r_col_c> for r, c <= 6

PAD = "<|reserved_special_token_0|>"
FAKE, IMAGE, END_OF_UTTERANCE, GLOBAL = "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"
ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, GRID_TAGS + 1) for c in range(1, GRID_TAGS + 1))

CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_processor():
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tokenizer = build_tokenizer(
        leading_special_tokens=(BEGIN_OF_TEXT, END_OF_TEXT, PAD, EOM, EOT),
        trailing_special_tokens=(FAKE, IMAGE, END_OF_UTTERANCE, GLOBAL, *ROW_COL),
        named_special_tokens={"bos_token": BEGIN_OF_TEXT, "eos_token": END_OF_UTTERANCE, "pad_token": PAD},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,  # Llama 3's tokenizer starts every tokenizer(text) with <|begin_of_text|>
    )
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
        resample=1,
    )
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    text = llama3_text_config(
        len(tokenizer),
        head_dim=16,
        bos_token_id=ids(BEGIN_OF_TEXT),
        eos_token_id=ids(END_OF_TEXT),
        pad_token_id=ids(PAD),
    )
    vision = dict(
        model_type="idefics3_vision",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        hidden_act="gelu_pytorch_tanh",
        dtype="float32",
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE_FACTOR,
        image_token_id=ids(IMAGE),
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(Idefics3ForConditionalGeneration, config, seed)
    eos = [ids(END_OF_TEXT), ids(EOM), ids(EOT), ids(END_OF_UTTERANCE)]
    model.generation_config = generation_config(text["bos_token_id"], text["pad_token_id"], eos)
    return save_checkpoint(model, processor, out_dir)
