"""Batch planning and the batch-size search, before the engine runs a batch.

Batches are planned before any pixel is decoded: every sample's prompt length is estimated from its
question's tokens and its image's size (read off the file header), and samples of similar length are
batched together, longest first, so that little of a batch is padding and the first batch is the largest
(which `batch_size: auto` tries first). The plan is a deterministic function of the shard's questions,
their image headers and the batch size, so a resumed shard forms the same batches.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import ExifTags, Image

from vlmstates.images import resolve_image_path
from vlmstates.settings import AUTO_BATCH_SIZE

if TYPE_CHECKING:
    from vlmstates.dataset import Question
    from vlmstates.extraction.adapters.base import LoadedModel

log = logging.getLogger(__name__)

#: `batch_size: auto` on CUDA: the first size tried on the first (longest) batch, halved on out-of-memory,
#: and the largest used; by the model's parameter count (`auto_batch_start`): a small model's KV cache and
#: activations per row are small, and it decodes faster at more rows. 7B and larger keep 64.
AUTO_BATCH_STARTS = ((1_500_000_000, 256), (4_000_000_000, 128))
AUTO_BATCH_START = 64
#: once a size ran out of memory, the size used is this share of the largest that fitted (at least 1): a
#: margin for what the probe does not see (fragmentation, a later group's larger images, estimates off)
AUTO_BATCH_MARGIN = (3, 4)
#: `batch_size: auto` elsewhere: there is no out-of-memory error to search by, so a fixed size.
AUTO_BATCH_FIXED = 8

_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def read_image_size(images_dir: Path, image_id: str) -> tuple[int, int] | None:
    """A question's image (width, height) as it will be decoded, read off the file's header without
    decoding the pixels; None if it cannot be read (its load then records the error)."""
    try:
        with Image.open(resolve_image_path(images_dir, image_id)) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # any unreadable file: load_image reports it properly when the sample runs
        return None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class SortKey:
    group: object  # the adapter's batch group: only samples of one group share a batch
    length: int  # estimated prompt tokens


def sort_keys(loaded: LoadedModel, questions: Sequence[Question], images_dir: Path) -> list[SortKey | None]:
    """Each sample's batch group and estimated prompt length: question tokens plus image tokens."""
    if not questions:
        return []
    adapter = loaded.adapter
    texts = [loaded.settings.format_prompt(q.question) for q in questions]
    encoded = loaded.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    keys: list[SortKey | None] = []
    for q, ids in zip(questions, encoded):
        size = read_image_size(images_dir, q.image_id)
        if size is None:
            keys.append(None)
            continue
        image_tokens = adapter.image_token_estimate(loaded, *size)
        keys.append(SortKey(adapter.batch_group(loaded, *size), len(ids) + image_tokens))
    return keys


def plan_batches(keys: Sequence[SortKey | None], batch_size: int) -> list[list[int]]:
    """Batches of sample indices: within each group by estimated length (longest first, ties in dataset
    order), cut into batches of `batch_size`; batches ordered longest first; unreadable samples (None)
    last, one per batch."""
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key.group, []).append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: (-keys[i].length, i))
        batches += [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
    batches.sort(key=lambda batch: (-keys[batch[0]].length, batch[0]))
    return batches + [[i] for i, key in enumerate(keys) if key is None]


@dataclass
class BatchPlan:
    batch_size: int
    batches: list[list[int]]


def searches_batch_size(device: torch.device) -> bool:
    """Whether `batch_size: auto` searches the batch size by trying it (only CUDA reports out-of-memory)."""
    return device.type == "cuda"


def auto_batch_start(parameters: int) -> int:
    """`batch_size: auto`'s first and largest size for a model of this many parameters."""
    return next((start for below, start in AUTO_BATCH_STARTS if parameters < below), AUTO_BATCH_START)


def plan(
    batch_size: int | str,
    device: torch.device,
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    probe: Callable[[list[int]], None],
    start: int = AUTO_BATCH_START,
) -> BatchPlan:
    """The plan for the configured batch size or, with `auto`, for the one `find_batch_size` finds."""
    if batch_size != AUTO_BATCH_SIZE:
        return BatchPlan(batch_size, plan_batches(keys, batch_size))
    if not searches_batch_size(device):
        log.info("batch size auto on %s: %d (no device memory to search)", device, AUTO_BATCH_FIXED)
        return BatchPlan(AUTO_BATCH_FIXED, plan_batches(keys, AUTO_BATCH_FIXED))
    found = find_batch_size(keys, unfinished, probe, start)
    log.info("batch size auto: %d", found.batch_size)
    return found


def find_batch_size(
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    probe: Callable[[list[int]], None],
    start: int = AUTO_BATCH_START,
) -> BatchPlan:
    """Halve from `start` until the first batch with an `unfinished` sample fits in `probe`, which runs it
    decoding every answer to `max_new_tokens`: that batch holds the longest prompts, so every later batch,
    whatever its answers, fits too. If a size ran out of memory, the size used keeps a margin below the one
    that fitted (AUTO_BATCH_MARGIN). The probe's results are dropped (a full-length answer is not what a
    normal run records): the engine runs that batch again like any other."""
    size = max(1, min(start, len(keys)))
    ran_out = False
    while True:
        batches = plan_batches(keys, size)
        first = next((b for b in batches if unfinished(b)), None)
        if first is None or size == 1:
            return BatchPlan(size, batches)
        if not _runs_out_of_memory(probe, first):
            return _with_margin(keys, size) if ran_out else BatchPlan(size, batches)
        gc.collect()
        torch.cuda.empty_cache()
        log.info("batch size auto: %d does not fit, trying %d", size, size // 2)
        size //= 2
        ran_out = True


def _runs_out_of_memory(probe: Callable[[list[int]], None], batch: list[int]) -> bool:
    try:
        probe(batch)
    except torch.OutOfMemoryError:
        return True  # the error is dropped here: its traceback holds the attempt's tensors
    except Exception:  # not a memory question: a faulty sample, which the normal path records
        return False
    return False


def _with_margin(keys: Sequence[SortKey | None], fitted: int) -> BatchPlan:
    numerator, denominator = AUTO_BATCH_MARGIN
    size = max(1, fitted * numerator // denominator)
    log.info("batch size auto: %d fits; %d keeps a margin", fitted, size)
    return BatchPlan(size, plan_batches(keys, size))
