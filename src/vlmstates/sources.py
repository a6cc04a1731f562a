"""Dataset sources: the forms VQA benchmarks are distributed in, turned into the validated CSV + images form.

A source (config key ``dataset.source``; ``vlmstates validate --source``, ``vlmstates extract --source``) is
one of :data:`SOURCE_KINDS`:

- ``hub``: a Hugging Face Hub dataset (``id``, ``config``, ``split``, ``revision``), read with the
  ``datasets`` library, so its cache and offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) apply;
- ``parquet``: a local parquet file, or a folder of them (the Hub's layout; ``split`` picks one);
- ``disk``: a dataset written by ``Dataset.save_to_disk`` (``split`` for a ``DatasetDict``);
- ``tsv``: a VLMEvalKit TSV: ``index, image, question, answer, ...``, where ``image`` is a base64-encoded image
  or the ``index`` of the row whose image it shares;
- ``json``: a JSON list or JSON Lines file of records, whose image column holds paths in the ``images`` folder;
- ``csv``: a CSV whose image column holds paths in the ``images`` folder (today's form, with a column map).

``columns`` maps the roles ``question_id``, ``image``, ``question``, ``answer`` to the source's column names
(defaults: :data:`DEFAULT_COLUMNS`, the first name present; ``question_id: "#row"`` numbers the rows) and ``keep`` lists the other columns to carry
through (default: every other column but those holding images). A list of sources, each with a ``name``, is
one set: the rows in order. A named source's question ids are prefixed with ``<name>_`` and its rows get a
``dataset`` column holding the name.

:func:`materialise` writes the rows once into ``<folder>/questions.csv`` and the images into
``<folder>/images/``, named by the SHA-256 of their bytes (identical images stored once), and keeps
``<folder>/source.json``; a later call with the same fingerprint (the source's file contents or Hub dataset
fingerprint, its settings and column map) reuses them. Row ``N`` of the CSV is row ``N`` of the source
(of the concatenation, for a list), so the validator's row numbers name the source row; images that cannot
be read from the source are problems of their row, handed to the validator.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from vlmstates.atomic import atomic_path
from vlmstates.dataset import DatasetError, Problem, ValidationResult, validate_and_write, write_validation_outputs
from vlmstates.images import ImagePathError, resolve_image_path

__all__ = [
    "SOURCE_KINDS",
    "ROLES",
    "DEFAULT_COLUMNS",
    "Source",
    "Materialised",
    "parse_sources",
    "materialise",
    "csv_provenance",
    "load_source_setting",
    "validate_source_and_write",
]

SOURCE_KINDS = ("hub", "parquet", "disk", "tsv", "json", "csv")
ROLES = ("question_id", "image", "question", "answer")
#: Column names tried, in order, for each role when the column map leaves it out: POPE and MME
#: (question_id, image, question, answer), MathVista (pid, decoded_image: its `image` is a path),
#: VLMEvalKit (index), AMBER (id, query), and the CSV form's own names and aliases.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "question_id": ("question_id", "pid", "index", "id"),
    "image": ("decoded_image", "image", "image_id", "image_name", "image_path"),
    "question": ("question", "query"),
    "answer": ("answer", "gt_answer"),
}
#: `columns.question_id` value that numbers the rows instead (1-based, in the source's order): for a source
#: without a unique id column.
ROW_NUMBER_ID = "#row"
#: The column that names each row's source when several are combined.
DATASET_COLUMN = "dataset"
#: Bumped when the materialised form changes, so that older materialised sets are written again.
MATERIALISED_VERSION = 1
# VLMEvalKit's rule: an `image` cell this short is the index of another row, not an encoded image.
_POINTER_MAX_LENGTH = 64
_SOURCE_KEYS = {"kind", "name", "path", "id", "config", "split", "revision", "images", "columns"}
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
_TABLE_COLUMNS = ("question_id", "image_id", "question", "answer")


@dataclass(frozen=True)
class Source:
    """One dataset source, as the config's `dataset.source` entry gives it."""

    kind: str
    path: str | None = None
    id: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    images: str | None = None
    columns: dict = field(default_factory=dict)
    name: str | None = None

    @property
    def label(self) -> str:
        where = self.id if self.kind == "hub" else self.path
        return f"{self.kind} source '{where}'" + (f" (split {self.split})" if self.split else "")

    def record(self) -> dict:
        """The settings that identify this source (no None values)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


@dataclass
class Materialised:
    """A source written as the validated form: the CSV, its images folder, provenance and row problems."""

    csv: Path
    images: Path
    provenance: dict
    problems: list[Problem]
    reused: bool = False


def parse_sources(value) -> list[Source]:
    """The config's `dataset.source` (one mapping, or a list of mappings with a `name` each) as Sources."""
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise DatasetError("dataset.source: an empty list; give one source or several, each with a name")
    sources = [_parse_source(entry, i if isinstance(value, list) else None) for i, entry in enumerate(entries)]
    if len(sources) > 1:
        names = [s.name for s in sources]
        if None in names:
            raise DatasetError("dataset.source: a list of sources needs a `name` for each (its `dataset` column)")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise DatasetError(f"dataset.source: the name(s) {', '.join(repeated)} are given to several sources")
    return sources


def _parse_source(entry, index: int | None) -> Source:
    where = "dataset.source" + (f"[{index}]" if index is not None else "")
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected a mapping with `kind`, got {entry!r}")
    unknown = sorted(set(entry) - _SOURCE_KEYS)
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_SOURCE_KEYS))})")
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise DatasetError(f"{where}.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    needed = {"hub": ("id",), "json": ("path", "images"), "csv": ("path", "images")}.get(kind, ("path",))
    missing = [key for key in needed if not entry.get(key)]
    if missing:
        raise DatasetError(f"{where}: kind {kind} needs {' and '.join(missing)}")
    columns = dict(entry.get("columns") or {})
    unknown = sorted(set(columns) - set(ROLES) - {"keep"})
    if unknown:
        raise DatasetError(f"{where}.columns: unknown role(s) {', '.join(unknown)} (roles: {', '.join(ROLES)}, keep)")
    return Source(**{**entry, "columns": columns})


# --------------------------------------------------------------------------- reading rows


@dataclass
class _Rows:
    """A source's rows (dicts, in order) and how to get a row's image."""

    rows: Sequence[dict]  # a list, or a datasets.Dataset
    columns: list[str]
    image_columns: set[str]  # columns whose cells hold images (not carried through as text)
    fingerprint: dict


def _read_source(source: Source) -> _Rows:
    if source.kind in ("hub", "parquet", "disk"):
        return _read_arrow(source)
    if source.kind == "tsv":
        frame = _read_text_table(Path(source.path), sep="\t")
        return _Rows(frame.to_dict("records"), list(frame.columns), set(), _file_fingerprint(source))
    if source.kind == "csv":
        frame = _read_text_table(Path(source.path), sep=",")
        return _Rows(frame.to_dict("records"), list(frame.columns), set(), _file_fingerprint(source))
    records = _read_json_records(Path(source.path))
    columns = list(dict.fromkeys(k for r in records for k in r))
    return _Rows(records, columns, set(), _file_fingerprint(source))


def _read_text_table(path: Path, sep: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"source file '{path}' not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"source file '{path}' cannot be read as a table: {exc}") from None


def _read_json_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"source file '{path}' not found") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"source file '{path}' is not UTF-8: {exc}") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"source file '{path}' is not JSON or JSON Lines: {exc}") from None
    bad = next((i for i, r in enumerate(records, start=1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DatasetError(f"source file '{path}': record {bad} is not an object (a mapping of column to value)")
    return records


def _read_arrow(source: Source) -> _Rows:
    import datasets  # imported only for these kinds: the CSV form needs no Arrow

    try:
        if source.kind == "hub":
            loaded = datasets.load_dataset(source.id, source.config, split=source.split, revision=source.revision)
        elif source.kind == "disk":
            loaded = datasets.load_from_disk(source.path)
        elif Path(source.path).is_dir():
            loaded = datasets.load_dataset(source.path, split=source.split)
        else:
            loaded = datasets.load_dataset("parquet", data_files=source.path, split="train")
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DatasetError(f"{source.label} cannot be loaded: {exc}") from None
    dataset = _one_split(loaded, source)
    image_columns = {name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)}
    # the encoded bytes as stored, decoded by the image store (a bad image becomes a problem of its row)
    for name in image_columns:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    fingerprint = {"dataset_fingerprint": dataset._fingerprint}
    if source.kind != "hub":
        fingerprint |= _file_fingerprint(source)
    # the Dataset itself: its rows are read from Arrow one at a time, not held in memory with their images
    return _Rows(dataset, list(dataset.column_names), image_columns, fingerprint)


def _one_split(loaded, source: Source):
    if not hasattr(loaded, "keys"):  # a Dataset: the split was chosen
        return loaded
    splits = list(loaded.keys())
    if source.split in splits:
        return loaded[source.split]
    if source.split is None and len(splits) == 1:
        return loaded[splits[0]]
    raise DatasetError(f"{source.label}: choose a split with `split` (found: {', '.join(splits)})")


def _file_fingerprint(source: Source) -> dict:
    """SHA-256 of the source's file (or every file of its folder), and of its images folder's listing."""
    path = Path(source.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    record = {"sha256": digest.hexdigest()}
    if source.images:
        record["images_listing_sha256"] = _listing_digest(Path(source.images))
    return record


def _listing_digest(folder: Path) -> str:
    """A digest of a folder's files' names, sizes and modification times (cheaper than their contents)."""
    digest = hashlib.sha256()
    if folder.is_dir():
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the column map


def _column_map(source: Source, columns: list[str], image_columns: set[str]) -> tuple[dict, list[str], dict]:
    """(role -> column, columns kept, columns left out -> why); raises DatasetError for a missing column."""
    given = source.columns
    found = ", ".join(columns) or "(none)"
    roles = {}
    for role in ROLES:
        if role == "question_id" and given.get(role) == ROW_NUMBER_ID:
            roles[role] = ROW_NUMBER_ID
            continue
        if given.get(role):
            if given[role] not in columns:
                raise DatasetError(
                    f"{source.label}: column '{given[role]}' (columns.{role}) is not in the source; "
                    f"columns found: {found}"
                )
            roles[role] = given[role]
            continue
        match = next((c for c in DEFAULT_COLUMNS[role] if c in columns), None)
        if match is None:
            raise DatasetError(
                f"{source.label} has no {role} column (tried {', '.join(DEFAULT_COLUMNS[role])}); "
                f"columns found: {found}; name it with columns.{role}"
            )
        roles[role] = match
    used = set(roles.values())
    reserved = set(_TABLE_COLUMNS) | {DATASET_COLUMN}
    if "keep" in given:
        keep = list(given["keep"] or [])
        absent = [c for c in keep if c not in columns]
        if absent:
            raise DatasetError(f"{source.label}: columns.keep names {', '.join(absent)}, not in the source: {found}")
        clash = [c for c in keep if c in reserved or c in used]
        if clash:
            raise DatasetError(f"{source.label}: columns.keep cannot keep {', '.join(clash)} (a role or table column)")
    else:
        keep = [c for c in columns if c not in used and c not in image_columns and c not in reserved]
    left_out = {}
    for column in columns:
        if column in used or column in keep:
            continue
        left_out[column] = "holds images" if column in image_columns else "not in columns.keep"
        if column in reserved and column not in image_columns:
            left_out[column] = "its name is a column of the validated table"
    return roles, keep, left_out


# --------------------------------------------------------------------------- images


class _ImageStore:
    """Writes images into one folder under the SHA-256 of their bytes; identical images are stored once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: dict[str, str] = {}

    def put_bytes(self, data: bytes) -> str:
        """The stored image's name; raises ValueError when the bytes are no image that can be decoded."""
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.names:
            return self.names[digest]
        try:
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"the embedded image cannot be decoded ({exc})") from None
        name = digest[:32] + _EXTENSIONS.get(image_format, f".{(image_format or 'img').lower()}")
        target = self.folder / name
        if not target.exists():
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        self.names[digest] = name
        return name

    def put_file(self, path: Path) -> str:
        return self.put_bytes(path.read_bytes())


def _image_bytes(value, source: Source, rows_by_index: dict, column: str) -> bytes | Path:
    """A cell of the image column as bytes (embedded) or a file path (a path in the images folder)."""
    if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes", "path"}
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path") or ""
    if isinstance(value, bytes):
        return value
    text = str(value or "").strip()
    if not text:
        raise ValueError(f"column '{column}' is empty")
    if source.kind == "tsv" and not source.images:
        if len(text) <= _POINTER_MAX_LENGTH:
            target = rows_by_index.get(text)
            if target is None:
                raise ValueError(f"column '{column}' points to row index '{text}', which is not in the file")
            text = str(target.get(column, "")).strip()
            if len(text) <= _POINTER_MAX_LENGTH:
                raise ValueError(f"column '{column}' points to row index '{value}', whose image is itself a pointer")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"column '{column}' is neither base64 image data nor a row index") from None
    if not source.images:
        raise ValueError(f"column '{column}' holds a path ('{text}'); give the source an `images` folder")
    try:
        return resolve_image_path(source.images, text)
    except ImagePathError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------- materialising


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _source_rows(source: Source, store: _ImageStore, first_row: int, prefix: str) -> tuple[list[dict], dict, list]:
    """The table rows of one source, its provenance entry and its row problems."""
    read = _read_source(source)
    roles, keep, left_out = _column_map(source, read.columns, read.image_columns)
    qid_column, image_column = roles["question_id"], roles["image"]
    # VLMEvalKit's image pointers name a row by its `index`
    pointer_column = "index" if "index" in read.columns else qid_column
    rows_by_index = {_cell(r.get(pointer_column)): r for r in read.rows} if source.kind == "tsv" else {}
    table, problems = [], []
    for offset, row in enumerate(read.rows):
        rownum = first_row + offset
        qid = str(offset + 1) if qid_column == ROW_NUMBER_ID else _cell(row.get(qid_column)).strip()
        out = {
            "question_id": f"{prefix}{qid}" if qid else "",
            "image_id": "",
            "question": _cell(row.get(roles["question"])),
            "answer": _cell(row.get(roles["answer"])),
        }
        out |= {c: _cell(row.get(c)) for c in keep}
        if prefix:
            out[DATASET_COLUMN] = source.name
        try:
            image = _image_bytes(row.get(image_column), source, rows_by_index, image_column)
            out["image_id"] = store.put_file(image) if isinstance(image, Path) else store.put_bytes(image)
        except ValueError as exc:
            label = f"data row {rownum} (1-based; row {offset + 1} of {source.label}, question_id '{qid}')"
            problems.append(
                Problem(rownum, out["question_id"] or None, "image_id", "bad_source_image", f"{label}: {exc}")
            )
        table.append(out)
    provenance = {
        **source.record(),
        "columns": {**roles, "keep": keep},
        "columns_left_out": left_out,
        "rows": len(read.rows),
        **read.fingerprint,
    }
    return table, provenance, problems


def _fingerprint(sources: list[Source]) -> str:
    settings = [s.record() for s in sources]
    return hashlib.sha256(json.dumps([MATERIALISED_VERSION, settings], sort_keys=True).encode()).hexdigest()


def materialise(sources: Source | Iterable[Source], folder: os.PathLike | str) -> Materialised:
    """Write the source(s) into `folder` (questions.csv, images/, source.json), or reuse what is there
    when the fingerprint is unchanged. Raises DatasetError when a source cannot be read or mapped."""
    sources = [sources] if isinstance(sources, Source) else list(sources)
    folder = Path(folder)
    csv_path, images, record_path = folder / "questions.csv", folder / "images", folder / "source.json"
    settings_fingerprint = _fingerprint(sources)
    reusable = _reusable(record_path, csv_path, settings_fingerprint)
    if reusable is not None and not _source_changed(sources, reusable):
        return Materialised(csv_path, images, reusable["provenance"], _problems(reusable["problems"]), reused=True)

    staging = folder / "images.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    store = _ImageStore(staging)
    rows, entries, problems = [], [], []
    for source in sources:
        prefix = f"{source.name}_" if source.name else ""
        table, entry, found = _source_rows(source, store, len(rows) + 1, prefix)
        rows += table
        entries.append(entry)
        problems += found
    columns = list(dict.fromkeys(c for row in rows for c in row)) or list(_TABLE_COLUMNS)
    frame = pd.DataFrame([{c: row.get(c, "") for c in columns} for row in rows], columns=columns, dtype=str)
    shutil.rmtree(images, ignore_errors=True)
    staging.rename(images)
    with atomic_path(csv_path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        frame.to_csv(fh, index=False, lineterminator="\n")
    provenance = {"sources": entries, "fingerprint": settings_fingerprint, "images_stored": len(store.names)}
    record = {"provenance": provenance, "problems": [asdict(p) for p in problems]}
    with atomic_path(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Materialised(csv_path, images, provenance, problems)


def _reusable(record_path: Path, csv_path: Path, settings_fingerprint: str) -> dict | None:
    if not (record_path.is_file() and csv_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("provenance", {}).get("fingerprint") == settings_fingerprint else None


def _source_changed(sources: list[Source], record: dict) -> bool:
    """Whether a source's contents differ from those materialised (file hashes; a Hub dataset's fingerprint)."""
    for source, entry in zip(sources, record["provenance"]["sources"]):
        if source.kind == "hub":
            current = {"dataset_fingerprint": _read_arrow(source).fingerprint["dataset_fingerprint"]}
        else:
            current = _file_fingerprint(source)
        if any(entry.get(key) != value for key, value in current.items()):
            return True
    return False


def _problems(records: Iterator[dict]) -> list[Problem]:
    return [Problem(**p) for p in records]


def csv_provenance(csv_path: os.PathLike | str, images_dir: os.PathLike | str) -> dict:
    """The provenance of today's form, a CSV and its images folder: the CSV's SHA-256."""
    source = Source(kind="csv", path=str(csv_path), images=str(images_dir))
    return {"sources": [{**source.record(), **_file_fingerprint(source)}]}


def load_source_setting(text: str):
    """The `--source` option's value: a YAML or JSON file, or the mapping (or list) itself as YAML/JSON text."""
    import yaml

    path = Path(text)
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8") if path.is_file() else text)
    except yaml.YAMLError as exc:
        raise DatasetError(f"--source {text!r} is neither a YAML/JSON file nor YAML/JSON text: {exc}") from None
    if isinstance(value, dict) and "source" in value and "kind" not in value:
        value = value["source"]  # a config's `dataset` section
    return value


def validate_source_and_write(
    value,
    folder: os.PathLike | str,
    table_path: os.PathLike | str,
    report_json_path: os.PathLike | str,
    report_md_path: os.PathLike | str,
    *,
    strict: bool = True,
    limit: int | None = None,
) -> tuple[ValidationResult, Materialised]:
    """Materialise the source(s) of `value` (the config's `dataset.source`) into `folder`, then validate
    them as :func:`vlmstates.dataset.validate_and_write` does, recording the provenance. A source that
    cannot be read or mapped still gets its reports, then raises DatasetError."""
    folder = Path(folder)
    try:
        sources = parse_sources(value)
        materialised = materialise(sources, folder)
    except DatasetError as exc:
        result = ValidationResult(
            table=pd.DataFrame({c: pd.Series([], dtype=str) for c in _TABLE_COLUMNS}),
            problems=exc.problems or [Problem(None, None, None, "unreadable_source", str(exc))],
            rows_read=0,
            rows_validated=0,
            rows_kept=0,
            rows_dropped=0,
            strict=strict,
            limit=limit,
            csv_path=str(folder / "questions.csv"),
            images_dir=str(folder / "images"),
            fatal=True,
            source={"setting": value},
        )
        write_validation_outputs(result, table_path, report_json_path, report_md_path)
        raise exc  # not reached: write_validation_outputs raises for a fatal result
    result = validate_and_write(
        materialised.csv,
        materialised.images,
        table_path,
        report_json_path,
        report_md_path,
        strict=strict,
        limit=limit,
        source=materialised.provenance,
        source_problems=materialised.problems,
    )
    return result, materialised
