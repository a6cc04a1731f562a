"""Batch planning and the batch-size search, before the engine runs a batch.

Batches are planned before any pixel is decoded: every sample's prompt length is estimated from its
question's tokens and its image's size (read off the file header), and samples of similar length are
batched together, longest first, so that little of a batch is padding and the first batch is the largest
(which `batch_size: auto` tries first). The plan is a deterministic function of the shard's questions,
their image headers and the batch size, so a resumed shard forms the same batches. The size `auto` finds on
CUDA is kept for later jobs in a record file (vlmstates.extraction.batch_size_record), which `plan` reads first.
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
    from vlmstates.extraction.batch_size_record import BatchSizeRecord

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
    #: `auto`'s search measured the size: a probe ran a full batch of it, and it is what the device fits (a
    #: larger one ran out of memory, or it is the start, the largest tried), not what the shard's few samples
    #: allowed; only such a size is recorded for later jobs (batch_size_record)
    measured: bool = False
    #: a batch of the plan that the search's probe ran, with the probe's results
    probed: tuple[list[int], list] | None = None


def searches_batch_size(device: torch.device) -> bool:
    """Whether `batch_size: auto` searches the batch size by trying it (only CUDA reports out-of-memory)."""
    return device.type == "cuda"


def auto_batch_start(parameters: int) -> int:
    """`batch_size: auto`'s first and largest size for a model of this many parameters."""
    return next((start for below, start in AUTO_BATCH_STARTS if parameters < below), AUTO_BATCH_START)


def longest_prompt(keys: Sequence[SortKey | None]) -> int:
    """The shard's longest estimated prompt (tokens): what a recorded batch size must have held for."""
    return max((key.length for key in keys if key is not None), default=0)


def plan(
    batch_size: int | str,
    device: torch.device,
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    probe: Callable[[list[int]], list | None],
    start: int = AUTO_BATCH_START,
    record: BatchSizeRecord | None = None,
) -> BatchPlan:
    """The plan for the configured batch size or, with `auto`, for the size `record` holds for prompts as long
    as the shard's, else for the one `find_batch_size` finds (then recorded, when measured)."""
    if batch_size != AUTO_BATCH_SIZE:
        return BatchPlan(batch_size, plan_batches(keys, batch_size))
    if not searches_batch_size(device):
        log.info("batch size auto on %s: %d (no device memory to search)", device, AUTO_BATCH_FIXED)
        return BatchPlan(AUTO_BATCH_FIXED, plan_batches(keys, AUTO_BATCH_FIXED))
    longest = longest_prompt(keys)
    recorded = record.read() if record is not None else None
    if recorded is not None and longest <= recorded.longest_prompt:
        size = min(recorded.batch_size, start)
        log.info(
            "batch size auto: %d, recorded in %s (%s, for prompts up to %d tokens; this shard's reach %d), not searched",
            size,
            record,
            recorded.how,
            recorded.longest_prompt,
            longest,
        )
        return BatchPlan(size, plan_batches(keys, size))
    if recorded is not None:
        log.info(
            "batch size auto: the %d recorded in %s holds for prompts up to %d tokens, this shard's reach %d: "
            "searching from it",
            recorded.batch_size,
            record,
            recorded.longest_prompt,
            longest,
        )
        start = min(start, recorded.batch_size)
    found = find_batch_size(keys, unfinished, probe, start)
    log.info("batch size auto: %d", found.batch_size)
    if record is not None and found.measured:
        record.found(found.batch_size, longest)
    return found


def find_batch_size(
    keys: Sequence[SortKey | None],
    unfinished: Callable[[list[int]], bool],
    probe: Callable[[list[int]], list | None],
    start: int = AUTO_BATCH_START,
) -> BatchPlan:
    """Halve from `start` until the first batch with an `unfinished` sample fits in `probe`, which runs it
    decoding every answer to `max_new_tokens` and returns its results (None: it did not run the batch, which
    has a faulty sample): that batch holds the longest prompts, so every later batch, whatever its answers,
    fits too. If a size ran out of memory, the size used keeps a margin below the one that fitted
    (AUTO_BATCH_MARGIN). The plan says which batch the probe ran at the size used (`probed`), if one did."""
    size = max(1, min(start, len(keys)))
    ran_out = False
    while True:
        batches = plan_batches(keys, size)
        first = next((b for b in batches if unfinished(b)), None)
        if first is None or size == 1:
            return BatchPlan(size, batches)
        results = _probed(probe, first)
        if results is not _OUT_OF_MEMORY:
            # it fitted, or the probe could not tell (a faulty sample): the search stops at this size
            measured = results is not None and len(first) == size and (ran_out or size == start)
            if ran_out:
                return _with_margin(keys, size, measured)
            return BatchPlan(size, batches, measured, (first, results) if results is not None else None)
        gc.collect()
        torch.cuda.empty_cache()
        log.info("batch size auto: %d does not fit, trying %d", size, size // 2)
        size //= 2
        ran_out = True


_OUT_OF_MEMORY = object()


def _probed(probe: Callable[[list[int]], list | None], batch: list[int]) -> list | None | object:
    """The probe's results, or _OUT_OF_MEMORY; None where it did not run the batch or failed otherwise."""
    try:
        return probe(batch)
    except torch.OutOfMemoryError:
        return _OUT_OF_MEMORY  # the error is dropped here: its traceback holds the attempt's tensors
    except Exception:  # not a memory question: a faulty sample, which the normal path records
        return None


def _with_margin(keys: Sequence[SortKey | None], fitted: int, measured: bool) -> BatchPlan:
    numerator, denominator = AUTO_BATCH_MARGIN
    size = max(1, fitted * numerator // denominator)
    log.info("batch size auto: %d fits; %d keeps a margin", fitted, size)
    return BatchPlan(size, plan_batches(keys, size), measured)
