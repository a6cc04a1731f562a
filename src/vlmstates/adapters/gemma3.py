"""Gemma 3: fixed-size SigLIP images; the projector is the multi-modal projector."""

from __future__ import annotations

from .base import Adapter


class Gemma3Adapter(Adapter):
    family = "gemma3"

    def projector(self, model):
        return model.model.multi_modal_projector

    def vision_tower(self, model):
        return model.model.vision_tower

    def vision_features(self, model, inputs):
        return model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state

    def processor_images(self, images):
        # Gemma's processor wants the images nested per sample in a batch.
        return [[image] for image in images]
