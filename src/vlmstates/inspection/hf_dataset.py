"""An embeddings file as a Hugging Face dataset: one row per question, one array column per representation
and layer (VF, VT_layer_12, QT_layer_12, ...), beside every scalar column of the file.

Two forms, both read back by the `datasets` library equal to the HDF5:
  arrow    what `Dataset.save_to_disk` writes; read with `datasets.load_from_disk(OUT)`
  parquet  the Hub's layout, OUT/data/train-NNNNN-of-NNNNN.parquet; read with
           `datasets.load_dataset("parquet", data_dir=OUT)` (or `load_dataset(OUT)`), or upload as it is

A vector column is a fixed-length list of the dtype the HDF5 stores (float32 as the workflow writes it;
float16 and float64 are kept as they are). bfloat16 has no Arrow type, and no HDF5 file of this schema holds
it: the workflow stores bfloat16 and float16 models' vectors as float32, which holds them exactly. The
file's attributes (model, revision, layers, semantics, ...) go into the arrow form's description
(`dataset.info.description`) as JSON, and into each parquet file's schema metadata (key "vlmstates").
Written a slice of rows at a time, so memory stays at about one file; the arrow form is assembled from
Arrow stream files beside OUT, so that export briefly needs twice its size on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlmstates.store import STRING_COLUMNS
from vlmstates.vectors import Vectors, VectorsError, empty_selection, iter_chunks

FORMATS = ("arrow", "parquet")
#: How each form is read back, for the command's last line.
READ_BACK = {
    "arrow": "datasets.load_from_disk('{out}')",
    "parquet": "datasets.load_dataset('parquet', data_dir='{out}', split='train')",
}
#: Bytes of vectors per written file (save_to_disk's and the Hub's usual 500 MB shard).
SHARD_BYTES = 500 * 10**6


class ExportError(VectorsError):
    """An embeddings file cannot be exported; the message names the file and the problem."""


def export_hf_dataset(
    path: str | Path,
    out: str | Path,
    format: str = "arrow",
    representations: Sequence[str] | str | None = None,
    layers: Sequence[int] | int | None = None,
    rows: str = "all",
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write the embeddings file `path` as a Hugging Face dataset in folder `out` (replaced if present): all
    rows by default, failed ones with their status, error and NaN vectors, as the file holds them."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path, out = Path(path), Path(out)
    selection = empty_selection(path, representations, layers)
    if out.exists() and not _is_export(out):
        raise ExportError(f"{out} exists and is not an earlier export; give a new folder or remove it")
    features = _features(selection, path)
    description = json.dumps(selection.attrs, sort_keys=True, default=_plain)
    info = datasets.DatasetInfo(description=description, features=features)
    row_bytes = sum(data.shape[1] * data.dtype.itemsize for data in selection.vectors.values())
    tables = (
        _arrow_table(chunk, features)
        for chunk in iter_chunks(path, representations, layers, rows, chunk_rows=max(1, shard_bytes // row_bytes))
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if format == "parquet":
            _write_parquet(staging, tables, features, description)
        else:
            _write_arrow(staging, tables, features, info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds what an export writes (so that replacing it loses nothing else)."""
    if not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if names == {"data"}:
        return all(p.name.startswith("train-") and p.suffix == ".parquet" for p in (folder / "data").iterdir())
    return {"state.json", "dataset_info.json"} <= names and all(
        n.endswith(".arrow") for n in names - {"state.json", "dataset_info.json"}
    )


def _plain(value):
    """A numpy scalar among the attributes (a bool read back from HDF5) as the Python value JSON takes."""
    return value.item()


def _features(sample: Vectors, path: Path):
    """The dataset's columns: the file's scalar columns (strings and int64), then one fixed-length list per
    vector, of its stored dtype."""
    Value = datasets.Value
    columns = {c: Value("string" if c in STRING_COLUMNS else "int64") for c in sample.rows.columns}
    for column, data in sample.vectors.items():
        if data.dtype.kind != "f":
            raise ExportError(f"{path}: vector {column} is stored as {data.dtype}, not a float type")
        columns[column] = datasets.List(Value(data.dtype.name), length=data.shape[1])
    return datasets.Features(columns)


def _arrow_table(chunk: Vectors, features: datasets.Features) -> pa.Table:
    schema = features.arrow_schema
    arrays = [pa.array(chunk.rows[c].to_numpy(), type=schema.field(c).type) for c in chunk.rows.columns]
    for data in chunk.vectors.values():
        flat = np.ascontiguousarray(data).reshape(-1)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), data.shape[1]))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_parquet(folder: Path, tables, features: datasets.Features, description: str) -> None:
    """One parquet file per slice of rows, named as the Hub names a train split's shards."""
    data = folder / "data"
    data.mkdir(parents=True)
    metadata = {**features.arrow_schema.metadata, b"vlmstates": description.encode()}
    # dictionary encoding only where values repeat: on float vectors it doubles the writing time for nothing
    scalar = [name for name, feature in features.items() if not isinstance(feature, datasets.List)]
    written = []
    for number, table in enumerate(tables):
        written.append(data / f"part-{number}.parquet")
        pq.write_table(table.replace_schema_metadata(metadata), written[-1], use_dictionary=scalar)
    if not written:  # no rows kept: one empty file, so that the columns are still there to read
        written.append(data / "part-0.parquet")
        pq.write_table(features.arrow_schema.empty_table().replace_schema_metadata(metadata), written[-1])
    for number, part in enumerate(written):
        part.rename(data / f"train-{number:05d}-of-{len(written):05d}.parquet")


def _write_arrow(folder: Path, tables, features: datasets.Features, info: datasets.DatasetInfo) -> None:
    """Arrow stream files of the slices, memory-mapped into one dataset that `save_to_disk` writes out."""
    streams = folder.with_name(f"{folder.name}.streams")
    streams.mkdir(parents=True)
    try:
        parts = []
        for number, table in enumerate(tables):
            parts.append(_write_stream(streams / f"part-{number}.arrow", table))
        if not parts:
            parts.append(_write_stream(streams / "part-0.arrow", features.arrow_schema.empty_table()))
        pieces = [datasets.Dataset.from_file(str(part)) for part in parts]
        datasets.concatenate_datasets(pieces, info=info).save_to_disk(str(folder))
    finally:
        shutil.rmtree(streams, ignore_errors=True)


def _write_stream(path: Path, table: pa.Table) -> Path:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path
