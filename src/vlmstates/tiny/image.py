"""Image normalisation constants that several tiny checkpoints' image processors share, as their real
preprocessor_config.json files have them."""

from __future__ import annotations

#: OpenAI CLIP's (LLaVA, Mllama, Pixtral/Mistral 3)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: SigLIP's: every channel mapped from [0, 1] to [-1, 1]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
