"""Tiny random FastVLM (``FastVlmForConditionalGeneration``), as the converted ``KamilaMila/FastVLM-*`` checkpoints.

The real model: a FastViTHD vision tower (timm's ``fastvit_mci3``, wrapped by ``TimmWrapperModel``, built
with ``model_args {"inference_mode": true}``: the reparameterised single-branch convolutions) whose
``forward_features`` output, the ``final_conv`` map ``[B, 3072, H/64, W/64]`` (stem /4, four downsampling
stages /16), is flattened to ``[B, H/64 * W/64, 3072]`` (``vision_feature_select_strategy "full"``, layer -1:
the only values the config accepts) and projected by a 2-layer GELU MLP into a Qwen2 decoder. The
``CLIPImageProcessor`` resizes the shortest edge to 1024 and centre-crops 1024x1024 (bicubic, mean 0 and std
1: pixels only rescaled to [0, 1]), so every image gives the same 16x16 = 256 ``<image>`` tokens; the
``LlavaProcessor`` expands ``<image>`` with ``patch_size 64`` (the tower's total stride) and no extra token.

Tokens as the conversion made them: Qwen2's tokenizer (no BOS is prepended; ``<|endoftext|>`` 151643 is
pad and eos, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645) plus ``<image>`` added after them (151646);
the model's vocabulary is that size rounded up to a multiple of 64 (152000 for 0.5B/1.5B, 152128 for 7B).
The chat template writes a default system turn, then ``<|im_start|>user\\n<image>\\n{text}<|im_end|>\\n
<|im_start|>assistant\\n`` (images first, each text after a newline). The generation config the conversion
wrote comes from Qwen2's base config: bos and eos ``<|endoftext|>`` only (``<|im_end|>`` ends no answer
there: config/all-families.yaml adds it for the real model).

Tiny geometry: the real five stages (repmixer, repmixer, repmixer, attention, attention; downsampling
before stages 2-5; conditional positional encoding in stages 4 and 5; LayerNorm2d) with one or two blocks
each and widths 4, 8, 16, 32, 64 (the real 96 ... 1536 divided by 24; the attention stages keep timm's
head_dim 32), final_conv widening to 128 as the real one widens 1536 to 3072. 256-px crops (real 1024)
give 4x4 = 16 image tokens (real 16x16).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.text import ENDOFTEXT, IM_END, IM_START, qwen2_text_config
from vlmstates.demo.tiny.tokenizer import build_tokenizer

IMAGE = "<image>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE)

STRIDE = 64  # the tower's total stride (real), the processor's patch_size
CROP = 256  # real 1024
EMBED_DIMS = [4, 8, 16, 32, 64]  # real [96, 192, 384, 768, 1536]
VISION_HIDDEN = 2 * EMBED_DIMS[-1]  # final_conv's width (cls_ratio 2): real 3072

# Modelled on the converted checkpoints' template: a default system turn when the conversation has none;
# in each turn all images first, then every text after a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ '\n' + item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(
        trailing_special_tokens=SPECIAL_TOKENS,
        named_special_tokens={"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,
        padding_side="right",
    )
    ids = tokenizer.convert_tokens_to_ids
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        do_center_crop=True,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=STRIDE,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    vision = dict(
        model_type="timm_wrapper",
        architecture="fastvit_mci3",
        do_pooling=True,  # as the real config (the pooled output is unused)
        global_pool="avg",
        hidden_size=VISION_HIDDEN,
        initializer_range=0.02,
        model_args={"inference_mode": True, "layers": [1, 1, 2, 1, 1], "embed_dims": EMBED_DIMS},
        num_labels=0,
    )
    text = qwen2_text_config(
        -(-len(tokenizer) // 64) * 64,  # padded to a multiple of 64, as the conversion did
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(ENDOFTEXT),
    )
    config = FastVlmConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids(IMAGE),
        image_seq_length=(CROP // STRIDE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = seeded_model(FastVlmForConditionalGeneration, config, seed)
    model.generation_config = generation_config(ids(ENDOFTEXT), ids(ENDOFTEXT), [ids(ENDOFTEXT)])
    return save_checkpoint(model, processor, out_dir)
