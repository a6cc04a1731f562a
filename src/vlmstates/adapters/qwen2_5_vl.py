"""Qwen2.5-VL: dynamic-resolution images; the projector is the vision tower's patch merger."""

from __future__ import annotations

import torch

from .base import Adapter, Batch


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    # A name some Qwen2.5-VL fine-tunes carry in preprocessor_config.json; transformers has no such
    # class, and the Qwen2.5-VL processor uses Qwen2-VL's image processor (as the hub checkpoint says).
    legacy_image_processors = {"Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor"}

    def projector(self, model):
        return model.model.visual.merger

    def vision_tower(self, model):
        return model.model.visual

    def vision_features(self, model, inputs):
        return model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state

    def pool_projector_input(self, projector_input: torch.Tensor, batch: Batch) -> torch.Tensor:
        # The merger sees all images' patches concatenated ([sum of t*h*w, Dv]), each image's block
        # contiguous (window attention only reorders within an image), so split by patch counts.
        patches_per_image = batch.inputs["image_grid_thw"].prod(dim=-1).tolist()
        pieces = torch.split(projector_input.float(), patches_per_image, dim=0)
        return torch.stack([piece.mean(dim=0) for piece in pieces])
