"""The batch sizes `batch_size: auto` found, kept for the later jobs of the same model on the same kind of GPU.

One JSON file, named by the caller (the workflow's: results/{model}/shards/batch_sizes.json), maps a key to an
entry. The key is what decides the memory a batch needs: the GPU's name and total memory, and the model
settings' config hash (model, revision, dtype, layers, max_new_tokens, answers, image budget, attention...).
An entry holds the batch size and the longest estimated prompt (tokens, batching.SortKey.length) it held for:
a shard whose longest prompt is no longer uses it without searching; a shard with longer prompts searches
again, from the recorded size down, and records what it finds. A job that runs out of memory lowers its
entry to half the batch that ran out (what its retry runs), so that the next job does not repeat it.

Several jobs write at once (one per GPU): a write reads, changes and rewrites the file while holding an
exclusive lock on a sibling lock file (an flock, which the kernel drops with the process), so no job's entry
is lost, and renames the new file into place, so a reader, which takes no lock, never sees half a file. One
file with a lock rather than a file per key: the lowering is a read-modify-write of an entry either way, and
one file is what a person reads to see what was found. A missing or unreadable file is an empty record: the
search runs (a warning for an unreadable one, which the next write replaces).
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmstates.atomic import atomic_path

log = logging.getLogger(__name__)

#: how an entry was set: by a search that fitted it, or lowered after a job ran out of memory
FOUND_BY_SEARCH = "search"
LOWERED_AFTER_OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class RecordedBatchSize:
    """One key's entry: a batch size that holds for prompts up to `longest_prompt` estimated tokens."""

    batch_size: int
    longest_prompt: int
    how: str
    #: for the person reading the file; not part of the key
    device: str
    total_memory: int
    config_hash: str
    model: str


def device_identity(device: torch.device) -> tuple[str, int]:
    """The GPU's name and total memory in bytes: what, besides the settings, decides the batch that fits."""
    properties = torch.cuda.get_device_properties(device)
    return properties.name, int(properties.total_memory)


class BatchSizeRecord:
    """The entry of one model's settings on one kind of GPU in the record file at `path`."""

    def __init__(self, path: str | Path, device: torch.device, settings):
        self.path = Path(path)
        self.device, self.total_memory = device_identity(device)
        self.config_hash, self.model = settings.config_hash(), settings.model
        self.key = f"{self.device} | {self.total_memory} bytes | {self.config_hash}"

    def __str__(self) -> str:
        return f"{self.path} ({self.device}, {self.total_memory / 2**30:.1f} GiB; config hash {self.config_hash})"

    def read(self) -> RecordedBatchSize | None:
        """This key's entry, or None (none yet, or an unreadable file or entry: the search runs)."""
        return self._parsed(_entries(self.path))

    def found(self, batch_size: int, longest_prompt: int) -> None:
        """A search fitted `batch_size` on prompts up to `longest_prompt` tokens: the entry from now on."""

        def change(entries: dict) -> None:
            entries[self.key] = self._entry(batch_size, longest_prompt, FOUND_BY_SEARCH)

        if self._changed(change):
            log.info("batch size auto: %d recorded in %s", batch_size, self)

    def ran_out_of_memory(self, batch_size: int, longest_prompt: int) -> None:
        """A batch of `batch_size` rows ran out of memory, on prompts up to `longest_prompt` tokens: the entry
        becomes at most half of it (what the job's retry runs), for prompts up to the longer of the two."""
        lowered = []

        def change(entries: dict) -> None:
            below, longest = max(1, batch_size // 2), longest_prompt
            before = self._parsed(entries)
            if before is not None:
                below, longest = min(below, before.batch_size), max(longest, before.longest_prompt)
            entries[self.key] = self._entry(below, longest, LOWERED_AFTER_OUT_OF_MEMORY)
            lowered.append(below)

        if self._changed(change):
            log.warning(
                "batch size auto: a batch of %d ran out of memory; %d recorded in %s", batch_size, lowered[0], self
            )

    def _parsed(self, entries: dict) -> RecordedBatchSize | None:
        entry = entries.get(self.key)
        if entry is None:
            return None
        try:
            recorded = RecordedBatchSize(**entry)
        except TypeError as error:  # a key missing or unknown
            recorded, problem = None, str(error)
        else:
            sizes = (recorded.batch_size, recorded.longest_prompt)
            usable = all(isinstance(n, int) and not isinstance(n, bool) for n in sizes) and recorded.batch_size >= 1
            problem = f"batch_size {recorded.batch_size!r}, longest_prompt {recorded.longest_prompt!r}"
            recorded = recorded if usable else None
        if recorded is None:
            log.warning(
                "batch size record %s: the entry %r is not readable (%s); searching", self.path, self.key, problem
            )
        return recorded

    def _entry(self, batch_size: int, longest_prompt: int, how: str) -> dict:
        return asdict(
            RecordedBatchSize(
                batch_size, longest_prompt, how, self.device, self.total_memory, self.config_hash, self.model
            )
        )

    def _changed(self, change: Callable[[dict], None]) -> bool:
        """Apply `change` to the file's entries and rewrite it, under the lock; False (a warning) where the
        file cannot be written: the record only saves later jobs a search, so the extraction goes on."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
                entries = _entries(self.path)
                change(entries)
                with atomic_path(self.path) as tmp:
                    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as error:
            log.warning("batch size record %s cannot be written (%s); later jobs search again", self.path, error)
            return False
        return True


def _entries(path: Path) -> dict:
    """The file's key -> entry mapping; empty when there is no file yet or it cannot be read (a warning)."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("batch size record %s cannot be read (%s); searching the batch size again", path, error)
        return {}
    if not isinstance(entries, dict) or not all(isinstance(entry, dict) for entry in entries.values()):
        log.warning("batch size record %s is not a mapping of entries; searching the batch size again", path)
        return {}
    return entries
