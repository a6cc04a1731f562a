"""Tiny random Qwen3-VL checkpoint (``Qwen3VLForConditionalGeneration``).

As ``Qwen/Qwen3-VL-8B-Instruct``: a ViT with 16-pixel patches, 2x2 spatial merge and temporal patch 2, a learned
position grid resampled to each image's grid, full attention in every block; its main ``merger`` (LayerNorm then
an MLP over each 2x2 group of patches) projects the last block's output into a Qwen3 decoder with interleaved
multimodal RoPE. DeepStack: ``deepstack_visual_indexes`` name vision blocks whose outputs go through their own
mergers (``deepstack_merger_list``) and are added, at the image positions, to the decoder's hidden states after
decoder blocks 0, 1, 2 (one per index), outside the blocks. The ``Qwen2VLImageProcessor`` resizes each image to
multiples of 32 pixels inside a pixel budget, so the number of image tokens depends on the image size; the chat
template writes no default system turn (unlike Qwen2.5-VL's) and places each image as
``<|vision_start|><|image_pad|><|vision_end|>`` where the message puts it. Only the sizes are small:

* vision depth 4 with deepstack indexes [0, 1, 2] (real: 27 blocks, [8, 16, 24]: intermediate blocks, the last
  one not among them), 3 injections, into a decoder of 4 blocks (real 36);
* mrope_section [4, 2, 2] of head_dim/2 = 8 frequencies, interleaved (real [24, 20, 20] of 64: time the largest,
  height = width);
* a learned position grid of 8x8 (real 48x48, ``num_position_embeddings`` 2304).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import qwen2_5_vl
from vlmstates.demo.tiny.qwen2_5_vl import (
    IM_END,
    IMAGE_PAD,
    PAD_TOKEN,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    qwen_vl_chat_template,
    qwen_vl_tokenizer,
    save_qwen_vl_checkpoint,
)
from vlmstates.demo.tiny.text import TEXT_HIDDEN, decoder_config

FAMILY = "qwen3_vl"

# Special tokens of the real Qwen3-VL tokenizer: Qwen2.5-VL's, in their real relative order (they follow the BPE
# vocabulary there too), then <think>/</think>, in the real vocabulary (the Thinking variants emit them).
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = (*qwen2_5_vl.SPECIAL_TOKENS, THINK, END_THINK)

# Vision geometry: real values (patch 16, merge 2, temporal patch 2 -> resize factor 32).
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
# Pixel budget: between 4 and 24 image tokens per image (real: 64 to 16384 tokens, preprocessor_config.json's
# size {"shortest_edge": 65536, "longest_edge": 16777216} pixels). E.g. 96x64 -> 6 tokens, 64x128 -> 8 tokens.
MIN_PIXELS = 4 * FACTOR * FACTOR
MAX_PIXELS = 24 * FACTOR * FACTOR
#: real preprocessor_config.json: mean and std 0.5 (not CLIP's)
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]

#: Qwen/Qwen3-VL-8B-Instruct's generation_config.json besides the token ids (the model card's recommended
#: sampling: top_p 0.8, top_k 20, temperature 0.7, repetition_penalty 1.0).
REAL_GENERATION_SETTINGS = {"do_sample": True, "top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.0}

TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 16
MROPE_SECTION = [4, 2, 2]
assert sum(MROPE_SECTION) == HEAD_DIM // 2
VISION_DEPTH = 4
DEEPSTACK_VISUAL_INDEXES = [0, 1, 2]

# Modelled on the real Qwen3-VL Instruct chat template: Qwen2.5-VL's without its default system turn.
CHAT_TEMPLATE = qwen_vl_chat_template(default_system_prompt=None)


def build_processor():
    """The ``Qwen3VLProcessor`` (tokenizer, Qwen2-VL image processor, Qwen3-VL video processor)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = qwen_vl_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE)
    geometry = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, **geometry
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        **geometry,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pad_id, eos_id = ids[PAD_TOKEN], ids[IM_END]
    bos_id = pad_id  # the real text_config's bos_token_id is <|endoftext|> too
    text_config = decoder_config(
        len(tokenizer),
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": MROPE_SECTION,
            "mrope_interleaved": True,
        },
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    vision_config = dict(
        depth=VISION_DEPTH,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=TEXT_HIDDEN,
        num_position_embeddings=64,
        deepstack_visual_indexes=DEEPSTACK_VISUAL_INDEXES,
        dtype="float32",
    )
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Qwen3-VL checkpoint into ``out_dir`` (replaced if present)."""
    from transformers import Qwen3VLForConditionalGeneration

    processor = build_processor()
    config = build_config(processor.tokenizer)
    # Greedy extraction ignores the real sampling settings; their repetition_penalty 1.0 changes nothing.
    return save_qwen_vl_checkpoint(
        Qwen3VLForConditionalGeneration, config, processor, REAL_GENERATION_SETTINGS, out_dir, seed
    )


def build_moe(out_dir: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-VL-MoE checkpoint (``Qwen3VLMoeForConditionalGeneration``, model_type ``qwen3_vl_moe``, as
    ``Qwen/Qwen3-VL-30B-A3B-Instruct``): the same vision tower, DeepStack, processor and tokens as the dense one
    above, with a sparse MoE block in every decoder block (decoder_sparse_step 1, as the real one; 8 experts,
    2 per token, for the real 128 and 8). The family's entry serves it (qwen3_vl); it is no family of its own."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    processor = build_processor()
    dense = build_config(processor.tokenizer).to_dict()
    text = {k: v for k, v in dense["text_config"].items() if k not in ("model_type", "architectures")}
    text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=TEXT_HIDDEN // 2, decoder_sparse_step=1)
    vision = {k: v for k, v in dense["vision_config"].items() if k not in ("model_type", "architectures")}
    ids = {k: dense[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, dtype="float32", **ids)
    return save_qwen_vl_checkpoint(
        Qwen3VLMoeForConditionalGeneration, config, processor, REAL_GENERATION_SETTINGS, out_dir, seed
    )
