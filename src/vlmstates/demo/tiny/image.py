"""What several tiny checkpoints' image sides share: the normalisation constants of their image processors (as
the real preprocessor_config.json files have them) and the tiny SigLIP tower."""

from __future__ import annotations

#: OpenAI CLIP's (LLaVA, Mllama, Pixtral/Mistral 3)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: SigLIP's: every channel mapped from [0, 1] to [-1, 1]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]


def siglip_vision_config(image_size: int, patch_size: int, **settings) -> dict:
    """The tiny SigLIP tower's vision_config: 2 layers of width 32, 2 heads, no pooling head, fp32; ``settings``
    add a family's fields."""
    return dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
        dtype="float32",
        **settings,
    )
