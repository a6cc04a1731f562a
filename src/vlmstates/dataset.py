"""Validation and normalisation of a user-supplied VQA dataset, and its reports.

A dataset is a CSV file with the columns ``question_id``, ``image_id``,
``question`` and ``answer`` (aliases: ``image_name`` -> ``image_id``,
``gt_answer`` -> ``answer``) plus a folder of images.  ``image_id`` is a path
relative to that folder (subfolders allowed; the file extension may be left out),
resolved and decoded by :mod:`vlmstates.images`, as extraction later reads it.

Typical use (e.g. from a workflow script)::

    result = validate_dataset(csv_path, images_dir, strict=True, limit=None)
    write_validation_outputs(result, table_path, report_json, report_md)

or, equivalently and also writing the reports when the file cannot be read at
all, :func:`validate_and_write`.

Row numbers in all messages are 1-based *data* row numbers: the header is not
counted, blank lines are skipped, and a question spanning several lines (quoted
newline) is one row.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from vlmstates.atomic import atomic_path
from vlmstates.errors import VlmstatesError
from vlmstates.images import SUPPORTED_IMAGE_FORMATS, ImageLoadError, ImagePathError, open_rgb, resolve_image_path

__all__ = [
    "REQUIRED_COLUMNS",
    "COLUMN_ALIASES",
    "ROW_CONVENTION",
    "DatasetError",
    "Problem",
    "ValidationResult",
    "validate_dataset",
    "write_validation_outputs",
    "validate_and_write",
    "read_validated_table",
    "source_record_path",
    "read_source_record",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("question_id", "image_id", "question", "answer")
COLUMN_ALIASES: dict[str, str] = {"image_name": "image_id", "gt_answer": "answer"}

ROW_CONVENTION = (
    "row numbers are 1-based data rows: the header is not counted, blank lines are "
    "skipped, and a quoted multi-line question counts as one row"
)

_SEVERITIES = ("error", "warning")
_MD_MAX_PROBLEMS = 500


# --------------------------------------------------------------------------- errors


class DatasetError(VlmstatesError):
    """A dataset cannot be used as given.

    ``problems`` lists the problems behind the error (may be empty) and
    ``result`` holds the partial :class:`ValidationResult` when one exists, so a
    caller can still write the reports.
    """

    def __init__(self, message: str, *, problems: Iterable[Problem] = (), result: ValidationResult | None = None):
        super().__init__(message)
        self.problems = list(problems)
        self.result = result


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Question:
    """One row of a validated table, as the extraction runs it."""

    question_id: str
    image_id: str
    question: str
    answer: str


@dataclass
class Problem:
    row: int | None  # 1-based data row number (None: the file/header as a whole)
    question_id: str | None
    column: str | None
    kind: str
    message: str
    severity: str = "error"  # 'error' | 'warning'

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ValueError(f"severity must be one of {_SEVERITIES}, got {self.severity!r}")


@dataclass
class ValidationResult:
    table: pd.DataFrame
    problems: list[Problem]
    rows_read: int  # data rows in the CSV
    rows_validated: int  # rows looked at (first `limit` rows, or all)
    rows_kept: int  # rows in `table`
    rows_dropped: int  # validated rows with at least one error (not in `table`)
    strict: bool
    limit: int | None = None
    csv_path: str = ""
    images_dir: str = ""
    columns: list[str] = field(default_factory=list)
    renamed_columns: dict[str, str] = field(default_factory=dict)
    images_checked: int = 0
    fatal: bool = False  # the file could not be read as a dataset at all
    source: dict | None = None  # provenance: where the rows came from (vlmstates.sources)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when the table may be written (no fatal problem; strict: no error)."""
        if self.fatal:
            return False
        return not (self.strict and self.errors)

    def counts(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_validated": self.rows_validated,
            "rows_not_validated_due_to_limit": self.rows_read - self.rows_validated,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "images_checked": self.images_checked,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
        }


# --------------------------------------------------------------------------- CSV reading


def _row_label(row: int | None, question_id: str | None) -> str:
    if row is None:
        return "file"
    if question_id:
        return f"data row {row} (1-based, header excluded; question_id '{question_id}')"
    return f"data row {row} (1-based, header excluded)"


def _decode_csv_bytes(raw: bytes, csv_path: Path) -> str:
    base = 0
    if raw.startswith(codecs.BOM_UTF8):
        base = len(codecs.BOM_UTF8)
    try:
        return raw[base:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        line_start = raw.rfind(b"\n", 0, offset) + 1
        column = offset - line_start + 1
        bad = raw[offset : offset + max(1, min(exc.end - exc.start, 4))]
        context = raw[line_start:offset].decode("utf-8", errors="replace")[-40:]
        hint = "the file is probably Latin-1/Windows-1252; re-save it as UTF-8"
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            hint = "the file looks like UTF-16; re-save it as UTF-8"
        raise DatasetError(
            f"CSV file '{csv_path}' is not valid UTF-8: byte 0x{bad.hex()} at byte offset "
            f"{offset} (line {line}, column {column}, after {context!r}); {hint}"
        ) from None


def _read_csv_records(csv_path: Path) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """Return (header, [(data_row_number, end_line, fields), ...]); raises DatasetError."""
    try:
        raw = csv_path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"CSV file '{csv_path}' not found") from None
    except IsADirectoryError:
        raise DatasetError(f"CSV path '{csv_path}' is a directory, not a file") from None
    except OSError as exc:
        raise DatasetError(f"cannot read CSV file '{csv_path}': {exc}") from None
    text = _decode_csv_bytes(raw, csv_path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[tuple[int, int, list[str]]] = []
    try:
        for fields in reader:
            if not fields:  # blank line
                continue
            if header is None:
                header = fields
                continue
            records.append((len(records) + 1, reader.line_num, fields))
    except csv.Error as exc:
        raise DatasetError(f"CSV file '{csv_path}' is malformed near line {reader.line_num}: {exc}") from None
    if header is None:
        raise DatasetError(f"CSV file '{csv_path}' is empty (no header row)")
    return header, records


def _normalise_header(header: list[str], csv_path: Path) -> tuple[list[str], dict[str, str], list[Problem]]:
    """Strip names, name empty ones, apply aliases; raise DatasetError on fatal problems."""
    warnings: list[Problem] = []
    names: list[str] = []
    for i, name in enumerate(header, start=1):
        name = name.strip()
        if not name:
            name = f"unnamed_{i}"
            warnings.append(
                Problem(
                    None,
                    None,
                    name,
                    "unnamed_column",
                    f"column {i} of '{csv_path.name}' has no header name; carried through as '{name}'",
                    "warning",
                )
            )
        names.append(name)
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        msg = f"CSV file '{csv_path}' has duplicate column name(s): " + ", ".join(repr(d) for d in dupes)
        raise DatasetError(msg, problems=[Problem(None, None, dupes[0], "duplicate_column", msg)])
    renamed: dict[str, str] = {}
    for alias, target in COLUMN_ALIASES.items():
        if alias in names and target in names:
            msg = (
                f"CSV file '{csv_path}' has both column '{alias}' and column '{target}'; "
                f"'{alias}' is an alias of '{target}', keep only one of them"
            )
            raise DatasetError(msg, problems=[Problem(None, None, alias, "conflicting_columns", msg)])
        if alias in names:
            names[names.index(alias)] = target
            renamed[alias] = target
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        found = ", ".join(repr(h.strip()) for h in header) or "(none)"
        msg = (
            f"CSV file '{csv_path}' is missing required column(s) "
            + ", ".join(repr(m) for m in missing)
            + f"; columns found: {found}"
            + f" (required: {', '.join(REQUIRED_COLUMNS)}; aliases: "
            + ", ".join(f"{a} -> {t}" for a, t in COLUMN_ALIASES.items())
            + ")"
        )
        raise DatasetError(msg, problems=[Problem(None, None, m, "missing_column", msg) for m in missing])
    return names, renamed, warnings


# --------------------------------------------------------------------------- validation


def _check_image_file(path: Path) -> tuple[str, str] | None:
    """Return None when the image is usable, else (kind, reason)."""
    try:
        img, fmt = open_rgb(path)
    except ImageLoadError as exc:
        return "unreadable_image", exc.reason
    w, h = img.size
    img.close()
    if fmt is not None and fmt not in SUPPORTED_IMAGE_FORMATS:
        return "unsupported_format", f"image content is {fmt}, which is not a supported format"
    if w < 1 or h < 1:
        return "unreadable_image", f"image has size {w}x{h}"
    return None


def _empty_table(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=str) for c in columns}, columns=columns)


def _fatal(
    exc: DatasetError,
    *,
    csv_path: Path,
    images_dir: Path,
    strict: bool,
    limit: int | None,
    columns: list[str] | None = None,
    problems: list[Problem] | None = None,
) -> DatasetError:
    probs = list(problems or []) + (exc.problems or [Problem(None, None, None, "unreadable_csv", str(exc))])
    result = ValidationResult(
        table=_empty_table(columns or list(REQUIRED_COLUMNS)),
        problems=probs,
        rows_read=0,
        rows_validated=0,
        rows_kept=0,
        rows_dropped=0,
        strict=strict,
        limit=limit,
        csv_path=str(csv_path),
        images_dir=str(images_dir),
        columns=columns or [],
        fatal=True,
    )
    exc.problems = probs
    exc.result = result
    return exc


def validate_dataset(
    csv_path: os.PathLike | str,
    images_dir: os.PathLike | str,
    *,
    strict: bool = True,
    limit: int | None = None,
    workers: int | None = None,
    source_problems: Iterable[Problem] = (),
) -> ValidationResult:
    """Validate a VQA CSV and its images folder.

    Fatal problems (file unreadable or not UTF-8, malformed CSV, missing or conflicting
    columns, images folder missing) raise :class:`DatasetError`; its ``result`` attribute
    holds a ``fatal`` :class:`ValidationResult` for the reports.  Row-level problems are
    returned in ``result.problems``.  ``table`` holds the validated rows without errors
    (in both modes); in strict mode :func:`write_validation_outputs` refuses to write it
    when there is any error.  ``limit`` validates and keeps only the first ``limit``
    data rows.  ``workers`` threads decode images (default: up to 8).  ``source_problems`` are errors
    found while reading a dataset source (:mod:`vlmstates.sources`), e.g. an embedded image that cannot be
    decoded; they are problems of their rows, whose ``image_id`` is then left unchecked.
    """
    csv_path = Path(csv_path)
    images_dir = Path(images_dir)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    ctx = dict(csv_path=csv_path, images_dir=images_dir, strict=strict, limit=limit)

    try:
        header, records = _read_csv_records(csv_path)
    except DatasetError as exc:
        raise _fatal(exc, **ctx) from None
    try:
        names, renamed, problems = _normalise_header(header, csv_path)
    except DatasetError as exc:
        raise _fatal(exc, **ctx) from None
    if not images_dir.is_dir():
        msg = f"images folder '{images_dir}' " + ("is not a directory" if images_dir.exists() else "does not exist")
        raise _fatal(
            DatasetError(msg, problems=[Problem(None, None, None, "images_dir_missing", msg)]),
            columns=names,
            problems=problems,
            **ctx,
        ) from None

    extra = [n for n in names if n not in REQUIRED_COLUMNS]
    out_columns = list(REQUIRED_COLUMNS) + extra
    rows_read = len(records)
    if limit is not None:
        records = records[:limit]

    row_errors: dict[int, list[Problem]] = defaultdict(list)
    all_row_problems: list[Problem] = []

    def add(p: Problem) -> None:
        all_row_problems.append(p)
        if p.severity == "error":
            row_errors[p.row].append(p)

    validated_rows = {rownum for rownum, _, _ in records}
    source_image_rows = set()
    for p in source_problems:
        if p.row in validated_rows:
            add(p)
            if p.column == "image_id":
                source_image_rows.add(p.row)

    parsed: list[tuple[int, dict[str, str]]] = []
    qid_rows: dict[str, list[int]] = defaultdict(list)
    for rownum, end_line, fields in records:
        values = dict(zip(names, fields))
        qid = values.get("question_id", "")
        if len(fields) != len(names):
            add(
                Problem(
                    rownum,
                    qid or None,
                    None,
                    "malformed_row",
                    f"{_row_label(rownum, qid)} has {len(fields)} fields but the header "
                    f"has {len(names)} (row ends at line {end_line} of the file; "
                    f"unbalanced quote or unquoted comma?)",
                )
            )
            continue
        parsed.append((rownum, values))
        if qid.strip():
            qid_rows[qid].append(rownum)

    for rownum, values in parsed:
        qid = values["question_id"]
        label = _row_label(rownum, qid)
        if not qid.strip():
            add(Problem(rownum, None, "question_id", "empty_question_id", f"{label}: question_id is empty"))
        elif len(qid_rows[qid]) > 1:
            others = [r for r in qid_rows[qid] if r != rownum]
            add(
                Problem(
                    rownum,
                    qid,
                    "question_id",
                    "duplicate_question_id",
                    f"{label}: question_id '{qid}' is duplicated; also in data row(s) " + ", ".join(map(str, others)),
                )
            )
        if not values["question"].strip():
            add(Problem(rownum, qid or None, "question", "empty_question", f"{label}: question is empty"))
        if not values["answer"].strip():
            add(
                Problem(
                    rownum,
                    qid or None,
                    "answer",
                    "empty_answer",
                    f"{label}: answer is empty; the row is kept but left unjudged by the labels",
                    "warning",
                )
            )
        if not values["image_id"].strip() and rownum not in source_image_rows:
            add(Problem(rownum, qid or None, "image_id", "empty_image_id", f"{label}: image_id is empty"))

    # Resolve each distinct image_id once, then decode each distinct file once.
    id_result: dict[str, Path | ImagePathError] = {}
    for _, values in parsed:
        iid = values["image_id"]
        if iid.strip() and iid not in id_result:
            try:
                id_result[iid] = resolve_image_path(images_dir, iid)
            except ImagePathError as exc:
                id_result[iid] = exc
    files: dict[Path, Path] = {}  # real path -> first path seen
    for res in id_result.values():
        if isinstance(res, Path):
            files.setdefault(res.resolve(), res)
    n_workers = workers or min(8, os.cpu_count() or 1)
    real_paths = list(files)
    if n_workers > 1 and len(real_paths) > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            checks = list(pool.map(_check_image_file, real_paths))
    else:
        checks = [_check_image_file(p) for p in real_paths]
    file_check = dict(zip(real_paths, checks))

    for rownum, values in parsed:
        iid = values["image_id"]
        if not iid.strip() or rownum in source_image_rows:
            continue
        qid = values["question_id"]
        label = _row_label(rownum, qid)
        res = id_result[iid]
        if isinstance(res, ImagePathError):
            add(Problem(rownum, qid or None, "image_id", res.kind, f"{label}: {res}"))
            continue
        bad = file_check[res.resolve()]
        if bad is not None:
            kind, reason = bad
            add(
                Problem(
                    rownum, qid or None, "image_id", kind, f"{label}: image '{iid}' ({res}) cannot be used: {reason}"
                )
            )

    kept = [values for rownum, values in parsed if rownum not in row_errors]
    table = (
        pd.DataFrame({c: [v[c] for v in kept] for c in out_columns}, columns=out_columns, dtype=str)
        if kept
        else _empty_table(out_columns)
    )
    all_row_problems.sort(key=lambda p: (p.row or 0, 0 if p.severity == "error" else 1))
    return ValidationResult(
        table=table.reset_index(drop=True),
        problems=problems + all_row_problems,
        rows_read=rows_read,
        rows_validated=len(records),
        rows_kept=len(kept),
        rows_dropped=len(records) - len(kept),
        strict=strict,
        limit=limit,
        csv_path=str(csv_path),
        images_dir=str(images_dir),
        columns=out_columns,
        renamed_columns=renamed,
        images_checked=len(real_paths),
    )


# --------------------------------------------------------------------------- outputs


def _write_atomic(path: Path, writer) -> None:
    """Call ``writer(fileobj)`` on a temporary sibling of ``path``, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer(fh)


def _report_dict(result: ValidationResult) -> dict:
    by_kind = Counter(p.kind for p in result.problems)
    return {
        "ok": result.ok,
        "fatal": result.fatal,
        "csv_path": result.csv_path,
        "images_dir": result.images_dir,
        "source": result.source,
        "settings": {"strict": result.strict, "limit": result.limit},
        "counts": result.counts(),
        "columns": result.columns,
        "renamed_columns": result.renamed_columns,
        "row_number_convention": ROW_CONVENTION,
        "problem_counts_by_kind": dict(sorted(by_kind.items())),
        "problems": [asdict(p) for p in result.problems],
    }


def _md_cell(value) -> str:
    if value is None:
        return ""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _report_markdown(result: ValidationResult) -> str:
    c = result.counts()
    if result.fatal:
        status = "FAILED: the dataset could not be read"
    elif result.strict and result.errors:
        status = "FAILED (strict mode): fix the errors below or use lenient mode to drop those rows"
    elif result.errors:
        status = f"OK (lenient mode): {result.rows_dropped} row(s) with errors dropped"
    else:
        status = "OK"
    lines = [
        "# Dataset validation report",
        "",
        f"**Status:** {status}",
        "",
        "| Item | Value |",
        "|---|---|",
        f"| CSV | `{_md_cell(result.csv_path)}` |",
        f"| Images folder | `{_md_cell(result.images_dir)}` |",
        f"| Mode | {'strict' if result.strict else 'lenient'} |",
        f"| Limit | {result.limit if result.limit is not None else 'none'} |",
        f"| Rows read | {c['rows_read']} |",
        f"| Rows validated | {c['rows_validated']} |",
        f"| Rows kept | {c['rows_kept']} |",
        f"| Rows dropped | {c['rows_dropped']} |",
        f"| Distinct image files checked | {c['images_checked']} |",
        f"| Errors | {c['errors']} |",
        f"| Warnings | {c['warnings']} |",
    ]
    for entry in (result.source or {}).get("sources", []):
        where = entry.get("id") or entry.get("path")
        detail = ", ".join(f"{k} {entry[k]}" for k in ("name", "config", "split", "revision") if entry.get(k))
        digest = entry.get("sha256") or entry.get("dataset_fingerprint", "")
        lines.append(
            f"| Source | {_md_cell(entry['kind'])} `{_md_cell(where)}`"
            + (f" ({_md_cell(detail)})" if detail else "")
            + (f", {'sha256' if entry.get('sha256') else 'fingerprint'} `{digest}`" if digest else "")
            + " |"
        )
        if entry.get("columns"):
            lines.append(f"| Column map | `{_md_cell(json.dumps(entry['columns']))}` |")
    if result.renamed_columns:
        lines.append(
            "| Renamed columns | " + ", ".join(f"`{a}` → `{t}`" for a, t in result.renamed_columns.items()) + " |"
        )
    lines += ["", f"Note: {ROW_CONVENTION}.", ""]
    if result.problems:
        by_kind = Counter((p.severity, p.kind) for p in result.problems)
        lines += ["## Problems by kind", "", "| Severity | Kind | Count |", "|---|---|---|"]
        lines += [f"| {s} | {k} | {n} |" for (s, k), n in sorted(by_kind.items())]
        lines += [
            "",
            "## Problems",
            "",
            "| Severity | Data row | question_id | Column | Kind | Message |",
            "|---|---|---|---|---|---|",
        ]
        for p in result.problems[:_MD_MAX_PROBLEMS]:
            lines.append(
                "| "
                + " | ".join(_md_cell(x) for x in (p.severity, p.row, p.question_id, p.column, p.kind, p.message))
                + " |"
            )
        if len(result.problems) > _MD_MAX_PROBLEMS:
            lines += [
                "",
                f"… and {len(result.problems) - _MD_MAX_PROBLEMS} more problem(s); the JSON report lists them all.",
            ]
    else:
        lines.append("No problems found.")
    return "\n".join(lines) + "\n"


def _failure_message(result: ValidationResult, report_md_path: Path, report_json_path: Path) -> str:
    errors = result.errors
    if result.fatal:
        head = f"dataset '{result.csv_path}' cannot be used"
    else:
        head = (
            f"dataset validation failed in strict mode: {len(errors)} error(s) in "
            f"{result.rows_dropped} of {result.rows_validated} validated row(s) of "
            f"'{result.csv_path}'"
        )
    shown = []
    for p in errors[:5]:
        shown.append(f"  - {p.kind}: {p.message}")
    more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
    tail = (
        f"\nFull report: {report_md_path} (JSON: {report_json_path}). {ROW_CONVENTION[0].upper()}{ROW_CONVENTION[1:]}."
    )
    if not result.fatal:
        tail += " Set strict mode off (lenient) to drop these rows instead."
    return head + ":\n" + "\n".join(shown) + more + tail


def write_validation_outputs(
    result: ValidationResult,
    table_path: os.PathLike | str,
    report_json_path: os.PathLike | str,
    report_md_path: os.PathLike | str,
) -> None:
    """Write the normalised table and the JSON and Markdown reports (each atomically).

    When the result is fatal, or strict with errors, only the reports are written, a
    stale table at ``table_path`` is removed, and :class:`DatasetError` is raised.
    """
    table_path, report_json_path, report_md_path = map(Path, (table_path, report_json_path, report_md_path))
    report = _report_dict(result)
    _write_atomic(report_json_path, lambda fh: fh.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n"))
    _write_atomic(report_md_path, lambda fh: fh.write(_report_markdown(result)))
    if not result.ok:
        for stale in (table_path, source_record_path(table_path)):
            stale.unlink(missing_ok=True)
        raise DatasetError(
            _failure_message(result, report_md_path, report_json_path), problems=result.errors, result=result
        )
    table = result.table.astype(str)
    _write_atomic(source_record_path(table_path), lambda fh: fh.write(json.dumps(result.source or {}, indent=2) + "\n"))
    _write_atomic(table_path, lambda fh: table.to_csv(fh, index=False, lineterminator="\n"))


def validate_and_write(
    csv_path: os.PathLike | str,
    images_dir: os.PathLike | str,
    table_path: os.PathLike | str,
    report_json_path: os.PathLike | str,
    report_md_path: os.PathLike | str,
    *,
    strict: bool = True,
    limit: int | None = None,
    source: dict | None = None,
    source_problems: Iterable[Problem] = (),
) -> ValidationResult:
    """:func:`validate_dataset` + :func:`write_validation_outputs`; the reports are
    written even when the CSV cannot be read at all.  Raises :class:`DatasetError`.

    ``source`` is the provenance recorded in the report and beside the table (:func:`source_record_path`);
    by default the CSV's own (its SHA-256): pass a materialised source's (:mod:`vlmstates.sources`)."""
    from vlmstates.sources import csv_provenance  # the sources module builds on this one

    try:
        result = validate_dataset(csv_path, images_dir, strict=strict, limit=limit, source_problems=source_problems)
    except DatasetError as exc:
        if exc.result is None:
            raise
        result = exc.result
    if source is None and Path(csv_path).is_file():
        source = csv_provenance(csv_path, images_dir)
    result.source = source
    write_validation_outputs(result, table_path, report_json_path, report_md_path)
    return result


def read_validated_table(path: os.PathLike | str) -> pd.DataFrame:
    """Read a table written by :func:`write_validation_outputs` (all columns str)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"validated table '{path}' not found; run the validation step first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"validated table '{path}' cannot be read: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"validated table '{path}' lacks column(s) {', '.join(missing)}")
    return df


def source_record_path(table_path: os.PathLike | str) -> Path:
    """Where the provenance of a validated table is kept: beside it, ``questions.source.json``."""
    return Path(table_path).with_suffix(".source.json")


def read_source_record(table_path: os.PathLike | str) -> dict:
    """The provenance of a validated table ({} when it was not written by validation, e.g. by hand)."""
    try:
        return json.loads(source_record_path(table_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
