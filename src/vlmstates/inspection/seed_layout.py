"""The seed scripts' per-question HDF5 layout: the one module that knows it.

Files `{prefix}_embeddings_part_{NNN}.h5`, numbered from 001 as the seeds numbered them, each holding
`part_size` successfully extracted questions (the seeds' checkpoint interval; the last part holds the
rest), one group per question_id:
  question, image_id, answer, ground_truth_answer                  scalar UTF-8 strings
  vision_only_representation                                       float32 [Dv]
  {vision_token,query_token,multimodal}_representation/layer_k     float32 [D]
Groups are kept in dataset order (the file tracks creation order). File attributes: the seeds'
model_name, model_type (our family), device, dtype, created_at and num_samples; ours: part, num_parts,
layers, config_hash, source, num_failed and failed.

Failed samples get no group: the seeds never wrote one, and their readers take every group for an
answered question with vectors. A part lists the failures among its questions in the attribute `failed`
(JSON: question_id, image_id, question, ground_truth_answer, the error's first 300 characters, and the
position among the part's questions), so reading a part back restores them as failed rows, in dataset
order. A file whose samples all failed is still written, with no groups.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from vlmstates.atomic import atomic_path
from vlmstates.errors import VlmstatesError
from vlmstates.store import (
    CONFIG_HASH_ATTR,
    DEVICE_ATTR,
    DTYPE_ATTR,
    FAMILY_ATTR,
    INT_COLUMNS,
    LAYERS_ATTR,
    MODEL_ATTR,
    QUERY_TOKEN,
    STATUS_FAILED,
    STATUS_OK,
    STRING_COLUMNS,
    Embeddings,
    decode_attr,
    iter_layers,
    read_embeddings,
    vector_dims,
)

DEFAULT_PART_SIZE = 1000  # the seeds' --checkpoint-interval default
GROUP_STRINGS = ("question", "image_id", "answer", "ground_truth_answer")
_PART_NAME = re.compile(r"^(?P<prefix>.+)_embeddings_part_(?P<number>\d{3,})\.h5$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STRING = h5py.string_dtype("utf-8")
_MAX_ERROR_CHARS = 300  # keeps the `failed` attribute small; the columnar file has the whole text

# A part file's attributes beyond those it shares with the columnar file (device, dtype, layers, config_hash).
# The seeds' own: the checkpoint, the family, the time of writing, the questions stored.
MODEL_NAME_ATTR = "model_name"
MODEL_TYPE_ATTR = "model_type"
CREATED_AT_ATTR = "created_at"
NUM_SAMPLES_ATTR = "num_samples"
# Ours: the part's number and count, the columnar file it came from, its failed questions (count and JSON).
PART_ATTR = "part"
NUM_PARTS_ATTR = "num_parts"
SOURCE_ATTR = "source"
NUM_FAILED_ATTR = "num_failed"
FAILED_ATTR = "failed"
# Of a seed export read back as a whole (`SeedEmbeddings.attrs`): the layout and its part files' names.
LAYOUT_ATTR = "layout"
PARTS_ATTR = "parts"


class SeedLayoutError(VlmstatesError, ValueError):
    """A file cannot be written or read in the seed layout; the message names it."""


def part_file_name(prefix: str, number: int) -> str:
    return f"{prefix}_embeddings_part_{number:03d}.h5"


def default_prefix(model: str) -> str:
    """A file-name prefix from a model id or folder, e.g. Qwen/Qwen2.5-VL-7B-Instruct -> qwen2_5_vl_7b_instruct."""
    name = Path(model.rstrip("/")).name.lower()
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "model"


# -- writing -------------------------------------------------------------------------------------


def plan_parts(statuses: list[str], part_size: int) -> list[list[int]]:
    """Row indices per part, in order: `part_size` ok rows each; a failed row joins the part being filled."""
    parts: list[list[int]] = []
    current: list[int] = []
    ok = 0
    for row, status in enumerate(statuses):
        if status == STATUS_OK and ok == part_size:
            parts.append(current)
            current, ok = [], 0
        current.append(row)
        ok += status == STATUS_OK
    if current or not parts:
        parts.append(current)
    return parts


def export_seed_layout(
    embeddings_path: str | Path, out_dir: str | Path, prefix: str | None = None, part_size: int = DEFAULT_PART_SIZE
) -> list[Path]:
    """Write a columnar embeddings file as seed-layout parts in `out_dir`; returns the part paths.

    Parts of an earlier export with the same prefix that this one does not rewrite are removed, so the
    folder never mixes two exports.
    """
    if part_size < 1:
        raise SeedLayoutError(f"part size must be at least 1, got {part_size}")
    emb = _read_columnar(embeddings_path)
    prefix = prefix or default_prefix(str(emb.attrs.get(MODEL_ATTR, "")))
    if not _PREFIX.match(prefix):
        raise SeedLayoutError(f"prefix {prefix!r}: use letters, digits, '.', '_' or '-' (it starts a file name)")
    _check_group_names(emb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = plan_parts(emb.table["status"].tolist(), part_size)
    written = [
        _write_part(out_dir / part_file_name(prefix, number), emb, rows, number, len(parts))
        for number, rows in enumerate(parts, start=1)
    ]
    _remove_stale_parts(out_dir, prefix, written)
    return written


def _read_columnar(path: str | Path) -> Embeddings:
    try:
        return read_embeddings(path)
    except (OSError, ValueError) as error:
        raise SeedLayoutError(f"cannot read embeddings file {path}: {error}") from error


def _check_group_names(emb: Embeddings) -> None:
    ids = emb.table["question_id"]
    bad = [qid for qid in ids if "/" in qid or qid in ("", ".")]
    if bad:
        raise SeedLayoutError(
            f"{emb.path}: question_id {bad[0]!r} cannot name an HDF5 group (no '/', not empty or '.')"
        )
    duplicated = ids[ids.duplicated()].tolist()
    if duplicated:
        raise SeedLayoutError(f"{emb.path}: question_id {duplicated[0]!r} appears more than once")


def _write_part(path: Path, emb: Embeddings, rows: list[int], number: int, num_parts: int) -> Path:
    table = emb.table.iloc[rows]
    # A part's rows are contiguous in the source, so its vectors are read as one slice per dataset.
    span = slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
    vectors = {key: emb.load(key, span) for key in emb.representation_keys()}
    failed = []
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for position, row in enumerate(table.itertuples(index=False)):
            if row.status == STATUS_OK:
                _write_question(f.create_group(row.question_id), row, {k: v[position] for k, v in vectors.items()})
            else:
                failed.append(_failure_entry(row, position))
        _write_part_attrs(f, emb, number, num_parts, num_samples=len(rows) - len(failed), failed=failed)
    return path


def _failure_entry(row, position: int) -> dict:
    entry = {name: getattr(row, name) for name in ("question_id", "image_id", "question", "ground_truth_answer")}
    return entry | {"error": row.error[:_MAX_ERROR_CHARS], "position": position}


def _write_question(group: h5py.Group, row, vectors: dict[str, np.ndarray]) -> None:
    for name in GROUP_STRINGS:
        group.create_dataset(name, data=str(getattr(row, name)), dtype=_STRING)
    for key, vector in vectors.items():  # "representation/layer_k" keys create the subgroups
        group.create_dataset(key, data=vector.astype(np.float32), compression="gzip")


def _write_part_attrs(
    f: h5py.File, emb: Embeddings, number: int, num_parts: int, num_samples: int, failed: list
) -> None:
    attrs = emb.attrs
    f.attrs[MODEL_NAME_ATTR] = str(attrs.get(MODEL_ATTR, ""))
    f.attrs[MODEL_TYPE_ATTR] = str(attrs.get(FAMILY_ATTR, ""))
    f.attrs[DEVICE_ATTR] = str(attrs.get(DEVICE_ATTR, ""))
    f.attrs[DTYPE_ATTR] = str(attrs.get(DTYPE_ATTR, ""))
    f.attrs[CREATED_AT_ATTR] = pd.Timestamp.now(tz="UTC").isoformat()
    f.attrs[NUM_SAMPLES_ATTR] = num_samples
    f.attrs[NUM_FAILED_ATTR] = len(failed)
    f.attrs[FAILED_ATTR] = json.dumps(failed)
    f.attrs[PART_ATTR] = number
    f.attrs[NUM_PARTS_ATTR] = num_parts
    f.attrs[LAYERS_ATTR] = np.array(emb.layers, dtype=np.int64)
    f.attrs[CONFIG_HASH_ATTR] = str(attrs.get(CONFIG_HASH_ATTR, ""))
    f.attrs[SOURCE_ATTR] = str(emb.path)


def _remove_stale_parts(out_dir: Path, prefix: str, written: list[Path]) -> None:
    keep = {p.name for p in written}
    for path in out_dir.iterdir():
        match = _PART_NAME.match(path.name)
        if match and match["prefix"] == prefix and path.name not in keep:
            path.unlink()


# -- reading -------------------------------------------------------------------------------------


@dataclass
class SeedEmbeddings(Embeddings):
    """Seed-layout parts read into the columnar in-memory form; vectors are gathered per group on load.

    Positions and token counts are not in the seed layout: those columns hold -1.
    """

    parts: list[Path]
    locations: list[tuple[int, str] | None]  # per row: (part index, group name), None for a failed row

    def load(self, key: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        data = np.full((len(self.locations), self.vector_dims[key]), np.nan, dtype=np.float32)
        by_part: dict[int, list[tuple[int, str]]] = {}
        for row, location in enumerate(self.locations):
            if location:
                by_part.setdefault(location[0], []).append((row, location[1]))
        for index, questions in by_part.items():
            with h5py.File(self.parts[index], "r") as f:
                for row, name in questions:
                    if key in f[name]:
                        data[row] = f[name][key][()]
        return data if rows is None else data[rows]


def is_seed_layout(path: str | Path) -> bool:
    """A folder holding seed-layout parts, or one part file (seed attributes, no columnar table)."""
    path = Path(path)
    if path.is_dir():
        return bool(_part_files(path))
    try:
        with h5py.File(path, "r") as f:
            return MODEL_NAME_ATTR in f.attrs and NUM_SAMPLES_ATTR in f.attrs and "question_id" not in f
    except OSError:
        return False


def read_seed_layout(path: str | Path) -> SeedEmbeddings:
    """One part file, or a folder of the parts of one export, as one table in part order."""
    path = Path(path)
    parts = _part_files(path) if path.is_dir() else [path]
    if not parts:
        raise SeedLayoutError(f"{path}: no *_embeddings_part_NNN.h5 files")
    prefixes = sorted({_PART_NAME.match(p.name)["prefix"] for p in parts if _PART_NAME.match(p.name)})
    if len(prefixes) > 1:
        raise SeedLayoutError(f"{path}: parts of several exports ({', '.join(prefixes)}); inspect one part file")
    rows: list[dict] = []
    locations: list[tuple[int, str] | None] = []
    part_attrs = []
    for index, part in enumerate(parts):
        try:
            with h5py.File(part, "r") as f:
                part_attrs.append({name: decode_attr(value) for name, value in f.attrs.items()})
                part_rows, part_locations = _read_part_rows(f, index, part_attrs[-1])
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise SeedLayoutError(f"seed-layout file {part} is unreadable: {error}") from error
        rows += part_rows
        locations += part_locations
    table = pd.DataFrame(rows, columns=list(STRING_COLUMNS)).astype(str)
    for column in INT_COLUMNS:
        table[column] = np.full(len(table), -1, dtype=np.int64)
    dims = _vector_dims(parts, locations)
    return SeedEmbeddings(
        path=path,
        table=table,
        attrs=_merged_attrs(part_attrs, parts, dims),
        vector_dims=dims,
        parts=parts,
        locations=locations,
    )


def _part_files(folder: Path) -> list[Path]:
    """Part files by prefix, then by number (not by name: part_1000 follows part_999)."""
    numbered = [(m["prefix"], int(m["number"]), p) for p in folder.iterdir() if (m := _PART_NAME.match(p.name))]
    return [p for _, _, p in sorted(numbered)]


def _read_part_rows(f: h5py.File, index: int, attrs: dict) -> tuple[list[dict], list]:
    """The part's questions in stored order, with its failed questions put back at their positions."""
    ok_rows = [(_question_row(f[name], name), (index, name)) for name in f if isinstance(f[name], h5py.Group)]
    failed = {int(entry["position"]): entry for entry in json.loads(attrs.get(FAILED_ATTR) or "[]")}
    total = len(ok_rows) + len(failed)
    if len(failed) != int(attrs.get(NUM_FAILED_ATTR, 0)) or not all(0 <= p < total for p in failed):
        raise ValueError("attribute 'failed' does not match num_failed or the stored questions")
    remaining = iter(ok_rows)
    merged = [(_failed_row(failed[p]), None) if p in failed else next(remaining) for p in range(total)]
    return [row for row, _ in merged], [location for _, location in merged]


def _question_row(group: h5py.Group, question_id: str) -> dict:
    row = {"question_id": question_id, "status": STATUS_OK, "error": ""}
    for name in GROUP_STRINGS:
        row[name] = group[name].asstr()[()] if name in group else ""
    return row


def _failed_row(entry: dict) -> dict:
    return {name: str(entry.get(name, "")) for name in STRING_COLUMNS} | {"status": STATUS_FAILED}


def _vector_dims(parts: list[Path], locations: list) -> dict[str, int]:
    """Vector names and widths from the first stored question."""
    first = next((location for location in locations if location), None)
    if first is None:
        return {}
    with h5py.File(parts[first[0]], "r") as f:
        return vector_dims(f[first[1]])


def _merged_attrs(part_attrs: list[dict], parts: list[Path], dims: dict[str, int]) -> dict:
    attrs = dict(part_attrs[0])
    for per_part in (PART_ATTR, FAILED_ATTR, CREATED_AT_ATTR):
        attrs.pop(per_part, None)
    attrs[LAYOUT_ATTR] = "seed"
    attrs[PARTS_ATTR] = [p.name for p in parts]
    attrs[NUM_SAMPLES_ATTR] = sum(int(a.get(NUM_SAMPLES_ATTR, 0)) for a in part_attrs)
    attrs[NUM_FAILED_ATTR] = sum(int(a.get(NUM_FAILED_ATTR, 0)) for a in part_attrs)
    attrs[MODEL_ATTR] = attrs.get(MODEL_NAME_ATTR, "")
    if not attrs.get(LAYERS_ATTR):  # files of the seed scripts themselves have no layers attribute
        attrs[LAYERS_ATTR] = iter_layers(dims, QUERY_TOKEN)
    return attrs
