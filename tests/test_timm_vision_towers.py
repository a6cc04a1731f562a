"""The families whose vision tower is a timm model behind TimmWrapperModel (FastVLM's FastViTHD, Gemma 3n's
MobileNetV5; tests/test_family_contract.py checks the rest): the tower accepts no attention implementation
but sdpa/eager, so a decoder implementation it lacks (flash_attention_2, which the engine picks on CUDA) must
not reach it."""

from __future__ import annotations

import pytest

from vlmstates.extraction.engine import load_model
from vlmstates.settings import ModelSettings


@pytest.mark.parametrize("family", ["fast_vlm", "gemma3n"])
def test_the_tower_keeps_sdpa_whatever_the_decoders_attention(family, tiny_checkpoint):
    from transformers import AutoModelForImageTextToText

    checkpoint = tiny_checkpoint(family)
    # flex_attention stands in for flash_attention_2 on CPU: the decoder runs it, TimmWrapperModel refuses it
    with pytest.raises(ValueError, match="TimmWrapperModel does not support"):
        AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="flex_attention")
    settings = ModelSettings.from_config(
        family,
        {
            "model": str(checkpoint),
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": "flex_attention",
        },
    )
    loaded = load_model(settings)
    config = loaded.model.config
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == (
        "flex_attention",
        "sdpa",
    )
    assert loaded.attn_implementation == "flex_attention"  # what the file records: the decoder's
