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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import ExifTags, Image

from vlmstates.images import resolve_image_path
from vlmstates.settings import AUTO_BATCH_SIZE
from vlmstates.store import SampleResult

if TYPE_CHECKING:
    from vlmstates.dataset import Question
    from vlmstates.extraction.adapters.base import LoadedModel

log = logging.getLogger(__name__)

#: `batch_size: auto` on CUDA: the first size tried on the first (longest) batch, halved on out-of-memory.
AUTO_BATCH_START = 64
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
    tried: list[int] | None = None  # the batch the batch-size search ran to completion, and its results
    tried_results: list[SampleResult] = field(default_factory=list)


def searches_batch_size(device: torch.device) -> bool:
    """Whether `batch_size: auto` searches the batch size by trying it (only CUDA reports out-of-memory)."""
    return device.type == "cuda"


def plan(
    batch_size: int | str,
    device: torch.device,
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    try_batch: Callable[[list[int]], list[SampleResult] | None],
) -> BatchPlan:
    """The plan for the configured batch size or, with `auto`, for the one `find_batch_size` finds."""
    if batch_size != AUTO_BATCH_SIZE:
        return BatchPlan(batch_size, plan_batches(keys, batch_size))
    if not searches_batch_size(device):
        log.info("batch size auto on %s: %d (no device memory to search)", device, AUTO_BATCH_FIXED)
        return BatchPlan(AUTO_BATCH_FIXED, plan_batches(keys, AUTO_BATCH_FIXED))
    found = find_batch_size(keys, unfinished, try_batch)
    log.info("batch size auto: %d", found.batch_size)
    return found


_OUT_OF_MEMORY = object()


def find_batch_size(
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    try_batch: Callable[[list[int]], list[SampleResult] | None],
) -> BatchPlan:
    """Halve from AUTO_BATCH_START until the first batch with an `unfinished` sample runs in `try_batch`
    without running out of memory; it holds the longest prompts, so the later batches fit too. Its
    results are kept. `try_batch` returns None for a batch with a faulty sample (not a memory question:
    the normal path records it)."""
    size = max(1, min(AUTO_BATCH_START, len(keys)))
    while True:
        batches = plan_batches(keys, size)
        first = next((b for b in batches if unfinished(b)), None)
        if first is None or size == 1:
            return BatchPlan(size, batches)
        try:
            results = try_batch(first)
        except torch.OutOfMemoryError:
            results = _OUT_OF_MEMORY  # the error is dropped here: its traceback holds the attempt's tensors
        except Exception:  # not a memory question either
            return BatchPlan(size, batches)
        if results is _OUT_OF_MEMORY:
            gc.collect()
            torch.cuda.empty_cache()
            log.info("batch size auto: %d does not fit, trying %d", size, size // 2)
            size //= 2
            continue
        return BatchPlan(size, batches) if results is None else BatchPlan(size, batches, first, results)
