"""Stand-in for Molmo's remote processor (tests only; written for this project, not allenai's code).

`processor.process(images=[image], text=question)` returns, as the real one does, one sample's
`input_ids` [L], `images` [crops, patches, pixels], `image_masks` [crops, patches] (the fraction of each
patch covered by the image rather than by padding) and `image_input_idx` [crops, tokens per crop] (the
positions of the image patch tokens in `input_ids`, -100 for pooled patches that are not used, as the real
processor marks them). Like the real processor's, `image_masks` is shifted by one crop against `images`:
row k holds crop k+1's coverage and the last row is all ones; the model reads it as aligned, so the
adapter must pass it on as it comes. Its own
prompt: `<|endoftext|>`, the image tokens (`<im_start>`, rows of `<im_patch>` closed by `<im_col>`,
`<im_end>`; a low-resolution global crop first, then a grid of up to 2x2 high-resolution crops whose
overlapping first pooled row/column is dropped), then " User: {text} Assistant:".
Resizing uses PIL here; the real code uses tensorflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast, ProcessorMixin

IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT = "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"
EXTRA_TOKENS = (IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT)
UNUSED = -100  # image_input_idx of a pooled patch that enters no token


def _shifted_by_one_crop(masks: np.ndarray) -> np.ndarray:
    """Row k: crop k+1's coverage; the last row all ones (the real processor's offset, kept on purpose)."""
    return np.concatenate((masks[1:], np.ones_like(masks[:1])), axis=0)


class MolmoProcessor(ProcessorMixin):
    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.crop_size = 16
        self.patch_size = 4
        self.pooling = 2
        self.max_tiles = 2
        self.image_mean = 0.5
        self.image_std = 0.5

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        processor = cls(PreTrainedTokenizerFast.from_pretrained(str(folder)))
        with open(folder / "preprocessor_config.json", encoding="utf-8") as f:
            settings = json.load(f)
        for key in ("crop_size", "patch_size", "pooling", "max_tiles", "image_mean", "image_std"):
            setattr(processor, key, settings[key])
        return processor

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {t: self.tokenizer.convert_tokens_to_ids(t) for t in EXTRA_TOKENS}

    # -- images ------------------------------------------------------------------------------------
    def _tiling(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of high-resolution crops, from the aspect ratio and size."""
        rows = 2 if height >= 1.2 * width else 1
        cols = 2 if width >= 1.2 * height else 1
        if rows == cols == 1 and max(width, height) >= 144:
            rows = cols = 2
        return min(rows, self.max_tiles), min(cols, self.max_tiles)

    def _resize_with_pad(self, image: Image.Image, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
        """Keep the aspect ratio, pad bottom/right: normalised pixels [H, W, 3] and image coverage [H, W]."""
        width, height = image.size
        scale = min(out_h / height, out_w / width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
        pixels = np.zeros((out_h, out_w, 3), dtype=np.float32)
        pixels[:new_h, :new_w] = (resized - self.image_mean) / self.image_std
        coverage = np.zeros((out_h, out_w), dtype=np.float32)
        coverage[:new_h, :new_w] = 1.0
        return pixels, coverage

    def _patchify(self, pixels: np.ndarray, coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch_size
        h, w = coverage.shape
        patches = (
            pixels.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape((h // p) * (w // p), p * p * 3)
        )
        masks = coverage.reshape(h // p, p, w // p, p).mean(axis=(1, 3)).reshape(-1)
        return patches, masks

    # -- one sample --------------------------------------------------------------------------------
    def process(self, text: str | None = None, images: list | None = None, **kwargs) -> dict[str, torch.Tensor]:
        if not images or len(images) != 1:
            raise ValueError("this stand-in processes exactly one image per sample")
        image = images[0]
        tok = self.tokenizer
        ids = self.special_token_ids
        side = self.crop_size // self.patch_size // self.pooling  # pooled tokens per crop side
        rows, cols = self._tiling(*image.size)

        crops_pixels, crops_masks = [], []
        pixels, coverage = self._resize_with_pad(image, self.crop_size, self.crop_size)
        patches, masks = self._patchify(pixels, coverage)
        crops_pixels.append(patches)
        crops_masks.append(masks)
        pixels, coverage = self._resize_with_pad(image, rows * self.crop_size, cols * self.crop_size)
        for i in range(rows):
            for j in range(cols):
                window = np.s_[
                    i * self.crop_size : (i + 1) * self.crop_size, j * self.crop_size : (j + 1) * self.crop_size
                ]
                patches, masks = self._patchify(pixels[window], coverage[window])
                crops_pixels.append(patches)
                crops_masks.append(masks)

        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        tokens = [bos]
        image_input_idx = np.full((1 + rows * cols, side * side), UNUSED, dtype=np.int64)
        # low-resolution global crop
        tokens.append(ids[IM_START])
        for r in range(side):
            for c in range(side):
                image_input_idx[0, r * side + c] = len(tokens)
                tokens.append(ids[IM_PATCH])
            tokens.append(ids[IM_COL])
        tokens.append(ids[IM_END])
        # high-resolution crops as one grid; a crop's first pooled row/column overlaps its neighbour's
        kept = lambda k: range(side) if k == 0 else range(1, side)  # noqa: E731
        tokens.append(ids[IM_START])
        for i in range(rows):
            for r in kept(i):
                for j in range(cols):
                    for c in kept(j):
                        image_input_idx[1 + i * cols + j, r * side + c] = len(tokens)
                        tokens.append(ids[IM_PATCH])
                tokens.append(ids[IM_COL])
        tokens.append(ids[IM_END])
        tokens += tok.encode(" User: " + (text or "") + " Assistant:", add_special_tokens=False)

        return {
            "input_ids": torch.tensor(tokens, dtype=torch.long),
            "images": torch.from_numpy(np.stack(crops_pixels)),
            "image_masks": torch.from_numpy(_shifted_by_one_crop(np.stack(crops_masks))),
            "image_input_idx": torch.from_numpy(image_input_idx),
        }
