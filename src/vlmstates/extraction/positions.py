"""Token positions read off a left-padded batch: never estimated from patch grids or fixed offsets."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Positions:
    """Per-row token positions; `*_padded` index the padded batch, the others the sample's own prompt."""

    vision_padded: torch.Tensor
    query_padded: torch.Tensor
    vision: list[int]
    query: list[int]
    num_prompt_tokens: list[int]
    num_image_tokens: list[int]


def find_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> Positions:
    """Last image-placeholder token and last prompt token of each row, read off input_ids."""
    ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
    is_image = (ids == image_token_id) & mask
    if not is_image.any(dim=1).all():
        rows = (~is_image.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"no image token (id {image_token_id}) in the prompt of batch row(s) {rows}")
    vision_padded = torch.where(is_image, torch.arange(ids.shape[1]), -1).max(dim=1).values
    return positions_in_left_padded_batch(vision_padded, mask, is_image.sum(dim=1))


def positions_in_left_padded_batch(
    vision_padded: torch.Tensor, attention_mask: torch.Tensor, num_image_tokens: torch.Tensor
) -> Positions:
    """Positions from each row's vision token column: the query token is the last column (checked), and
    a row's own positions discount its left padding."""
    mask = attention_mask.cpu().bool()
    length = mask.shape[1]
    if not mask[:, -1].all():
        raise ValueError("the batch is not left-padded: the last prompt token is not the last column")
    query_padded = torch.full((mask.shape[0],), length - 1, dtype=torch.long)
    padding = length - mask.sum(dim=1)  # left padding: a row's own tokens start here
    return Positions(
        vision_padded=vision_padded,
        query_padded=query_padded,
        vision=(vision_padded - padding).tolist(),
        query=(query_padded - padding).tolist(),
        num_prompt_tokens=mask.sum(dim=1).tolist(),
        num_image_tokens=num_image_tokens.tolist(),
    )
