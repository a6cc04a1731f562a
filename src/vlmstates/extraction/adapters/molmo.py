"""Molmo (allenai/Molmo-7B-O-0924, allenai/MolmoE-1B-0924): remote code only, batched exactly.

There is no native transformers class: the checkpoint's own code is loaded with trust_remote_code, which
the model's config entry must opt into. That code has its own interface, used here as it is:

* `processor.process(images=[image], text=prompt)` builds Molmo's own prompt ("User: ... Assistant:")
  around the image tokens and returns one sample's `input_ids`, `images` [crops, patches, pixels],
  `image_masks` and `image_input_idx` [crops, tokens] (where the image patch tokens sit in `input_ids`,
  negative for unused pooled patches: the real processor writes -100);
* decoder blocks `model.model.transformer.blocks` (each returns `(hidden, cache)`), final norm
  `model.model.transformer.ln_f`, projector `model.model.vision_backbone.image_projector`, whose input is
  [B, crops, tokens per crop, D]; the backbone returns a tuple and the token embedding has no `.weight`,
  so nothing here reads either.

Positions come from `image_input_idx` (the vision token is the last image patch token, its largest
entry), never from a token id.

Batches. The model card's `generate_from_batch` cannot run a left-padded batch exactly: with no attention
mask it takes each row's first answer token at column `valid tokens - 1` (right padding in mind), a mask
of width prompt + max_new_tokens makes it derive positions from that whole mask (the rotary embedding
fails), and `position_ids` cannot be passed (it passes its own); right padding fails in transformers'
StopStringCriteria, which looks up the -1 pad ids. `generate_from_batch` only wraps transformers'
`GenerationMixin.generate`, so the adapter calls that directly with what `generate_from_batch` would
build for an unpadded row: `input_ids` left-padded with -1, the attention mask `[valid | ones(max_new_tokens)]`
(the remote code keeps it at that width while it decodes), `position_ids = clamp(cumsum(valid) - 1, 0)`,
and the images, image masks and `image_input_idx` (shifted by each row's left padding, see
`left_pad_collate`). Tried against the real remote code (4 rows of 2-3 crops, fp32): answers identical to
batch 1, vectors within 5.7e-7. The real config has no eos token, so a row that has finished keeps
generating until every row has, and each answer is cut at its first `<|endoftext|>` (as batch 1 stops
there). For the same reason transformers ignores min_new_tokens; where one is asked for (benchmarks) the
stop token is given as eos, which is what makes transformers honour it.

Batch planning groups samples by crop count (`batch_group`): every crop of a padded batch, padding crops
included, runs through the vision tower. A generation setting whose logits processor reads the prompt's
ids (e.g. repetition_penalty) fails on the -1 pads of a padded batch; the engine then splits the batch
down to single samples, which are exact but slow.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image

from vlmstates.extraction.adapters.base import Adapter, Batch, LoadedModel, recorded_generation
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.extraction.pooling import masked_means
from vlmstates.extraction.positions import Positions, positions_in_left_padded_batch
from vlmstates.settings import ConfigError

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
    images/image_masks padded with -1 crops at the end, image_input_idx shifted by each row's left padding
    so that it indexes the padded row (unused entries, whatever negative value marks them, become -1).
    image_masks is copied as it comes: the real processor's is one crop off `images`, and the model reads
    it that way at batch 1 too."""
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
    image_input_idx = torch.full(
        (rows, crops, first["image_input_idx"].shape[-1]), -1, dtype=first["image_input_idx"].dtype
    )
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


def generation_inputs(batch: Batch, max_new_tokens: int) -> dict:
    """What `generate` gets besides input_ids: what generate_from_batch builds for an unpadded row, from
    each row's own valid tokens, so that a left-padded row runs as it would alone."""
    valid = batch.attention_mask.bool()
    inputs = batch.inputs
    return dict(
        attention_mask=torch.cat((valid, valid.new_ones(valid.shape[0], max_new_tokens)), dim=1),
        position_ids=torch.clamp(valid.long().cumsum(dim=-1) - 1, min=0),
        images=inputs["images"],
        image_masks=inputs["image_masks"],
        image_input_idx=inputs["image_input_idx"],
    )


def cut_at_stop_string(tokenizer, ids: list[int]) -> str:
    """A row's answer as batch 1 ends it: its tokens up to the first that completes the stop string (a
    finished row of a batch keeps generating), decoded without special tokens."""

    def stops(n: int) -> bool:
        return STOP_STRING in tokenizer.decode(ids[:n], skip_special_tokens=False)

    end = len(ids)
    if stops(end):  # the shortest prefix that holds it: a prefix's text grows with it, so bisect
        low = 1
        while low < end:
            middle = (low + end) // 2
            low, end = (low, middle) if stops(middle) else (middle + 1, end)
    return tokenizer.decode(ids[:end], skip_special_tokens=True).split(STOP_STRING, 1)[0].strip()


class MolmoAdapter(Adapter):
    family = "molmo"
    semantics = (
        "VT: the last image patch token (the largest image_input_idx; Molmo's patch tokens are <im_patch>); VF: the "
        "image projector's input (the pooled ViT features of every crop), mean over the pooled patches that enter the prompt"
    )
    no_static_cache = (
        "its remote code keeps its own key/value tuples and builds its own attention bias, not transformers' Cache "
        "classes, which a static cache needs"
    )

    def __init__(self) -> None:
        self._patch_token_id = -1
        self._layouts: dict[tuple[int, int], tuple[int, int]] = {}

    # -- loading ---------------------------------------------------------------------------------
    def check_settings(self, settings, revision) -> None:
        key = f"models.{settings.name}"
        if not settings.trust_remote_code:
            raise ConfigError(
                f"{key}.trust_remote_code must be true: {settings.model} is a Molmo checkpoint, which exists "
                f"only as code shipped with the checkpoint (no transformers class); set "
                f"{key}.trust_remote_code: true (and pin {key}.revision) to run that code"
            )

    def recorded_attention(self, attention) -> str:
        """What the file records: the remote code chooses its own attention."""
        return "remote_code"

    def load_processor(self, settings, revision):
        """The remote code's processor as it is (its `process` builds one sample; batches are collated here).
        The `<im_patch>` id is read from its tokenizer here, for image_token_id."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(settings.model, revision=revision, trust_remote_code=True)
        ids = processor.tokenizer.encode(IMAGE_PATCH_TOKEN, add_special_tokens=False)
        self._patch_token_id = int(ids[0]) if len(ids) == 1 else -1
        return processor

    def load_model(self, settings, revision, dtype, attention, device):
        """The remote code's model; transformers 4.48 takes `device_map` too (with accelerate, which
        envs/molmo.yaml pins), and the checkpoint's own usage loads it so."""
        from transformers import AutoModelForCausalLM

        version = _transformers_version()
        dtype_key = "dtype" if version >= (5, 0) else "torch_dtype"
        try:
            return AutoModelForCausalLM.from_pretrained(
                settings.model, revision=revision, trust_remote_code=True, device_map=device, **{dtype_key: dtype}
            )
        except Exception as error:
            if version >= (4, 49):
                raise RuntimeError(
                    f"models.{settings.name}: loading {settings.model} failed under transformers "
                    f"{'.'.join(map(str, version))}; Molmo's remote code runs unchanged with "
                    f"transformers<={REAL_CODE_TRANSFORMERS} (envs/molmo.yaml): {type(error).__name__}: {error}"
                ) from error
            raise

    def prepare_model(self, model) -> None:
        if (4, 49) <= _transformers_version() < (5, 0):
            # From 4.49 generation turns a model's cache into a DynamicCache unless the class says it
            # does not support one; Molmo's code passes its own tuples. (Not exercised by the tests.)
            type(model)._supports_default_dynamic_cache = classmethod(lambda cls: False)

    # -- batches ---------------------------------------------------------------------------------
    def build_batch(self, loaded: LoadedModel, texts, images) -> Batch:
        samples = [loaded.processor.process(images=[image], text=text) for text, image in zip(texts, images)]
        return left_pad_collate(samples, loaded.dtype, loaded.device)

    def _layout(self, loaded: LoadedModel, width: int, height: int) -> tuple[int, int]:
        """(crops, prompt tokens with an empty text) for an image of this size: the processor run once
        per size on a blank image, since only its own code knows its tiling."""
        key = (width, height)
        if key not in self._layouts:
            sample = loaded.processor.process(images=[Image.new("RGB", key)], text="")
            self._layouts[key] = (int(sample["images"].shape[0]), int(torch.as_tensor(sample["input_ids"]).numel()))
        return self._layouts[key]

    def batch_group(self, loaded: LoadedModel, width: int, height: int) -> object:
        """The crop count: a batch's rows are padded to its most crops, and padding crops run through the
        vision tower like real ones, so equal counts save that work (and batches stay exact either way)."""
        return self._layout(loaded, width, height)[0]

    def image_token_estimate(self, loaded: LoadedModel, width: int, height: int) -> int:
        """The prompt's image and template tokens (the question's are counted by the engine)."""
        return self._layout(loaded, width, height)[1]

    # -- positions and modules -------------------------------------------------------------------
    def find_positions(self, loaded: LoadedModel, batch: Batch) -> Positions:
        """Vision token: the last image patch token (largest image_input_idx); query: last prompt token."""
        rows = batch.attention_mask.shape[0]
        index = batch.inputs["image_input_idx"].cpu().reshape(rows, -1).long()
        vision_padded = index.max(dim=1).values
        if (vision_padded < 0).any():
            bad = (vision_padded < 0).nonzero().flatten().tolist()
            raise ValueError(f"no image patch token (image_input_idx all negative) in batch row(s) {bad}")
        return positions_in_left_padded_batch(vision_padded, batch.attention_mask, (index >= 0).sum(dim=1))

    def image_token_id(self, model) -> int:
        """The `<im_patch>` id (recorded only; positions come from image_input_idx), -1 if unknown."""
        return self._patch_token_id

    def decoder_blocks(self, model):
        return model.model.transformer.blocks

    def projector(self, model):
        return model.model.vision_backbone.image_projector

    def pool_projector_input(self, projector_input: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean over the pooled image tokens that enter the prompt (image_input_idx >= 0) of each sample.

        The projector sees [B, crops, tokens per crop, D] (padded crops and unused tokens included); the
        layout is checked against image_input_idx [B, crops, tokens per crop]."""
        index = batch.inputs["image_input_idx"]
        rows = index.shape[0]
        valid = (index.reshape(rows, -1) >= 0).to(projector_input.device)
        features = projector_input.reshape(rows, -1, projector_input.shape[-1])
        if features.shape[1] != valid.shape[1]:
            raise RuntimeError(
                f"the projector input has {features.shape[1]} tokens per sample, image_input_idx "
                f"{valid.shape[1]}: its layout is not [B, crops, tokens, D]"
            )
        return masked_means(features, valid)

    def hidden_size(self, model) -> int:
        config = model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    def vision_hidden_size(self, model) -> int:
        """`vision_backbone.image_emb_dim` where the config has it (MolmoE); 7B-O fixes its vision
        settings in code, so there the projector's input width is read off its first linear layer."""
        backbone = getattr(model.config, "vision_backbone", None)
        width = (
            backbone.get("image_emb_dim") if isinstance(backbone, dict) else getattr(backbone, "image_emb_dim", None)
        )
        if width:
            return int(width)
        for module in self.projector(model).modules():
            if isinstance(module, torch.nn.Linear):
                return int(module.in_features)
        raise RuntimeError("cannot tell the width of Molmo's projector input")

    def max_prompt_tokens(self, model) -> int | None:
        config = model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)

    # -- benchmark and tests only ------------------------------------------------------------------
    def final_norm(self, model):
        return model.model.transformer.ln_f

    def vision_tower(self, model):
        return model.model.vision_backbone.image_vit

    def vision_features(self, model, inputs: dict) -> torch.Tensor:
        """The vision backbone alone on one sample: the projector's input at the tokens that enter the
        prompt ([tokens, D]), what the vision-only vector averages."""
        seen = []
        with forward_hooks(before=[(self.projector(model), lambda module, args: seen.append(args[0]))]):
            model.model.vision_backbone(inputs["images"], inputs["image_masks"])
        features = seen[0]
        return features.reshape(-1, features.shape[-1])[inputs["image_input_idx"].reshape(-1) >= 0]

    # -- generation ------------------------------------------------------------------------------
    def _stop_token_id(self, loaded: LoadedModel) -> int | None:
        ids = loaded.processor.tokenizer.encode(STOP_STRING, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def answer_generation_config(
        self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ):
        """What generate() is given: the config's `generation` fields, then the engine's (greedy, Molmo's
        stop string, the length limits, the KV cache: none for prefill-only). The checkpoint names no eos
        token, and transformers applies min_new_tokens only against one: a minimum makes the stop token the
        eos (and the pad of rows that are done, which the answer's cut drops)."""
        from transformers import GenerationConfig

        config = GenerationConfig(**loaded.settings.generation)
        config.update(max_new_tokens=max_new_tokens, stop_strings=STOP_STRING, do_sample=False, use_cache=use_cache)
        if min_new_tokens:
            stop = self._stop_token_id(loaded)
            if stop is None:
                log.warning("%s is not one token: min_new_tokens cannot be enforced for Molmo", STOP_STRING)
            else:
                config.update(eos_token_id=stop, pad_token_id=stop)
            config.update(min_new_tokens=min_new_tokens)
        return config

    def effective_generation(
        self, loaded: LoadedModel, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ) -> dict:
        """The config handed to the remote code's generate, as recorded (what that code and its
        transformers then fill in is theirs)."""
        return recorded_generation(self.answer_generation_config(loaded, max_new_tokens, min_new_tokens, use_cache))

    def generate(
        self, loaded: LoadedModel, batch: Batch, max_new_tokens: int, min_new_tokens: int = 0, use_cache: bool = True
    ) -> list[str]:
        """One GenerationMixin.generate call for the whole batch (see the module docstring)."""
        tokenizer = loaded.processor.tokenizer
        config = self.answer_generation_config(loaded, max_new_tokens, min_new_tokens, use_cache)
        sequences = loaded.model.generate(
            batch.input_ids, config, tokenizer=tokenizer, **generation_inputs(batch, max_new_tokens)
        )
        new_tokens = sequences[:, batch.input_ids.shape[1] :].tolist()
        return [cut_at_stop_string(tokenizer, row) for row in new_tokens]
