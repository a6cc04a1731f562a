"""Molmo (allenai/Molmo-7B-O-0924, allenai/MolmoE-1B-0924): remote code only, one sample per batch.

There is no native transformers class: the checkpoint's own code is loaded with trust_remote_code, which
the model's config entry must opt into. That code has its own interface, used here as it is:

* `processor.process(images=[image], text=prompt)` builds Molmo's own prompt ("User: ... Assistant:")
  around the image tokens and returns one sample's `input_ids`, `images` [crops, patches, pixels],
  `image_masks` and `image_input_idx` [crops, tokens] (where the image patch tokens sit in `input_ids`,
  -1 for unused pooled patches);
* answers come from `model.generate_from_batch(batch, GenerationConfig(...), tokenizer=...)`;
* decoder blocks `model.model.transformer.blocks` (each returns `(hidden, cache)`), final norm
  `model.model.transformer.ln_f`, projector `model.model.vision_backbone.image_projector`, whose input is
  [B, crops, tokens per crop, D].

Positions come from `image_input_idx` (the vision token is the last image patch token, its largest
entry), never from a token id.

Batch size 1: `generate_from_batch` marks padding with -1 in `input_ids` and, with no attention mask
given, takes each row's first answer token from the logits at column `valid tokens - 1`, i.e. it assumes
right padding. On a left-padded batch the prefill's hidden states are right (positions and mask come from
the -1s), but every padded row would get its first answer token from the wrong column; an explicit
attention mask bypasses that position and last-logit handling altogether (its width must be prompt plus
max_new_tokens). So no left-padded batch can be made exact through this interface, and the adapter runs
one sample at a time (`max_batch_size = 1`; a larger batch is refused in build_batch, which the engine's
split-on-failure turns into single samples, and `batch_size` is lowered to 1 at load).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..positions import Positions, positions_in_left_padded_batch
from ..settings import ConfigError
from .base import Adapter, Batch, LoadedModel, recorded_generation

log = logging.getLogger(__name__)

STOP_STRING = "<|endoftext|>"
IMAGE_PATCH_TOKEN = "<im_patch>"
REAL_CODE_TRANSFORMERS = "4.48.3"


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def left_pad_collate(samples: list[dict], dtype: torch.dtype, device: torch.device) -> Batch:
    """Stack `processor.process` outputs: input_ids left-padded with -1 (Molmo's padding value),
    images/image_masks padded with -1 crops, image_input_idx padded with -1 and shifted by each row's
    left padding so that it indexes the padded row."""
    if not samples:
        raise ValueError("no samples")
    tokens_per_crop = {int(s["image_input_idx"].shape[-1]) for s in samples}
    patch_shape = {tuple(s["images"].shape[1:]) for s in samples}
    if len(tokens_per_crop) != 1 or len(patch_shape) != 1:
        raise ValueError(f"samples differ in tokens per crop {tokens_per_crop} or crop layout {patch_shape}")
    rows = len(samples)
    length = max(int(s["input_ids"].shape[-1]) for s in samples)
    crops = max(int(s["images"].shape[0]) for s in samples)
    first = samples[0]
    input_ids = torch.full((rows, length), -1, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    images = torch.full((rows, crops, *first["images"].shape[1:]), -1.0, dtype=first["images"].dtype)
    image_masks = torch.full((rows, crops, *first["image_masks"].shape[1:]), -1.0, dtype=first["image_masks"].dtype)
    image_input_idx = torch.full((rows, crops, first["image_input_idx"].shape[-1]), -1, dtype=first["image_input_idx"].dtype)
    for row, sample in enumerate(samples):
        ids = torch.as_tensor(sample["input_ids"]).reshape(-1)
        pad = length - ids.shape[0]
        n = sample["images"].shape[0]
        input_ids[row, pad:] = ids
        attention_mask[row, pad:] = 1
        images[row, :n] = sample["images"]
        image_masks[row, :n] = sample["image_masks"]
        idx = torch.as_tensor(sample["image_input_idx"])
        image_input_idx[row, :n] = torch.where(idx >= 0, idx + pad, idx.new_full((), -1))
    inputs = {
        "input_ids": input_ids.to(device),
        "images": images.to(device=device, dtype=dtype),
        "image_masks": image_masks.to(device),
        "image_input_idx": image_input_idx.to(device),
    }
    return Batch(inputs=inputs, input_ids=inputs["input_ids"], attention_mask=attention_mask.to(device))


class MolmoAdapter(Adapter):
    family = "molmo"
    #: Largest batch this family can run exactly (see the module docstring).
    max_batch_size = 1

    def __init__(self) -> None:
        self._patch_token_id = -1

    # -- loading ---------------------------------------------------------------------------------
    def load(self, settings, device, dtype, attn) -> LoadedModel:
        key = f"models.{settings.name}"
        if not settings.trust_remote_code:
            raise ConfigError(
                f"{key}.trust_remote_code must be true: {settings.model} is a Molmo checkpoint, which exists "
                f"only as code shipped with the checkpoint (no transformers class); set "
                f"{key}.trust_remote_code: true (and pin {key}.revision) to run that code"
            )
        if settings.attn_implementation != "auto":
            raise ConfigError(
                f"{key}.attn_implementation: Molmo's remote code chooses its own attention; leave it at auto"
            )
        from transformers import AutoModelForCausalLM, AutoProcessor

        version = _transformers_version()
        common = dict(revision=settings.revision, trust_remote_code=True)
        dtype_key = "dtype" if version >= (5, 0) else "torch_dtype"
        processor = AutoProcessor.from_pretrained(settings.model, **common)
        try:
            model = AutoModelForCausalLM.from_pretrained(settings.model, **{dtype_key: dtype}, **common)
        except Exception as error:
            if version >= (4, 49):
                raise RuntimeError(
                    f"{key}: loading {settings.model} failed under transformers {'.'.join(map(str, version))}; "
                    f"Molmo's remote code runs unchanged with transformers<={REAL_CODE_TRANSFORMERS} "
                    f"(envs/molmo.yaml): {type(error).__name__}: {error}"
                ) from error
            raise
        if (4, 49) <= version < (5, 0):
            # From 4.49 generation turns a model's cache into a DynamicCache unless the class says it
            # does not support one; Molmo's code passes its own tuples. (Not exercised by the tests.)
            type(model)._supports_default_dynamic_cache = classmethod(lambda cls: False)
        model.to(device).eval()
        ids = processor.tokenizer.encode(IMAGE_PATCH_TOKEN, add_special_tokens=False)
        self._patch_token_id = int(ids[0]) if len(ids) == 1 else -1
        if settings.batch_size != self.max_batch_size:
            log.warning(
                "%s.batch_size is %d; Molmo runs one sample per batch (left-padded batches are not exact "
                "through generate_from_batch)", key, settings.batch_size,
            )
            settings = replace(settings, batch_size=self.max_batch_size)
        return LoadedModel(model, processor, self, settings, device, dtype, "remote_code")

    # -- batches ---------------------------------------------------------------------------------
    def build_batch(self, loaded: LoadedModel, texts, images) -> Batch:
        if len(texts) > self.max_batch_size:
            raise ValueError(
                f"Molmo runs one sample per batch, got {len(texts)}: generate_from_batch takes the first "
                "answer token of a left-padded row from the wrong column"
            )
        samples = [loaded.processor.process(images=[image], text=text) for text, image in zip(texts, images)]
        return left_pad_collate(samples, loaded.dtype, loaded.device)

    # -- positions and modules -------------------------------------------------------------------
    def find_positions(self, loaded: LoadedModel, batch: Batch) -> Positions:
        """Vision token: the last image patch token (largest image_input_idx); query: last prompt token."""
        rows = batch.attention_mask.shape[0]
        index = batch.inputs["image_input_idx"].cpu().reshape(rows, -1).long()
        vision_padded = index.max(dim=1).values
        if (vision_padded < 0).any():
            bad = (vision_padded < 0).nonzero().flatten().tolist()
            raise ValueError(f"no image patch token (image_input_idx all -1) in batch row(s) {bad}")
        return positions_in_left_padded_batch(vision_padded, batch.attention_mask, (index >= 0).sum(dim=1))

    def image_token_id(self, model) -> int:
        """The `<im_patch>` id (recorded only; positions come from image_input_idx), -1 if unknown."""
        return self._patch_token_id

    def decoder_blocks(self, model):
        return model.model.transformer.blocks

    def final_norm(self, model):
        return model.model.transformer.ln_f

    def projector(self, model):
        return model.model.vision_backbone.image_projector

    def pool_projector_input(self, projector_input: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean over the pooled image tokens that enter the prompt (image_input_idx >= 0) of each sample.

        The projector sees [B, crops, tokens per crop, D] (padded crops and unused tokens included); the
        layout is checked against image_input_idx [B, crops, tokens per crop]."""
        index = batch.inputs["image_input_idx"]
        rows = index.shape[0]
        valid = (index.reshape(rows, -1) >= 0).to(projector_input.device)
        features = projector_input.float().reshape(rows, -1, projector_input.shape[-1])
        if features.shape[1] != valid.shape[1]:
            raise RuntimeError(
                f"the projector input has {features.shape[1]} tokens per sample, image_input_idx "
                f"{valid.shape[1]}: its layout is not [B, crops, tokens, D]"
            )
        weights = valid.unsqueeze(-1).float()
        return (features * weights).sum(dim=1) / weights.sum(dim=1)

    def hidden_size(self, model) -> int:
        config = model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def vision_hidden_size(self, model) -> int:
        """`vision_backbone.image_emb_dim` where the config has it (MolmoE); 7B-O fixes its vision
        settings in code, so there the projector's input width is read off its first linear layer."""
        backbone = getattr(model.config, "vision_backbone", None)
        width = backbone.get("image_emb_dim") if isinstance(backbone, dict) else getattr(backbone, "image_emb_dim", None)
        if width:
            return int(width)
        for module in self.projector(model).modules():
            if isinstance(module, torch.nn.Linear):
                return int(module.in_features)
        raise RuntimeError("cannot tell the width of Molmo's projector input")

    def max_prompt_tokens(self, model) -> int | None:
        config = model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)

    # -- generation ------------------------------------------------------------------------------
    def answer_generation_config(self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0):
        """What generate_from_batch is given: the config's `generation` fields, then the engine's (greedy,
        Molmo's stop string, the length limits)."""
        from transformers import GenerationConfig

        config = GenerationConfig(**loaded.settings.generation)
        config.update(max_new_tokens=max_new_tokens, stop_strings=STOP_STRING, do_sample=False, use_cache=True)
        if min_new_tokens:
            config.update(min_new_tokens=min_new_tokens)
        return config

    def effective_generation(self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0) -> dict:
        """The config handed to the remote code's generate_from_batch, as recorded (what that code and
        its transformers then fill in is theirs)."""
        return recorded_generation(self.answer_generation_config(loaded, max_new_tokens, min_new_tokens))

    def generate(self, loaded: LoadedModel, batch: Batch, max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
        if batch.input_ids.shape[0] > self.max_batch_size:
            raise ValueError("Molmo runs one sample per batch (see vlmstates.adapters.molmo)")
        tokenizer = loaded.processor.tokenizer
        config = self.answer_generation_config(loaded, max_new_tokens, min_new_tokens)
        sequences = loaded.model.generate_from_batch(batch.inputs, config, tokenizer=tokenizer)
        new_tokens = sequences[:, batch.input_ids.shape[1] :]
        return [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
