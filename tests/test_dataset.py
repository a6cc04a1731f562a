"""Tests for vlmstates.dataset (validation, image loading) and vlmstates.demo.dataset."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmstates.dataset import (
    REQUIRED_COLUMNS,
    DatasetError,
    Problem,
    ValidationResult,
    read_validated_table,
    validate_and_write,
    validate_dataset,
    write_validation_outputs,
)
from vlmstates.demo.dataset import COLORS, write_demo_dataset
from vlmstates.images import SUPPORTED_IMAGE_EXTENSIONS, ImageLoadError, ImagePathError, load_image, resolve_image_path

HEADER = "question_id,image_id,question,answer\n"


# ----------------------------------------------------------------------------- helpers


def make_image(path: Path, size=(8, 6), color=(200, 30, 30), mode="RGB", fmt=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **save)
    return path


def noise_image(path: Path, size=(64, 64), fmt=None, **save) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **save)
    return path


def dataset(
    tmp_path: Path, rows: list[tuple], header: str = HEADER, images=("a.png", "b.png"), raw: bytes | None = None
) -> tuple[Path, Path]:
    """Write questions.csv (rows as CSV, or raw bytes) and an images folder with valid PNGs."""
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    for name in images:
        make_image(images_dir / name)
    csv_path = tmp_path / "questions.csv"
    if raw is None:
        buf = io.StringIO()
        buf.write(header)
        csv.writer(buf, lineterminator="\n").writerows(rows)
        raw = buf.getvalue().encode("utf-8")
    csv_path.write_bytes(raw)
    return csv_path, images_dir


GOOD = [("001", "a.png", "Is it red?", "yes"), ("002", "b.png", "Is it blue?", "no")]


def only(result: ValidationResult, kind: str) -> list[Problem]:
    return [p for p in result.problems if p.kind == kind]


def outputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    out = tmp_path / "out"
    return out / "table.csv", out / "report.json", out / "report.md"


def one_bad_row(tmp_path, bad_row, kind, *, images=("a.png", "b.png"), setup=None) -> Problem:
    """Dataset = GOOD + bad_row (data row 3); lenient keeps GOOD and reports exactly one
    error of `kind` for row 3; strict raises on write and names row, id and kind."""
    csv_path, images_dir = dataset(tmp_path, GOOD + [bad_row], images=images)
    if setup:
        setup(images_dir)
    lenient = validate_dataset(csv_path, images_dir, strict=False)
    errors = lenient.errors
    assert [(p.row, p.kind) for p in errors] == [(3, kind)], errors
    assert list(lenient.table.question_id) == ["001", "002"]
    assert (lenient.rows_read, lenient.rows_kept, lenient.rows_dropped) == (3, 2, 1)

    strict = validate_dataset(csv_path, images_dir, strict=True)
    assert not strict.ok
    table, rjson, rmd = outputs(tmp_path)
    with pytest.raises(DatasetError) as ei:
        write_validation_outputs(strict, table, rjson, rmd)
    msg = str(ei.value)
    assert f"{kind}: data row 3 (1-based" in msg and str(rmd) in msg
    if bad_row[0]:
        assert f"'{bad_row[0]}'" in msg
    assert not table.exists()
    report = json.loads(rjson.read_text())
    assert report["ok"] is False
    assert [(p["row"], p["kind"], p["severity"]) for p in report["problems"]] == [(3, kind, "error")]
    assert kind in rmd.read_text()
    return errors[0]


# ----------------------------------------------------------------------------- bad input


def test_missing_column_is_fatal_and_names_missing_and_found(tmp_path):
    csv_path, images_dir = dataset(tmp_path, [("001", "a.png", "Q?")], header="question_id,image_id,question\n")
    with pytest.raises(DatasetError) as ei:
        validate_dataset(csv_path, images_dir)
    msg = str(ei.value)
    assert "'answer'" in msg and "columns found: 'question_id', 'image_id', 'question'" in msg
    assert str(csv_path) in msg
    result = ei.value.result
    assert result.fatal and not result.ok
    assert [(p.kind, p.column) for p in result.problems] == [("missing_column", "answer")]
    # the reports are still written, no table
    table, rjson, rmd = outputs(tmp_path)
    with pytest.raises(DatasetError, match="missing required column"):
        validate_and_write(csv_path, images_dir, table, rjson, rmd)
    assert not table.exists()
    assert json.loads(rjson.read_text())["problems"][0]["kind"] == "missing_column"


def test_duplicate_question_id_reports_each_row(tmp_path):
    rows = GOOD + [("001", "b.png", "Is it round?", "no"), ("003", "a.png", "Q?", "yes")]
    csv_path, images_dir = dataset(tmp_path, rows)
    result = validate_dataset(csv_path, images_dir, strict=False)
    dups = only(result, "duplicate_question_id")
    assert [(p.row, p.question_id, p.column) for p in dups] == [(1, "001", "question_id"), (3, "001", "question_id")]
    assert "data row 1" in dups[0].message and "also in data row(s) 3" in dups[0].message
    assert "data row 3" in dups[1].message and "also in data row(s) 1" in dups[1].message
    assert list(result.table.question_id) == ["002", "003"]


def test_empty_question(tmp_path):
    p = one_bad_row(tmp_path, ("003", "a.png", "   ", "yes"), "empty_question")
    assert p.column == "question" and "question is empty" in p.message


def test_empty_image_id(tmp_path):
    p = one_bad_row(tmp_path, ("003", "", "Q?", "yes"), "empty_image_id")
    assert p.column == "image_id"


def test_empty_question_id(tmp_path):
    p = one_bad_row(tmp_path, ("", "a.png", "Q?", "yes"), "empty_question_id")
    assert p.question_id is None


def test_empty_answer_is_a_warning_and_kept(tmp_path):
    csv_path, images_dir = dataset(tmp_path, GOOD + [("003", "a.png", "Q?", "")])
    result = validate_dataset(csv_path, images_dir, strict=True)
    assert result.ok and result.errors == []
    [w] = result.warnings
    assert (w.row, w.kind, w.severity, w.column) == (3, "empty_answer", "warning", "answer")
    assert list(result.table.answer) == ["yes", "no", ""]
    table, rjson, rmd = outputs(tmp_path)
    write_validation_outputs(result, table, rjson, rmd)
    assert read_validated_table(table).answer.tolist() == ["yes", "no", ""]
    assert json.loads(rjson.read_text())["counts"]["warnings"] == 1


def test_missing_image(tmp_path):
    p = one_bad_row(tmp_path, ("003", "nope.png", "Q?", "yes"), "missing_image")
    assert "'nope.png' not found" in p.message and p.column == "image_id"


def test_unreadable_image_random_bytes(tmp_path):
    def setup(d):
        (d / "junk.png").write_bytes(np.random.default_rng(1).bytes(500))

    p = one_bad_row(tmp_path, ("003", "junk.png", "Q?", "yes"), "unreadable_image", setup=setup)
    assert "junk.png" in p.message
    with pytest.raises(ImageLoadError, match="junk.png") as ei:
        load_image(tmp_path / "images" / "junk.png")
    assert isinstance(ei.value, ValueError)


def test_zero_byte_image(tmp_path):
    def setup(d):
        (d / "empty.jpg").write_bytes(b"")

    p = one_bad_row(tmp_path, ("003", "empty.jpg", "Q?", "yes"), "unreadable_image", setup=setup)
    assert "empty.jpg" in p.message and "0 bytes" in p.message


@pytest.mark.parametrize("name,fmt", [("cut.png", "PNG"), ("cut.jpg", "JPEG")])
def test_truncated_image(tmp_path, name, fmt):
    def setup(d):
        full = noise_image(d / ("full_" + name), fmt=fmt)
        data = full.read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])

    p = one_bad_row(tmp_path, ("003", name, "Q?", "yes"), "unreadable_image", setup=setup)
    assert name in p.message
    with pytest.raises(ImageLoadError, match=re.escape(name)):
        load_image(tmp_path / "images" / name)


@pytest.mark.parametrize("image_id", ["../x.png", "sub/../../x.png", "..\\x.png"])
def test_path_traversal_dotdot(tmp_path, image_id):
    make_image(tmp_path / "x.png")  # exists outside the images folder
    p = one_bad_row(tmp_path, ("003", image_id, "Q?", "yes"), "path_traversal")
    assert "'..'" in p.message and image_id in p.message


def test_path_traversal_absolute(tmp_path):
    outside = make_image(tmp_path / "x.png")
    p = one_bad_row(tmp_path, ("003", str(outside), "Q?", "yes"), "path_traversal")
    assert "absolute path" in p.message
    with pytest.raises(ImagePathError, match="absolute") as ei:
        resolve_image_path(tmp_path / "images", str(outside))
    assert ei.value.kind == "path_traversal"


def test_path_traversal_symlink_outside(tmp_path):
    outside = make_image(tmp_path / "secret.png")

    def setup(d):
        (d / "link.png").symlink_to(outside)

    p = one_bad_row(tmp_path, ("003", "link.png", "Q?", "yes"), "path_traversal", setup=setup)
    assert "outside the images folder" in p.message


def test_unsupported_extension(tmp_path):
    def setup(d):
        (d / "notes.txt").write_text("hello")

    p = one_bad_row(tmp_path, ("003", "notes.txt", "Q?", "yes"), "unsupported_format", setup=setup)
    assert "'.txt'" in p.message


def test_unsupported_content_format(tmp_path):
    def setup(d):
        Image.new("RGB", (16, 16), (1, 2, 3)).save(d / "icon.png", format="ICO")

    p = one_bad_row(tmp_path, ("003", "icon.png", "Q?", "yes"), "unsupported_format", setup=setup)
    assert "ICO" in p.message


def test_directory_named_like_an_image(tmp_path):
    def setup(d):
        (d / "folder.png").mkdir()

    p = one_bad_row(tmp_path, ("003", "folder.png", "Q?", "yes"), "not_a_file", setup=setup)
    assert "directory" in p.message and "folder.png" in p.message


def test_non_utf8_csv_bytes(tmp_path):
    raw = HEADER.encode() + b"001,a.png,Is it caf\xe9?,yes\n"
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    with pytest.raises(DatasetError) as ei:
        validate_dataset(csv_path, images_dir)
    msg = str(ei.value)
    offset = raw.index(b"\xe9")
    assert str(csv_path) in msg and f"byte offset {offset}" in msg and "line 2" in msg and "0xe9" in msg
    [p] = ei.value.result.problems
    assert p.row is None and p.severity == "error" and f"byte offset {offset}" in p.message


def test_malformed_row_wrong_field_count(tmp_path):
    raw = (HEADER + "001,a.png,Is it red?,yes\n002,b.png,Is it, blue?,no\n").encode()
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    result = validate_dataset(csv_path, images_dir, strict=False)
    [p] = result.errors
    assert (p.row, p.kind, p.question_id) == (2, "malformed_row", "002")
    assert "5 fields" in p.message and "line 3" in p.message
    assert list(result.table.question_id) == ["001"]


def test_alias_columns_are_renamed(tmp_path):
    csv_path, images_dir = dataset(
        tmp_path,
        GOOD,
        header="question_id,image_name,question,gt_answer,split\n",
        raw=b"question_id,image_name,question,gt_answer,split\n001,a.png,Q?,yes,val\n",
    )
    result = validate_dataset(csv_path, images_dir)
    assert result.ok and result.problems == []
    assert result.renamed_columns == {"image_name": "image_id", "gt_answer": "answer"}
    assert list(result.table.columns) == ["question_id", "image_id", "question", "answer", "split"]
    assert result.table.iloc[0].tolist() == ["001", "a.png", "Q?", "yes", "val"]
    table, rjson, rmd = outputs(tmp_path)
    write_validation_outputs(result, table, rjson, rmd)
    assert json.loads(rjson.read_text())["renamed_columns"] == {"image_name": "image_id", "gt_answer": "answer"}
    assert "`image_name` → `image_id`" in rmd.read_text()


def test_alias_and_target_both_present_is_fatal(tmp_path):
    raw = b"question_id,image_id,image_name,question,answer\n001,a.png,a.png,Q?,yes\n"
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    with pytest.raises(DatasetError) as ei:
        validate_dataset(csv_path, images_dir)
    assert "'image_name'" in str(ei.value) and "'image_id'" in str(ei.value)
    [p] = ei.value.result.problems
    assert (p.kind, p.column) == ("conflicting_columns", "image_name")


def test_duplicate_header_is_fatal(tmp_path):
    raw = b"question_id,image_id,question,answer,answer\n001,a.png,Q?,yes,no\n"
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    with pytest.raises(DatasetError, match="duplicate column name"):
        validate_dataset(csv_path, images_dir)


def test_images_folder_missing_is_fatal(tmp_path):
    csv_path, _ = dataset(tmp_path, GOOD)
    with pytest.raises(DatasetError, match="does not exist") as ei:
        validate_dataset(csv_path, tmp_path / "nowhere")
    assert ei.value.result.problems[0].kind == "images_dir_missing"


def test_empty_csv_is_fatal(tmp_path):
    csv_path, images_dir = dataset(tmp_path, [], raw=b"")
    with pytest.raises(DatasetError, match="empty"):
        validate_dataset(csv_path, images_dir)


# ----------------------------------------------------------------------------- CSV positives


def test_bom_crlf_quoted_commas_newlines_and_leading_zeros(tmp_path):
    text = (
        "question_id,image_id,question,answer,extra\r\n"
        '007,a.png,"Is it red, or blue?",yes,NA\r\n'
        "\r\n"
        '0010,b.png,"Line one\r\nline two ""quoted""",no,\r\n'
    )
    raw = b"\xef\xbb\xbf" + text.encode("utf-8")
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    result = validate_dataset(csv_path, images_dir)
    assert result.ok and result.errors == []
    t = result.table
    assert list(t.columns) == ["question_id", "image_id", "question", "answer", "extra"]
    assert t.question_id.tolist() == ["007", "0010"]
    assert t.question.tolist() == ["Is it red, or blue?", 'Line one\r\nline two "quoted"']
    assert t.extra.tolist() == ["NA", ""]
    assert all(isinstance(v, str) for v in t.to_numpy().ravel())
    table, rjson, rmd = outputs(tmp_path)
    write_validation_outputs(result, table, rjson, rmd)
    back = read_validated_table(table)
    assert back.question_id.tolist() == ["007", "0010"]
    assert back.extra.tolist() == ["NA", ""]
    assert back.question.tolist() == ["Is it red, or blue?", 'Line one\r\nline two "quoted"']
    assert table.read_bytes().startswith(b"question_id,")  # UTF-8 without BOM


def test_column_order_and_extra_columns_carried(tmp_path):
    raw = b"answer,notes,image_id,question_id,question\nyes,n1,a.png,1,Q?\n"
    csv_path, images_dir = dataset(tmp_path, [], raw=raw)
    t = validate_dataset(csv_path, images_dir).table
    assert list(t.columns) == ["question_id", "image_id", "question", "answer", "notes"]
    assert t.iloc[0].tolist() == ["1", "a.png", "Q?", "yes", "n1"]


# ----------------------------------------------------------------------------- image paths


def test_resolve_subfolders_and_missing_extension(tmp_path):
    d = tmp_path / "images"
    make_image(d / "sub" / "COCO_1.jpg", fmt="JPEG")
    make_image(d / "noext_target.PNG", fmt="PNG")
    assert resolve_image_path(d, "sub/COCO_1.jpg") == d / "sub" / "COCO_1.jpg"
    assert resolve_image_path(d, "sub/COCO_1") == d / "sub" / "COCO_1.jpg"
    assert resolve_image_path(d, "noext_target") == d / "noext_target.PNG"
    make_image(d / "sub" / "COCO_1.png")
    with pytest.raises(ImagePathError, match="several files") as ei:
        resolve_image_path(d, "sub/COCO_1")
    assert ei.value.kind == "ambiguous_image"
    assert ".png" in SUPPORTED_IMAGE_EXTENSIONS and ".tiff" in SUPPORTED_IMAGE_EXTENSIONS


def test_images_shared_by_questions_checked_once(tmp_path):
    rows = [(f"{i:03d}", "a" if i % 2 else "a.png", "Q?", "yes") for i in range(1, 11)]
    csv_path, images_dir = dataset(tmp_path, rows)
    result = validate_dataset(csv_path, images_dir)
    assert result.ok and result.rows_kept == 10 and result.images_checked == 1


# ----------------------------------------------------------------------------- image loading


def test_cmyk_jpeg(tmp_path):
    p = make_image(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), fmt="JPEG", quality=95)
    assert Image.open(p).mode == "CMYK"
    img = load_image(p)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((4, 3))
    assert r > 230 and g < 30 and b < 30


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    img = load_image(p)
    assert img.mode == "RGB"
    values = [img.getpixel((x, 0)) for x in range(4)]
    assert values == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_palette_png_with_transparency_on_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    img = load_image(p)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (10, 200, 30)


@pytest.mark.parametrize(
    "mode,color,expected",
    [
        ("RGBA", (0, 0, 255, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_alpha_and_grayscale_modes(tmp_path, mode, color, expected):
    p = make_image(tmp_path / "m.png", size=(3, 2), mode=mode, color=color)
    img = load_image(p)
    assert img.mode == "RGB"
    got = img.getpixel((1, 1))
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), got


def test_exif_rotated_jpeg(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    assert Image.open(p).size == (40, 20)
    img = load_image(p)
    assert img.size == (20, 40) and img.mode == "RGB"


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    img = load_image(p)
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 0, 0)


def test_tiny_and_large_images(tmp_path):
    tiny = load_image(make_image(tmp_path / "one.png", size=(1, 1), color=(9, 8, 7)))
    assert tiny.size == (1, 1) and tiny.getpixel((0, 0)) == (9, 8, 7)
    big = load_image(make_image(tmp_path / "big.jpg", size=(4000, 3000), fmt="JPEG", quality=30))
    assert big.size == (4000, 3000) and big.mode == "RGB"


def test_loaded_image_is_detached_from_file(tmp_path):
    p = make_image(tmp_path / "a.webp", fmt="WEBP")
    img = load_image(p)
    p.unlink()
    assert img.mode == "RGB" and img.copy().size == (8, 6)


def test_image_formats_validate(tmp_path):
    d = tmp_path / "images"
    names = []
    for ext, fmt in [
        ("jpg", "JPEG"),
        ("jpeg", "JPEG"),
        ("png", "PNG"),
        ("webp", "WEBP"),
        ("bmp", "BMP"),
        ("gif", "GIF"),
        ("tif", "TIFF"),
        ("tiff", "TIFF"),
        ("JPG", "JPEG"),
    ]:
        make_image(d / f"img_{ext}.{ext}", fmt=fmt)
        names.append(f"img_{ext}.{ext}")
    rows = [(f"{i:02d}", n, "Q?", "yes") for i, n in enumerate(names)]
    csv_path, images_dir = dataset(tmp_path, rows, images=())
    result = validate_dataset(csv_path, images_dir)
    assert result.ok and result.problems == [] and result.rows_kept == len(names)


# ----------------------------------------------------------------------------- modes, limit


def mixed_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image at all")
    rows = [
        ("001", "a.png", "Q1?", "yes"),
        ("002", "missing.png", "Q2?", "no"),
        ("003", "b.png", "", "no"),
        ("004", "b.png", "Q4?", ""),  # warning only: kept
        ("005", "bad.png", "Q5?", "yes"),
        ("006", "../a.png", "Q6?", "yes"),
        ("007", "a.png", "Q7?", "no"),
    ]
    return dataset(tmp_path, rows)


def test_lenient_drops_exactly_the_bad_rows_and_lists_them(tmp_path):
    csv_path, images_dir = mixed_dataset(tmp_path)
    result = validate_dataset(csv_path, images_dir, strict=False)
    assert result.table.question_id.tolist() == ["001", "004", "007"]
    assert [(p.row, p.question_id, p.kind) for p in result.errors] == [
        (2, "002", "missing_image"),
        (3, "003", "empty_question"),
        (5, "005", "unreadable_image"),
        (6, "006", "path_traversal"),
    ]
    assert [(p.row, p.kind) for p in result.warnings] == [(4, "empty_answer")]
    assert (result.rows_read, result.rows_kept, result.rows_dropped) == (7, 3, 4)
    table, rjson, rmd = outputs(tmp_path)
    write_validation_outputs(result, table, rjson, rmd)
    assert read_validated_table(table).question_id.tolist() == ["001", "004", "007"]
    report = json.loads(rjson.read_text())
    assert report["ok"] is True and report["settings"] == {"strict": False, "limit": None}
    assert report["counts"]["rows_dropped"] == 4 and len(report["problems"]) == 5
    md = rmd.read_text()
    assert "| Rows dropped | 4 |" in md
    for qid in ("002", "003", "005", "006"):
        assert f"| {qid} |" in md


def test_strict_writes_reports_but_no_table_and_raises(tmp_path):
    csv_path, images_dir = mixed_dataset(tmp_path)
    table, rjson, rmd = outputs(tmp_path)
    table.parent.mkdir()
    table.write_text("stale\n")
    result = validate_dataset(csv_path, images_dir, strict=True)
    assert result.strict and not result.ok and len(result.errors) == 4
    with pytest.raises(DatasetError) as ei:
        write_validation_outputs(result, table, rjson, rmd)
    msg = str(ei.value)
    assert "strict" in msg
    assert "missing_image: data row 2 (1-based, header excluded; question_id '002')" in msg
    assert "path_traversal: data row 6 (1-based, header excluded; question_id '006')" in msg
    assert str(rmd) in msg and "1-based" in msg
    assert not table.exists()
    assert json.loads(rjson.read_text())["ok"] is False
    assert "FAILED (strict mode)" in rmd.read_text()
    assert [p.name for p in table.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_limit_validates_only_first_rows(tmp_path):
    csv_path, images_dir = mixed_dataset(tmp_path)
    result = validate_dataset(csv_path, images_dir, strict=True, limit=1)
    assert result.ok and result.table.question_id.tolist() == ["001"]
    assert (result.rows_read, result.rows_validated, result.rows_kept) == (7, 1, 1)
    lenient = validate_dataset(csv_path, images_dir, strict=False, limit=3)
    assert lenient.table.question_id.tolist() == ["001"]
    assert [p.row for p in lenient.errors] == [2, 3]
    with pytest.raises(ValueError):
        validate_dataset(csv_path, images_dir, limit=0)


# ----------------------------------------------------------------------------- demo set


def _mask_stats(img: np.ndarray, rgb) -> tuple[float, float, float]:
    ys, xs = np.nonzero(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1))
    assert len(xs), rgb
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    return xs.mean(), (ys.min() + ys.max()) / 2, len(xs) / box


def _shape_from_fill(fill: float) -> str:
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def test_demo_dataset_validates_and_answers_match_geometry(tmp_path):
    csv_path = write_demo_dataset(tmp_path / "demo")
    assert csv_path == tmp_path / "demo" / "questions.csv"
    result = validate_dataset(csv_path, tmp_path / "demo" / "images", strict=True)
    assert result.ok and result.problems == []
    t = result.table
    assert 30 <= len(t) <= 40 and t.question_id.iloc[0] == "q0001" and t.image_id.iloc[0] == "scene_001.png"
    answers = t.answer.tolist()
    assert answers.count("yes") == answers.count("no") == 12
    assert {"2", "3"} & set(answers) and set(answers) & set(COLORS)
    sizes = {Image.open(tmp_path / "demo" / "images" / i).size for i in t.image_id.unique()}
    assert len(sizes) > 5 and all(96 <= s <= 160 for wh in sizes for s in wh)

    rel = re.compile(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?")
    checked = 0
    for q in t.itertuples():
        img = np.asarray(Image.open(tmp_path / "demo" / "images" / q.image_id).convert("RGB"))
        present = {
            c: _mask_stats(img, rgb)
            for c, rgb in COLORS.items()
            if np.all(img == np.array(rgb, dtype=np.uint8), axis=-1).any()
        }
        if m := rel.fullmatch(q.question):
            c1, s1, relation, c2, s2 = m.groups()
            (x1, y1, f1), (x2, y2, f2) = present[c1], present[c2]
            assert (_shape_from_fill(f1), _shape_from_fill(f2)) == (s1, s2), q
            truth = {"to the left of": x1 < x2, "to the right of": x1 > x2, "above": y1 < y2, "below": y1 > y2}[
                relation
            ]
            assert q.answer == ("yes" if truth else "no"), q
        elif q.question == "How many shapes are there?":
            assert q.answer == str(len(present)), q
        elif m := re.fullmatch(r"What color is the (\w+)\?", q.question):
            kinds = {c: _shape_from_fill(f) for c, (_, _, f) in present.items()}
            assert kinds[q.answer] == m.group(1), q
        else:
            raise AssertionError(f"unexpected question {q.question!r}")
        checked += 1
    assert checked == len(t)


def test_demo_dataset_is_deterministic_and_atomic(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_images=5, seed=3)
    b = write_demo_dataset(tmp_path / "b", n_images=5, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for p in sorted((tmp_path / "a" / "images").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    c = write_demo_dataset(tmp_path / "b", n_images=3, seed=4)  # rewrite in place
    assert sorted(p.name for p in (tmp_path / "b" / "images").iterdir()) == [
        "scene_001.png",
        "scene_002.png",
        "scene_003.png",
    ]
    assert c.read_bytes() != a.read_bytes()
    assert not [p for p in (tmp_path / "b").rglob("*.tmp")]
    assert pd.read_csv(c, dtype=str).columns.tolist() == list(REQUIRED_COLUMNS)
