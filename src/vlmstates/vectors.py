"""The vectors of an embeddings file in one line, without knowing its HDF5 keys.

    import vlmstates
    vectors = vlmstates.load("results/qwen/embeddings.h5", representations=["VT"], layers=[12])
    vectors.rows                  # question_id, image_id, question, ground_truth_answer, answer, status, ...
    vectors["VT_layer_12"]        # numpy array [rows, hidden size], the dtype as stored (float32)
    vectors.to_frame()            # the rows plus one column per vector, each cell a 1-D array

Representations are named by the probes' codes (VF vision-only, VT last image token, QT last prompt token,
MM multimodal mean, VT_paper the paper code's image position) or by their HDF5 names; `layers` picks the
decoder layers of the layered ones (VF has none and is kept when selected). Only rows with status ok are
returned unless `rows="all"`: a failed row's vectors are NaN. Each chosen dataset is read from disk in
slices of rows, nothing else of the file; `iter_chunks` yields the same rows a slice at a time, for files
larger than memory. A merged file and a shard have the same layout and read alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from vlmstates.analysis.probes.settings import CODE_ORDER, REPRESENTATION_CODES
from vlmstates.errors import VlmstatesError
from vlmstates.store import (
    STATUS_OK,
    VISION_ONLY,
    check_columnar,
    parse_key,
    read_attrs,
    read_table,
    vector_dims,
)

log = logging.getLogger(__name__)

ROWS = ("ok", "all")
#: Bytes of vectors read per slice of rows when no chunk size is given.
CHUNK_BYTES = 64 * 2**20
_NAMES = {code: name for name, code in REPRESENTATION_CODES.items()}


class VectorsError(VlmstatesError, ValueError):
    """An embeddings file or a selection of its vectors cannot be read; the message names the file and
    what it holds."""


def vector_column(key: str) -> str:
    """The name a vector dataset goes by outside the file: VF, or the code and layer (VT_layer_12)."""
    representation, layer = parse_key(key)
    code = REPRESENTATION_CODES[representation]
    return code if layer is None else f"{code}_layer_{layer}"


@dataclass
class Vectors:
    """Rows of an embeddings file and their chosen vectors, row i of each array belonging to `rows` row i."""

    path: Path
    #: the scalar columns; the index is each row's position in the file
    rows: pd.DataFrame
    #: column name (see `vector_column`) -> [len(rows), width], the dtype as stored
    vectors: dict[str, np.ndarray]
    #: the file's attributes (model, revision, layers, dtype, semantics, ...)
    attrs: dict

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> np.ndarray:
        try:
            return self.vectors[column]
        except KeyError:
            raise KeyError(f"{column!r} is not loaded; loaded: {', '.join(self.vectors)}") from None

    def to_frame(self) -> pd.DataFrame:
        """The rows plus one column per vector, each cell one row's vector (a view, not a copy)."""
        frame = self.rows.copy()
        for column, data in self.vectors.items():
            frame[column] = pd.Series(list(data), index=frame.index, dtype=object)
        return frame


def load(
    path: str | Path,
    representations: Sequence[str] | str | None = None,
    layers: Sequence[int] | int | None = None,
    rows: str = "ok",
    chunk_rows: int | None = None,
) -> Vectors:
    """Read the rows of an embeddings file (only status ok ones unless rows="all") and their vectors of the
    chosen representations (default: all) and layers (default: all), into memory. Read a slice of rows at
    a time (`chunk_rows`), so that no more than the result and one slice is held."""
    _check_rows(rows, chunk_rows)
    with _open(path) as f:
        keys = select_keys(f, path, representations, layers)
        chunk_rows = chunk_rows or _default_chunk_rows(f, keys)
        kept = _kept_rows(f, rows)
        out = {vector_column(key): np.empty((int(kept.sum()), f[key].shape[1]), f[key].dtype) for key in keys}
        tables, filled = [], 0
        for chunk in _chunks(f, keys, kept, chunk_rows):
            tables.append(chunk.rows)
            for column, data in chunk.vectors.items():
                out[column][filled : filled + len(chunk)] = data
            filled += len(chunk)
        table = pd.concat(tables) if tables else read_table(f, slice(0, 0)).rename_axis("row")
        return Vectors(Path(path), table, out, read_attrs(f))


def iter_chunks(
    path: str | Path,
    representations: Sequence[str] | str | None = None,
    layers: Sequence[int] | int | None = None,
    rows: str = "ok",
    chunk_rows: int | None = None,
) -> Iterator[Vectors]:
    """`load`'s rows and vectors a slice of the file at a time: each chunk holds the kept rows of
    `chunk_rows` consecutive rows of the file (default: about 64 MiB of the chosen vectors), in file order.
    The file and the selection are checked here, before the first chunk is asked for."""
    with _open(path) as f:
        select_keys(f, path, representations, layers)
        _check_rows(rows, chunk_rows)
    return _iter_chunks(path, representations, layers, rows, chunk_rows)


def _iter_chunks(path, representations, layers, rows, chunk_rows) -> Iterator[Vectors]:
    with _open(path) as f:
        keys = select_keys(f, path, representations, layers)
        yield from _chunks(f, keys, _kept_rows(f, rows), chunk_rows or _default_chunk_rows(f, keys))


def empty_selection(
    path: str | Path, representations: Sequence[str] | None = None, layers: Sequence[int] | None = None
) -> Vectors:
    """The selection with no rows: its columns, and its vectors' widths and dtypes, read off the file."""
    with _open(path) as f:
        keys = select_keys(f, path, representations, layers)
        vectors = {vector_column(key): np.empty((0, f[key].shape[1]), f[key].dtype) for key in keys}
        return Vectors(Path(path), read_table(f, slice(0, 0)).rename_axis("row"), vectors, read_attrs(f))


def select_keys(
    f: h5py.File, path: str | Path, representations: Sequence[str] | str | None, layers: Sequence[int] | int | None
) -> list[str]:
    """The vector datasets of `f` that the selection names, in the file's order; an error naming the file
    and what it holds when a representation or layer is not there."""
    if isinstance(representations, str):  # load(path, "VT", 12): one of each, as typed
        representations = [representations]
    if isinstance(layers, (int, np.integer)):
        layers = [layers]
    present = list(vector_dims(f))
    if not present:
        raise VectorsError(f"{path} holds no vectors")
    held = {parse_key(key)[0] for key in present}
    wanted = [_representation_name(r) for r in representations] if representations is not None else None
    for name in wanted or []:
        if name not in held:
            raise VectorsError(
                f"{path} has no {REPRESENTATION_CODES[name]} vectors ({name}); it holds {_codes(present)}"
            )
    keys = [key for key in present if wanted is None or parse_key(key)[0] in wanted]
    if layers is not None:
        layers = [int(layer) for layer in layers]
        for name in dict.fromkeys(parse_key(key)[0] for key in keys if key != VISION_ONLY):  # in file order
            have = sorted(layer for rep, layer in map(parse_key, present) if rep == name)
            absent = [layer for layer in layers if layer not in have]
            if absent:
                raise VectorsError(
                    f"{path} has no {REPRESENTATION_CODES[name]} vectors at layer {', '.join(map(str, absent))}; "
                    f"its {REPRESENTATION_CODES[name]} layers are {', '.join(map(str, have))}"
                )
        keys = [key for key in keys if parse_key(key)[1] in (None, *layers)]
    if not keys:
        raise VectorsError(f"{path}: the selection names no vectors; it holds {_codes(present)}")
    return keys


def _representation_name(representation: str) -> str:
    if representation in REPRESENTATION_CODES:
        return representation
    if representation in _NAMES:
        return _NAMES[representation]
    raise VectorsError(
        f"unknown representation {representation!r}: use {', '.join(CODE_ORDER)} (or {', '.join(REPRESENTATION_CODES)})"
    )


def _codes(keys: Sequence[str]) -> str:
    """What a file holds, briefly: VF, VT layers 0, 6, 12, QT layers 0, 6, 12."""
    layers: dict[str, list] = {}
    for representation, layer in map(parse_key, keys):
        layers.setdefault(REPRESENTATION_CODES[representation], []).append(layer)
    return ", ".join(
        code if held == [None] else f"{code} layers {', '.join(map(str, held))}" for code, held in layers.items()
    )


@contextmanager
def _open(path: str | Path) -> Iterator[h5py.File]:
    """The file opened for reading; a missing or unreadable file, or one of another layout, is a
    VectorsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise VectorsError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise VectorsError(f"{path} is not a readable HDF5 file: {error}") from error
    with f:
        try:
            check_columnar(f, path)
        except ValueError as error:
            raise VectorsError(f"{error}; `load` reads the files of `vlmstates merge` and `extract-shard`") from error
        yield f


def _check_rows(rows: str, chunk_rows: int | None) -> None:
    if rows not in ROWS:
        raise VectorsError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise VectorsError(f"chunk_rows must be at least 1, got {chunk_rows}")


def _kept_rows(f: h5py.File, rows: str) -> np.ndarray:
    """A mask over the file's rows: those with status ok (the others counted in the log), or all."""
    status = f["status"].asstr()[()]
    if rows == "all":
        return np.ones(len(status), dtype=bool)
    kept = status == STATUS_OK
    if not kept.all():
        log.info("%s: %d rows that failed are left out (rows='all' keeps them)", f.filename, (~kept).sum())
    return kept


def _default_chunk_rows(f: h5py.File, keys: Sequence[str]) -> int:
    row_bytes = sum(f[key].shape[1] * f[key].dtype.itemsize for key in keys)
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _chunks(f: h5py.File, keys: Sequence[str], kept: np.ndarray, chunk_rows: int) -> Iterator[Vectors]:
    attrs = read_attrs(f)
    for start in range(0, len(kept), chunk_rows):
        rows = slice(start, min(start + chunk_rows, len(kept)))
        mask = kept[rows]
        if not mask.any():
            continue
        table = read_table(f, rows)[mask]
        table.index = pd.Index(np.arange(rows.start, rows.stop)[mask], name="row")
        every = mask.all()  # then the slice as read, without the copy that masking makes
        vectors = {vector_column(key): f[key][rows] if every else f[key][rows][mask] for key in keys}
        yield Vectors(Path(f.filename), table, vectors, attrs)
