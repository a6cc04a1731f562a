"""FastVLM's one quirk beyond the common layout (tests/test_family_contract.py checks the rest): its vision
tower, timm's FastViTHD behind TimmWrapperModel, accepts no attention implementation but sdpa/eager, so a
decoder implementation it lacks (flash_attention_2, which the engine picks on CUDA) must not reach it."""

from __future__ import annotations

import pytest

from vlmstates.engine import load_model
from vlmstates.settings import ModelSettings


def test_the_tower_keeps_sdpa_whatever_the_decoders_attention(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText

    checkpoint = tiny_checkpoint("fast_vlm")
    # flex_attention stands in for flash_attention_2 on CPU: Qwen2 runs it, TimmWrapperModel refuses it
    with pytest.raises(ValueError, match="TimmWrapperModel does not support"):
        AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="flex_attention")
    settings = ModelSettings.from_config("fast_vlm", {
        "model": str(checkpoint), "device": "cpu", "dtype": "float32", "attn_implementation": "flex_attention",
    })
    loaded = load_model(settings)
    config = loaded.model.config
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == ("flex_attention", "sdpa")
    assert loaded.attn_implementation == "flex_attention"  # what the file records: the decoder's
