"""Tiny random Qwen2-VL checkpoint (``Qwen2VLForConditionalGeneration``).

As ``Qwen/Qwen2-VL-7B-Instruct``: the Qwen2.5-VL layout's predecessor, with the same tokenizer special tokens,
chat template, ``Qwen2VLImageProcessor`` (14-px patches, 2x2 merge, temporal patch 2) and mrope decoder; its
ViT has full attention in every block (no windows) and LayerNorm, its width is ``vision_config.embed_dim``
(real 1280; ``vision_config.hidden_size`` is the decoder's width the merger projects to). Only the sizes are
small; the processor and text settings are the tiny Qwen2.5-VL's (vlmstates.demo.tiny.qwen2_5_vl).
"""

from __future__ import annotations

from pathlib import Path

from vlmstates.demo.tiny import qwen2_5_vl as qwen

#: Qwen/Qwen2-VL-7B-Instruct's generation_config.json besides the token ids (as Qwen2.5-VL's)
REAL_GENERATION_SETTINGS = qwen.REAL_GENERATION_SETTINGS


def build(out_dir: Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    base = qwen.build_processor()
    processor = Qwen2VLProcessor(
        image_processor=base.image_processor,
        tokenizer=base.tokenizer,
        video_processor=base.video_processor,
        chat_template=qwen.CHAT_TEMPLATE,
    )
    reference = qwen.build_config(processor.tokenizer)
    text = reference.text_config.to_dict()
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=qwen.TEXT_HIDDEN,
        mlp_ratio=2,
        num_heads=2,
        hidden_act="quick_gelu",
        in_channels=3,
        patch_size=qwen.PATCH_SIZE,
        spatial_merge_size=qwen.MERGE_SIZE,
        temporal_patch_size=qwen.TEMPORAL_PATCH_SIZE,
        dtype="float32",
    )
    ids = {
        name: getattr(reference, name)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
        dtype="float32",
        **ids,
    )
    return qwen.save_qwen_vl_checkpoint(
        Qwen2VLForConditionalGeneration, config, processor, REAL_GENERATION_SETTINGS, out_dir, seed
    )
