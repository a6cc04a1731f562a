"""The vision-token positions the HALP paper's code used (a model entry's `paper_positions: true`).

The paper's per-model scripts ran one sample at a time and took the "last image token" from heuristics
rather than from input_ids (vlmstates.extraction.positions finds the exact one). Recording the vectors at the
scripts' positions as well, under their own names, lets a user reproduce the published VT numbers and
see what the correction changes. `seq_len` in the scripts was input_ids.shape[1] of that single,
unpadded prompt, so here it is each row's own prompt length (`num_prompt_tokens`): a batched run gives
the positions of batch 1. Every rule returns indices into the sample's own prompt, padding excluded, as
`Positions.vision` holds.

No torch here: Snakemake reads PAPER_VISION_RULES' families when it checks the config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vlmstates.settings import ConfigError, ModelSettings

if TYPE_CHECKING:
    from vlmstates.extraction.positions import Positions


def _qwen2_5_vl(positions: Positions, inputs: dict) -> list[int]:
    # `min(grid[0].prod(), seq_len // 2)`, used as the index itself (no "- 1"): the patch count before the
    # 2x2 merge, four times the <|image_pad|> tokens, so for any real image the cap at half the prompt
    # decides. One image per sample: row i of image_grid_thw is sample i's.
    patches = inputs["image_grid_thw"].prod(dim=-1).tolist()
    return [min(int(p), n // 2) for p, n in zip(patches, positions.num_prompt_tokens)]


def _gemma3(positions: Positions, inputs: dict) -> list[int]:
    # `min(255, seq_len // 2)`: the script took the image's 256 soft tokens to start the prompt; they
    # start a few tokens in (after <bos>, the turn header and <start_of_image>), so 255 falls short of
    # the last one.
    return [min(255, n // 2) for n in positions.num_prompt_tokens]


def _molmo(positions: Positions, inputs: dict) -> list[int]:
    # One past the largest image_input_idx. Molmo's adapter takes VT at that largest index (the last
    # <im_patch> token), so the script's position is the token right after our VT.
    return [v + 1 for v in positions.vision]


def _phi4_multimodal(positions: Positions, inputs: dict) -> list[int]:
    # The last <|image|> token: the script's position is the exact one. Recorded all the same, so that
    # every family the paper covered has the same datasets and the summary its row.
    return list(positions.vision)


#: family -> its rule: (the batch's positions read off input_ids, the processor's outputs) -> per-row positions.
PAPER_VISION_RULES: dict[str, Callable[[Positions, dict], list[int]]] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "gemma3": _gemma3,
    "molmo": _molmo,
    "phi4_multimodal": _phi4_multimodal,
}


def paper_vision_positions(family: str, positions: Positions, inputs: dict) -> list[int]:
    """Per row, the vision-token position of the paper's code for `family`, in the sample's own prompt."""
    found = PAPER_VISION_RULES[family](positions, inputs)
    outside = [row for row, (p, n) in enumerate(zip(found, positions.num_prompt_tokens)) if not 0 <= p < n]
    if outside:
        raise ValueError(f"the paper's vision position falls outside the prompt of batch row(s) {outside}")
    return found


def in_padded_batch(paper: list[int], positions: Positions) -> list[int]:
    """Own-prompt positions as columns of the left-padded batch (each row shifted by its padding)."""
    return [p + padded - own for p, padded, own in zip(paper, positions.vision_padded.tolist(), positions.vision)]


def check_paper_positions(settings: ModelSettings, family: str) -> None:
    """`paper_positions: true` only for a family the paper's code covered (ConfigError naming the key)."""
    if settings.paper_positions and family not in PAPER_VISION_RULES:
        raise ConfigError(
            f"models.{settings.name}.paper_positions: the HALP paper's code covered no {family} model, so there "
            f"is no paper position to record (it is known for {', '.join(sorted(PAPER_VISION_RULES))}); "
            f"remove the key or set it to false"
        )
