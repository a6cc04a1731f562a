"""Phi-4-multimodal through transformers' native ``Phi4MultimodalForCausalLM``.

What differs from the base adapter:

* Loading. The hub's main branch of microsoft/Phi-4-multimodal-instruct is in remote-code format
  (model_type "phi4mm"); the native class needs revision ``refs/pr/70``, used when the config gives
  no revision for a hub id. The vision LoRA in ``vision-lora/`` is loaded with peft and activated
  (option ``vision_lora: false`` leaves it out). Option ``merge_vision_lora: true`` then folds it into the
  decoder's weights with peft's layer merge and removes the LoRA layers: each projection runs one matmul
  instead of three, at the cost of rounding W + s*B@A to the model's dtype once (vectors change within
  rounding; default false, which keeps the numbers of the unmerged LoRA). The model is a causal LM, not an image-text-to-text
  class, so it is loaded through its own class.
* The vision tower's attention is made bidirectional. transformers 5.23 marks
  ``Phi4MultimodalVisionAttention`` as causal; eager attention ignores that flag, but SDPA applies it
  whenever the batch has no padded patch (its mask is then None) and flash attention always does.
  With SDPA a crop's features thus depended on the other images of the batch (relative changes of
  the tower's features up to ~0.8 on the tiny checkpoint). The SigLIP encoder was trained
  bidirectional, which is what eager attention computes; ``is_causal = False`` gives that with
  every kernel.
* transformers' output-capturing hooks are installed at load: otherwise a forward with
  ``output_hidden_states=True`` after any image forward fails in 5.23 (the vision tower's hooks
  end up installed twice; see ``install_output_capturing_hooks``).
* The prompt. transformers 5.23's ``Phi4MultimodalProcessor`` does not take ``chat_template`` in its
  constructor, so a saved processor chat template is dropped on loading; the tokenizer's template is
  used instead, with the user turn as a string, ``<|image|>`` then the text (the documented format
  ``<|user|><|image|>question<|end|><|assistant|>``).
* The vision-only vector. The image embedding runs its projection MLP (``img_projection_up`` ->
  GELU -> ``img_projection_down``) once per image, on [1, N_i, Dv]: the HD crops' pooled patch
  features cropped to the image's useful area, each row ended by the learned "sub" separator, then
  the "global" separator, then the 16x16 global-image features with their row separators; N_i is
  the image's number of ``<|image|>`` tokens. No single module sees the whole batch, so the adapter
  hooks ``img_projection_up`` and hands the list of per-image inputs to a small tap module, called
  once per image-embedding forward; the tap is the engine's projector, and each sample's vector is
  the mean of its image's rows.
* Batches hold only images of equal HD-crop counts (computed from the image processor's own
  settings and tiling rule, without running it). The decoder's long-RoPE picks its short or long
  factors for the whole batch from its longest row, so an image of many crops (the real model
  switches at 4096 positions, about 15 crops) changes the vectors of the shorter prompts beside it.
  Equal crop counts keep a batch's prompt lengths close, but do not guarantee that they fall on the
  same side of the switch (the useful area of the last crops, and the question, vary).
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import ClassVar

import torch

from vlmstates.extraction.adapters.base import Adapter, Batch, LoadedModel
from vlmstates.extraction.attention import from_pretrained_argument
from vlmstates.extraction.pooling import mean_of_rows
from vlmstates.settings import ConfigError, ModelSettings, read_checkpoint_config

VISION_LORA_SUBFOLDER = "vision-lora"
VISION_ADAPTER_NAME = "vision"
KNOWN_OPTIONS = {"vision_lora", "merge_vision_lora"}


class ProjectionInputs(torch.nn.Module):
    """Called once per image-embedding forward with the per-image inputs of the projection MLP.

    Does nothing itself: the engine's capture hook reads its argument (a list of [1, N_i, Dv]).
    """

    def forward(self, per_image_inputs: list[torch.Tensor]) -> None:
        return None


# image embedding -> its tap; weak, so the tap goes with the model
_TAPS: weakref.WeakKeyDictionary[torch.nn.Module, ProjectionInputs] = weakref.WeakKeyDictionary()


def install_projection_tap(image_embed: torch.nn.Module) -> ProjectionInputs:
    """Hook the image embedding so that its tap receives all images' projection inputs (idempotent)."""
    tap = _TAPS.get(image_embed)
    if tap is not None:
        return tap
    tap = ProjectionInputs()
    pending: list[torch.Tensor] = []

    def collect(module, args):
        pending.append(args[0])

    def start(module, args, kwargs):
        pending.clear()

    def finish(module, args, kwargs, output):
        inputs = list(pending)
        pending.clear()
        tap(inputs)

    image_embed.img_projection_up.register_forward_pre_hook(collect)
    image_embed.register_forward_pre_hook(start, with_kwargs=True)
    image_embed.register_forward_hook(finish, with_kwargs=True)
    _TAPS[image_embed] = tap
    return tap


def crop_grid(image_processor, width: int, height: int) -> tuple[int, int]:
    """(columns, rows) of HD crops that Phi4MultimodalImageProcessor cuts a width x height image into.

    Its rule: ceil(width/crop) x ceil(height/crop) tiles of crop = size["height"] pixels, unless that
    exceeds ``dynamic_hd``; then the tiling among those of at most ``dynamic_hd`` tiles whose aspect
    ratio is closest (ties broken by the processor's own ``find_closest_aspect_ratio``).
    """
    size = image_processor.size
    crop = int(size["height"] if isinstance(size, dict) else size.height)
    max_num = int(image_processor.dynamic_hd)
    columns, rows = math.ceil(width / crop), math.ceil(height / crop)
    if columns * rows <= max_num:
        return columns, rows
    # The same candidate list, built the same way, as the processor's dynamic_preprocess (min_num=1),
    # so that equal distances are resolved in the same order.
    target_ratios = {
        (i, j)
        for n in range(1, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= 1
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best = image_processor.find_closest_aspect_ratio(width / height, target_ratios, width, height, crop)
    return int(best[0]), int(best[1])


def is_local_checkpoint(model: str) -> bool:
    return Path(model).expanduser().is_dir()


class Phi4MultimodalAdapter(Adapter):
    family = "phi4_multimodal"
    semantics = (
        "VT: the last <|image|> placeholder; VF: the image projection MLP's input (the HD crops' pooled SigLIP "
        "features with their row separators, the global separator, the global image's features), mean over its rows"
    )
    #: The hub revision in the native transformers format (main is remote code, model_type "phi4mm").
    default_revision: ClassVar[str] = "refs/pr/70"

    # -- loading ---------------------------------------------------------------------------------
    def revision(self, settings: ModelSettings) -> str | None:
        """The configured revision; for a hub id without one, ``default_revision``."""
        if settings.revision is not None or is_local_checkpoint(settings.model):
            return settings.revision
        return self.default_revision

    def use_vision_lora(self, settings: ModelSettings) -> bool | None:
        """The ``vision_lora`` option: True/False, or None (default: load it where the checkpoint has one)."""
        unknown = sorted(set(settings.options) - KNOWN_OPTIONS)
        if unknown:
            raise ConfigError(
                f"models.{settings.name}.options: unknown key(s) {', '.join(unknown)} for the {self.family} family "
                f"(known: {', '.join(sorted(KNOWN_OPTIONS))})"
            )
        value = settings.options.get("vision_lora")
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"models.{settings.name}.options.vision_lora must be true or false, not {value!r}")
        return value

    def merge_vision_lora(self, settings: ModelSettings) -> bool:
        """The ``merge_vision_lora`` option (default false: the LoRA runs unmerged, beside the base weights)."""
        value = settings.options.get("merge_vision_lora", False)
        if not isinstance(value, bool):
            raise ConfigError(f"models.{settings.name}.options.merge_vision_lora must be true or false, not {value!r}")
        if value and self.use_vision_lora(settings) is False:
            raise ConfigError(
                f"models.{settings.name}.options: merge_vision_lora is true but vision_lora is false; "
                f"there is no LoRA to merge (drop one of them)"
            )
        return value

    def has_vision_lora(self, model: str, revision: str | None) -> bool:
        """Whether the checkpoint has a ``vision-lora/`` adapter (for a hub id: asks the hub or its cache)."""
        if is_local_checkpoint(model):
            return (Path(model).expanduser() / VISION_LORA_SUBFOLDER / "adapter_config.json").is_file()
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

        path = f"{VISION_LORA_SUBFOLDER}/adapter_config.json"
        try:
            hf_hub_download(model, path, revision=revision)
        except RemoteEntryNotFoundError:  # the hub says there is none
            return False
        except LocalEntryNotFoundError as error:  # offline and not cached: cannot tell, so do not guess
            raise ConfigError(
                f"{model} (revision {revision}): cannot tell whether it has {path}: {error}; "
                f"download it, or set options.vision_lora: false to load the model without it"
            ) from error
        return True

    def check_settings(self, settings: ModelSettings, revision: str | None) -> None:
        """The options, and a checkpoint in the native format."""
        self.merge_vision_lora(settings)
        model_type = read_checkpoint_config(settings.model, revision).get("model_type")
        if model_type != "phi4_multimodal":
            raise ConfigError(
                f"models.{settings.name}: {settings.model} (revision {revision}) has model_type {model_type!r}; "
                f"the native Phi4MultimodalForCausalLM needs a 'phi4_multimodal' checkpoint "
                f"(for microsoft/Phi-4-multimodal-instruct, revision {self.default_revision})"
            )

    def load_model(
        self,
        settings: ModelSettings,
        revision: str | None,
        dtype: torch.dtype,
        attention: dict[str, str],
        device: torch.device,
    ):
        """The causal LM class (no image-text-to-text class serves it), with the vision LoRA where it is used:
        load_adapter puts the LoRA's weights on the device of the base model (its hf_device_map), where the
        merge then runs."""
        from transformers import Phi4MultimodalForCausalLM

        want_lora = self.use_vision_lora(settings)
        use_lora = want_lora is not False and self.has_vision_lora(settings.model, revision)
        if want_lora and not use_lora:
            raise ConfigError(
                f"models.{settings.name}.options.vision_lora is true, but {settings.model} has no {VISION_LORA_SUBFOLDER}/"
            )
        merge = self.merge_vision_lora(settings)
        if merge and not use_lora:
            raise ConfigError(
                f"models.{settings.name}.options.merge_vision_lora is true, but {settings.model} has no "
                f"{VISION_LORA_SUBFOLDER}/ to merge"
            )
        model = Phi4MultimodalForCausalLM.from_pretrained(
            settings.model,
            revision=revision,
            trust_remote_code=settings.trust_remote_code,
            dtype=dtype,
            attn_implementation=from_pretrained_argument(self.family, attention),
            device_map=device,
        )
        if use_lora:
            model.load_adapter(
                settings.model,
                adapter_name=VISION_ADAPTER_NAME,
                adapter_kwargs={"subfolder": VISION_LORA_SUBFOLDER, "revision": revision},
            )
            model.set_adapter(VISION_ADAPTER_NAME)
            if merge:
                merge_and_unload_vision_lora(model)
        return model

    def prepare_model(self, model: torch.nn.Module) -> None:
        make_vision_attention_bidirectional(model)
        install_output_capturing_hooks(model)

    # -- batches ---------------------------------------------------------------------------------
    def chat_prompt(self, loaded: LoadedModel, text: str) -> str:
        processor = loaded.processor
        messages = [{"role": "user", "content": processor.image_token + text}]
        return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def batch_group(self, loaded: LoadedModel, width: int, height: int) -> int:
        """The image's number of HD crops (the global image not counted)."""
        columns, rows = crop_grid(loaded.processor.image_processor, width, height)
        return columns * rows

    # -- positions and modules -------------------------------------------------------------------
    def image_token_id(self, model: torch.nn.Module) -> int:
        return int(model.config.vision_config.image_token_id)

    def decoder_blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.model.layers

    def projector(self, model: torch.nn.Module) -> torch.nn.Module:
        return install_projection_tap(model.model.embed_tokens_extend.image_embed)

    def pool_projector_input(self, projector_input: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean over each image's rows of the projection MLP's input: [B, Dv] (one image per sample)."""
        rows = batch.input_ids.shape[0]
        if len(projector_input) != rows:
            raise RuntimeError(f"the image projection ran on {len(projector_input)} images for a batch of {rows}")
        return torch.stack([mean_of_rows(x) for x in projector_input])

    # -- benchmark and tests only ------------------------------------------------------------------
    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.norm

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.embed_tokens_extend.image_embed.img_processor

    def vision_features(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        pixels = inputs["image_pixel_values"].flatten(0, 1).to(model.dtype)
        mask = inputs["image_attention_mask"].flatten(0, 1).bool()
        return model.model.embed_tokens_extend.image_embed.get_img_features(pixels, attention_mask=mask)


def merge_and_unload_vision_lora(model: torch.nn.Module) -> int:
    """Fold the vision LoRA into the weights of the layers it adapts and put those base layers back in place
    of peft's LoRA layers, as peft's ``merge_and_unload`` does for a PeftModel (the adapter was loaded
    through transformers, which offers no merge): the model is then a plain one. Returns the number of
    layers merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        layer.merge(safe_merge=True, adapter_names=[VISION_ADAPTER_NAME])  # safe: refuses weights gone NaN
        setattr(parent, child, layer.get_base_layer())
    # as peft's unload does: no adapter is left to configure
    del model.peft_config
    model._hf_peft_config_loaded = False
    return len(names)


def install_output_capturing_hooks(model: torch.nn.Module) -> None:
    """Install transformers' hidden-state capturing hooks of the whole model now, before any forward.

    transformers 5.23 installs them lazily, per PreTrainedModel, at the first call that asks for an
    output; the image embedding always asks its vision tower for one layer
    (``output_hidden_states=feature_layer``), so the tower gets its hooks at the first image forward.
    A later ``output_hidden_states=True`` on the decoder installs the hooks of every submodel, the
    tower's again: each tower layer is then recorded twice, the selected layer comes out None and the
    forward fails. (Inactive hooks cost nothing; they only record while an output is requested.)
    """
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    maybe_install_capturing_hooks(model.model)


def make_vision_attention_bidirectional(model: torch.nn.Module) -> None:
    """Mark the vision tower's self-attention modules non-causal (see the module docstring)."""
    tower = model.model.embed_tokens_extend.image_embed.img_processor
    for layer in tower.encoder.layers:
        layer.self_attn.is_causal = False
