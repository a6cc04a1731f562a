"""The families whose vision tower is a timm model behind TimmWrapperModel (FastVLM's FastViTHD, Gemma 3n's
MobileNetV5; tests/test_family_contract.py checks the rest): the tower accepts no attention implementation
but sdpa/eager, so a decoder implementation it lacks (flash_attention_2, which `auto` picks on CUDA) must
not reach it (vlmstates.extraction.attention)."""

from __future__ import annotations

import pytest

from vlmstates.extraction.engine import load_model
from vlmstates.settings import ConfigError, ModelSettings


@pytest.mark.parametrize("family", ["fast_vlm", "gemma3n"])
def test_the_tower_keeps_sdpa_whatever_the_decoders_attention(family, tiny_checkpoint):
    from transformers import AutoModelForImageTextToText

    checkpoint = tiny_checkpoint(family)
    # flex_attention stands in for flash_attention_2 on CPU: the decoder runs it, TimmWrapperModel refuses it
    with pytest.raises(ValueError, match="TimmWrapperModel does not support"):
        AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="flex_attention")

    def settings(attn_implementation):
        entry = {"model": str(checkpoint), "device": "cpu", "dtype": "float32"}
        return ModelSettings.from_config(family, entry | {"attn_implementation": attn_implementation})

    # one implementation for both sub-models names the tower, which refuses it, and the fix
    with pytest.raises(
        ConfigError, match=r"vision model of the .* family: .*timm.*\{text: flex_attention, vision: auto\}"
    ):
        load_model(settings("flex_attention"))
    loaded = load_model(settings({"text": "flex_attention", "vision": "auto"}))
    config = loaded.model.config
    assert (config.text_config._attn_implementation, config.vision_config._attn_implementation) == (
        "flex_attention",
        "sdpa",
    )
    assert loaded.attn_implementation == "flex_attention"  # what the file records: the decoder's
