"""Tiny random Phi-4-multimodal checkpoint (native ``Phi4MultimodalForCausalLM``).

Same architecture and processor as ``microsoft/Phi-4-multimodal-instruct`` at
revision ``refs/pr/70`` (the transformers-native format): a SigLIP-style vision
tower on 448-pixel crops in 14-pixel patches (a 32x32 grid, 2x2 average-pooled
to 16x16), the image embedding's two-layer projection MLP
(``img_projection_up`` -> GELU -> ``img_projection_down``) into a Phi-3-style
decoder with long-RoPE, a (tiny) conformer audio encoder, and the
``Phi4MultimodalProcessor``: each ``<|image|>`` of the prompt becomes
256 + 16 + 1 global-image tokens plus one token per pooled patch of the useful
part of the HD crops (plus one per row), so the count depends on the image size
and aspect ratio.  The image processor hard-codes the 256 + 16 of the global
image, which is why the vision grid keeps its real 32x32 patches.

By default a vision LoRA (peft, on the decoder's attention and MLP projections)
is written to ``vision-lora/``, as the real checkpoint ships one there (and the
adapter loads and activates it); ``vision_lora=False`` leaves it out.

The decoder's long-RoPE switches to its long factors once a batch holds a
position beyond ``original_max_position_embeddings``; the real model does that at
4096 (reached by images of many crops), this one at 1024 (reached by a 3-crop
image), so the tests can see that effect with small images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmstates.demo.tiny import generation_config, save_checkpoint, seeded_model
from vlmstates.demo.tiny.tokenizer import build_tokenizer

FAMILY = "phi4_multimodal"

# Special tokens of the real Phi-4-multimodal tokenizer, in their real relative
# order (<|endoftext|> 199999, <|image|> 200010, <|audio|> 200011, then the chat
# and tool markers); here they follow the small BPE vocabulary.
ENDOFTEXT = "<|endoftext|>"
IMAGE = "<|image|>"
AUDIO = "<|audio|>"
ENDOFPROMPT = "<|endofprompt|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
USER = "<|user|>"
SYSTEM = "<|system|>"
TOOL, TOOL_END = "<|tool|>", "<|/tool|>"
SPECIAL_TOKENS = (ENDOFTEXT, IMAGE, AUDIO, ENDOFPROMPT, ASSISTANT, END, USER, SYSTEM, TOOL, TOOL_END)

# Vision geometry: the real values (the processor assumes a 32x32 patch grid).
IMAGE_SIZE = 448
PATCH_SIZE = 14
DYNAMIC_HD = 36  # at most 36 HD crops per image, as the real processor

TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
NUM_LAYERS = 4
PARTIAL_ROTARY_FACTOR = 0.75  # real value
ROTARY_DIM = int(TEXT_HIDDEN // TEXT_HEADS * PARTIAL_ROTARY_FACTOR)  # 12
ORIGINAL_MAX_POSITIONS = 1024  # real: 4096
MAX_POSITIONS = 32 * ORIGINAL_MAX_POSITIONS  # real: 131072 = 32 x 4096

# Modelled on the chat template of the native Phi-4-multimodal processor: no
# separators, "<|role|>" + content + "<|end|>", images as <|image|>, audio as
# <|audio|>, "<|assistant|>" as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'audio' %}<|audio|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'system' and message['tools'] is defined and message['tools'] is not none %}"
    "<|tool|>{{ message['tools'] }}<|/tool|>"
    "{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% else %}{{ eos_token }}{% endif %}"
)

# LoRA on the decoder's projections only (the audio and vision towers have
# modules of the same names, so the pattern is anchored at the decoder layers).
LORA_TARGET_MODULES = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
LORA_RANK = 4
VISION_LORA_SUBFOLDER = "vision-lora"


def build_processor():
    """The ``Phi4MultimodalProcessor`` (image processor, audio feature extractor, tokenizer)."""
    from transformers import (
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    tokenizer = build_tokenizer(
        trailing_special_tokens=SPECIAL_TOKENS,
        named_special_tokens={
            "bos_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT,
            "image_token": IMAGE,
            "audio_token": AUDIO,
        },
        chat_template=CHAT_TEMPLATE,
        add_bos_token=False,  # the real template and tokenizer add no bos
        padding_side="right",
    )
    image_processor = Phi4MultimodalImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, patch_size=PATCH_SIZE, dynamic_hd=DYNAMIC_HD
    )
    audio_processor = Phi4MultimodalFeatureExtractor()
    return Phi4MultimodalProcessor(
        image_processor=image_processor,
        audio_processor=audio_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _rope_factors(scale: float) -> list[float]:
    # Long-RoPE divides each rotary frequency by its factor; the real factors
    # grow from ~1 for the fast frequencies to large ones for the slow ones.
    n = ROTARY_DIM // 2
    return [round(1.0 + scale * i / (n - 1), 4) for i in range(n)]


def build_config(tokenizer):
    from transformers import Phi4MultimodalConfig

    def tid(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    eot, end = tid(ENDOFTEXT), tid(END)
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        crop_size=IMAGE_SIZE,
        image_token_id=tid(IMAGE),
        feature_layer=-2,
    )
    audio_config = dict(
        hidden_size=16,
        intermediate_size=32,
        num_blocks=1,
        num_attention_heads=2,
        ext_pw_out_channel=16,
        depthwise_separable_out_channel=16,
        nemo_conv_channels=8,
        bias_max_distance=64,
        audio_token_id=tid(AUDIO),
    )
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=ORIGINAL_MAX_POSITIONS,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": PARTIAL_ROTARY_FACTOR,
            "short_factor": _rope_factors(0.25),
            "long_factor": _rope_factors(40.0),
        },
        bos_token_id=eot,
        eos_token_id=[eot, end],
        pad_token_id=eot,
        tie_word_embeddings=True,
        vision_config=vision_config,
        audio_config=audio_config,
        dtype="float32",
    )


def _randomise_image_separators(model, generator: torch.Generator) -> None:
    # transformers initialises the learned separators (the row-end "sub" and the
    # global/HD boundary "global" extensors) to zeros; a trained checkpoint never
    # has that, and zeros would hide a mix-up of separators and patch features.
    image_embed = model.model.embed_tokens_extend.image_embed
    with torch.no_grad():
        for p in (image_embed.sub_img_feature_extensor, image_embed.global_img_feature_extensor):
            p.copy_(torch.randn(p.shape, generator=generator))


def _write_vision_lora(model, out_dir: Path, generator: torch.Generator) -> None:
    """A peft LoRA on the decoder, non-zero (peft starts B at zero, a no-op), saved as the real one."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,  # alpha = 2r, as the real vision LoRA (r 256, alpha 512)
        lora_dropout=0.0,
        target_modules=LORA_TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config, adapter_name="default")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(out_dir / VISION_LORA_SUBFOLDER)


def build(out_dir: Path, seed: int = 0, vision_lora: bool = True) -> Path:
    """Build the tiny Phi-4-multimodal checkpoint into ``out_dir`` (replaced if present).

    With ``vision_lora`` (the default, as the real checkpoint) a random LoRA adapter is written to
    ``out_dir/vision-lora``; the base weights are the same either way.
    """
    from transformers import Phi4MultimodalForCausalLM

    processor = build_processor()
    config = build_config(processor.tokenizer)
    model = seeded_model(Phi4MultimodalForCausalLM, config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    _randomise_image_separators(model, generator)
    # As the real generation_config.json: stop on <|endoftext|> or <|end|>.
    model.generation_config = generation_config(config.bos_token_id, config.pad_token_id, config.eos_token_id)
    # the LoRA last: peft injects its layers into the model
    write_lora = (lambda folder: _write_vision_lora(model, folder, generator)) if vision_lora else None
    return save_checkpoint(model, processor, out_dir, extra=write_lora)
