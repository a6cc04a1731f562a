"""`EntryAdapter`: the adapter protocol served from a `FamilyEntry` (vlmstates.extraction.adapters.entries).

The members an entry answers are the base protocol's (vlmstates.extraction.adapters.base): module paths resolved with
`get_submodule`, the image token id read from the config attribute the entry names, and the pooling named by
the entry. A pooling splits the projector's input (one forward's, the whole batch's) into per-sample groups of
rows and takes each group's mean over all its patches; the group sizes come from the processor's outputs,
counted when the batch is built, so that no padding (tile, image) is ever averaged in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from vlmstates.extraction.adapters.base import Adapter, Batch, LoadedModel
from vlmstates.extraction.adapters.entries import ENTRIES, FamilyEntry
from vlmstates.extraction.attention import from_pretrained_argument
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.extraction.pooling import masked_means, segment_means


@dataclass
class PooledBatch(Batch):
    """A batch and, per sample, how many leading rows of the projector's input are its own."""

    projector_rows: list[int] | None = None
    #: where a pooling selects rows first: a mask over the projector input's leading dimensions (Mllama's tiles)
    projector_select: torch.Tensor | None = None


def config_attribute(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# -- poolings: per-sample row counts of the projector's input, from the processor's outputs ---------------------
def _rows_per_sample(loaded: LoadedModel, inputs: dict) -> list[int]:
    return [1] * int(inputs["input_ids"].shape[0])


def _rows_by_image_grid_thw(loaded: LoadedModel, inputs: dict) -> list[int]:
    # one image per sample: its t*h*w patches (window attention only reorders within an image)
    return [int(n) for n in inputs["image_grid_thw"].prod(dim=-1).tolist()]


def _rows_by_tile_counts(loaded: LoadedModel, inputs: dict) -> list[int]:
    """The image processor's own tiling of each image: the base image plus the grid of the best-fitting
    pinpoint resolution, each cut into crops of the tower's input size."""
    from transformers.image_processing_utils import select_best_resolution

    image_processor = loaded.processor.image_processor
    crop = loaded.model.config.vision_config.image_size
    counts = []
    for height, width in inputs["image_sizes"].tolist():
        best_height, best_width = select_best_resolution(
            (int(height), int(width)), image_processor.image_grid_pinpoints
        )
        counts.append(1 + (best_height // crop) * (best_width // crop))
    if max(counts) > inputs["pixel_values"].shape[1]:
        raise RuntimeError(f"tile counts {counts} exceed the processor's {inputs['pixel_values'].shape[1]} tiles")
    return counts


def _rows_by_merged_grid_thw(loaded: LoadedModel, inputs: dict) -> list[int]:
    # one image per sample: its t*h*w patches, merged merge x merge before the projector
    merge = int(loaded.model.config.vision_config.spatial_merge_size)
    return [int(n) // (merge * merge) for n in inputs["image_grid_thw"].prod(dim=-1).tolist()]


def _rows_of_real_images(loaded: LoadedModel, inputs: dict) -> list[int]:
    pixels = inputs["pixel_values"]  # [B, images, C, H, W], padded with all-zero images
    real = (pixels != 0).flatten(2).any(dim=-1)
    return [int(n) for n in real.sum(dim=1).tolist()]


def _rows_by_image_tokens(loaded: LoadedModel, inputs: dict) -> list[int]:
    """Each sample's crops: its image placeholders over the placeholders per crop (the batch's placeholders
    over its crops, every crop a real one: the processor concatenates them, padding none)."""
    tokens = (inputs["input_ids"] == loaded.adapter.image_token_id(loaded.model)).sum(dim=1).tolist()
    crops = int(inputs["pixel_values"].shape[0])
    per_crop, rest = divmod(sum(tokens), crops)
    if rest or not per_crop or any(n % per_crop for n in tokens):
        raise RuntimeError(f"image placeholders {tokens} per sample do not split evenly into {crops} crops")
    return [n // per_crop for n in tokens]


def _rows_by_image_sizes(loaded: LoadedModel, inputs: dict) -> list[int]:
    """One image per sample: the tower's patches of its real (resized, unpadded) size, before the merge."""
    patch = loaded.model.config.vision_config.patch_size
    return [(int(height) // patch) * (int(width) // patch) for height, width in inputs["image_sizes"].tolist()]


def _rows_by_image_grids(loaded: LoadedModel, inputs: dict) -> list[int]:
    """One image per sample: its pooled tokens, the low-resolution grid's and the high-resolution grid's."""
    return [int(low_h * low_w + high_h * high_w) for low_h, low_w, high_h, high_w in inputs["image_grids"].tolist()]


def _real_tiles(loaded: LoadedModel, inputs: dict) -> torch.Tensor:
    """[B, images, tiles]: the processor's aspect_ratio_mask (1 for an image's tiles, 0 for the padding tiles that
    fill every image up to max_num_tiles), selecting rows of the projector's input [B, images, tiles, patches, Dv]."""
    return inputs["aspect_ratio_mask"].bool()


def _rows_of_real_tiles(loaded: LoadedModel, inputs: dict) -> list[int]:
    return [int(n) for n in _real_tiles(loaded, inputs).flatten(1).sum(dim=1).tolist()]


ROW_COUNTS = {
    "per_sample": _rows_per_sample,
    "image_grid_thw": _rows_by_image_grid_thw,
    "tile_counts": _rows_by_tile_counts,
    "real_images": _rows_of_real_images,
    "crops_by_image_tokens": _rows_by_image_tokens,
    "merged_grid_thw": _rows_by_merged_grid_thw,
    "image_sizes": _rows_by_image_sizes,
    "image_grids": _rows_by_image_grids,
    "aspect_ratio_mask": _rows_of_real_tiles,
}

#: poolings whose projector input carries padding rows among the real ones: the rows to keep, selected before
#: ROW_COUNTS splits them per sample
ROW_SELECTIONS = {
    "aspect_ratio_mask": _real_tiles,
}


def pool_rows(projector_input: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """[B, Dv]: each sample's mean over its rows of the projector's input and all their patches."""
    if sum(rows) != projector_input.shape[0]:
        raise RuntimeError(
            f"the projector saw {projector_input.shape[0]} rows; the processor's outputs give {rows} per sample"
        )
    return segment_means(projector_input, rows)


def pool_selected_rows(projector_input: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """[B, Dv]: each sample's mean over the patches of its rows that `select` [B, ...] keeps (the padding tiles
    left out by a mask, not by indexing, which would copy every kept row)."""
    if tuple(select.shape) != tuple(projector_input.shape[: select.dim()]):
        raise RuntimeError(f"the projector saw {tuple(projector_input.shape)}; the row mask is {tuple(select.shape)}")
    rows = select.reshape(select.shape[0], -1)  # [B, rows]
    values = projector_input.reshape(select.shape[0], -1, projector_input.shape[-1])  # [B, rows x patches, Dv]
    mask = rows.repeat_interleave(values.shape[1] // rows.shape[1], dim=1)  # [B, rows x patches]
    return masked_means(values, mask.to(projector_input.device))


class EntryAdapter(Adapter):
    """The base protocol, with every family-specific member read from `entry`."""

    entry: ClassVar[FamilyEntry]

    def load_model(self, settings, revision, dtype, attention, device):
        import transformers

        auto_class = getattr(transformers, self.entry.auto_class)
        return auto_class.from_pretrained(
            settings.model,
            revision=revision,
            trust_remote_code=settings.trust_remote_code,
            dtype=dtype,
            attn_implementation=from_pretrained_argument(self.family, attention),
            device_map=device,
        )

    def chat_prompt(self, loaded, text):
        """The chat template's prompt, with the tokenizer's own leading <bos> where the template writes none
        (LLaVA-1.5's): what the processor's apply_chat_template(tokenize=True) gives, since the prompt is
        tokenised without special tokens (the template renders them, Gemma's <bos> among them). A family
        without a template (`chat_template` False): the image token then the text, which its processor
        completes as its own text-only route does (PaliGemma's: <bos> after the image tokens, a final newline)."""
        if not self.entry.chat_template:
            return loaded.processor.image_token + text
        prompt = super().chat_prompt(loaded, text)
        tokenizer = loaded.processor.tokenizer
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
        return bos + prompt if adds_bos and not prompt.startswith(bos) else prompt

    def processor_images(self, images):
        return [[image] for image in images] if self.entry.nested_images else images

    def build_batch(self, loaded, texts, images) -> PooledBatch:
        batch = super().build_batch(loaded, texts, images)
        for name in self.entry.dropped_inputs:
            batch.inputs.pop(name, None)
        rows = ROW_COUNTS[self.entry.pooling](loaded, batch.inputs)
        select = ROW_SELECTIONS.get(self.entry.pooling)
        return PooledBatch(
            batch.inputs,
            batch.input_ids,
            batch.attention_mask,
            projector_rows=rows,
            projector_select=select(loaded, batch.inputs) if select is not None else None,
        )

    def image_token_id(self, model):
        return int(config_attribute(model.config, self.entry.image_token_id))

    def decoder_blocks(self, model):
        return model.get_submodule(self.entry.decoder_blocks)

    def block_hidden_states(self, output):
        if self.entry.block_output_stream is None:
            return super().block_hidden_states(output)
        return output[self.entry.block_output_stream]

    def projector(self, model):
        return model.get_submodule(self.entry.projector)

    def vision_hidden_size(self, model):
        width = int(config_attribute(model.config, self.entry.vision_hidden_size))
        if self.entry.pixel_shuffle_scale is not None:
            width *= round(1 / float(config_attribute(model.config, self.entry.pixel_shuffle_scale))) ** 2
        return width

    def pool_projector_input(self, projector_input: torch.Tensor, batch: Batch) -> torch.Tensor:
        rows = getattr(batch, "projector_rows", None)
        if rows is None:
            raise RuntimeError(f"the {self.family} adapter pools batches it built itself (build_batch)")
        select = getattr(batch, "projector_select", None)
        if select is not None:
            return pool_selected_rows(projector_input, select)
        return pool_rows(projector_input, rows)

    # -- benchmark and tests only ------------------------------------------------------------------
    def final_norm(self, model):
        return model.get_submodule(self.entry.final_norm)

    def vision_tower(self, model):
        return model.get_submodule(self.entry.vision_tower)

    def vision_features(self, model, inputs) -> torch.Tensor:
        """The projector's input from the model's own image path alone (`get_image_features`, no decoder):
        [rows, Dv] (the benchmark's separate vision pass)."""
        inner = model.model
        accepted = inspect.signature(inner.get_image_features).parameters
        captured = []
        with forward_hooks(before=[(self.projector(model), lambda module, args: captured.append(args[0]))]):
            inner.get_image_features(**{k: v for k, v in inputs.items() if k in accepted and k != "input_ids"})
        return captured[0].reshape(-1, captured[0].shape[-1])


def entry_adapter_class(family: str) -> type[EntryAdapter]:
    entry = ENTRIES[family]
    name = "".join(part.capitalize() for part in family.split("_")) + "Adapter"
    return type(
        name,
        (EntryAdapter,),
        {
            "family": family,
            "entry": entry,
            "max_batch_size": entry.max_batch_size,
            "legacy_image_processors": dict(entry.legacy_image_processors),
            "semantics": entry.semantics,
            "no_static_cache": entry.no_static_cache,
            "__module__": __name__,
        },
    )
