"""Dataset sources (vlmstates.sources): each form built small here, materialised, validated and extracted."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import datasets
import pandas as pd
import pytest
import yaml
from helpers import REPO
from PIL import Image

from vlmstates.cli import main
from vlmstates.dataset import DatasetError, read_source_record, validate_and_write
from vlmstates.settings import ConfigError
from vlmstates.sources import Source, materialise, validate_source_and_write
from vlmstates.store import DATASET_SOURCE_ATTR, STATUS_OK, read_embeddings
from vlmstates.workflow.config_check import check_config

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def png(colour, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


POPE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "image_source": datasets.Value("string"),
        "image": datasets.Image(),
        "category": datasets.Value("string"),
    }
)


def pope_dataset(question_ids=("1", "2", "3", "4")) -> datasets.Dataset:
    """POPE's columns (lmms-lab/POPE); questions 1 and 2 share their image, as POPE's questions do."""
    images = [png(COLOURS[0]), png(COLOURS[0]), png(COLOURS[1]), png(COLOURS[2])]
    n = len(question_ids)
    return datasets.Dataset.from_dict(
        {
            "id": [str(i) for i in range(n)],
            "question_id": list(question_ids),
            "question": [f"Is there a thing {i} in the image?" for i in range(n)],
            "answer": ["yes", "no", "yes", "no"][:n],
            "image_source": [f"COCO_{i}" for i in range(n)],
            "image": [{"bytes": b, "path": None} for b in images[:n]],
            "category": ["adversarial"] * n,
        },
        features=POPE_FEATURES,
    )


def write_pope_parquet(folder, question_ids=("1", "2", "3", "4")):
    """A Hub-style parquet folder: data/<split>-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    pope_dataset(question_ids).to_parquet(str(folder / "data" / "adversarial-00000-of-00001.parquet"))
    return folder


def write_vlmevalkit_tsv(path, image_cells=None):
    """VLMEvalKit's form: row 2 shares row 1's image by its index."""
    encoded = [base64.b64encode(png(c)).decode() for c in COLOURS]
    cells = image_cells or [encoded[0], "10", encoded[2]]
    frame = pd.DataFrame(
        {
            "index": ["10", "11", "12"],
            "image": cells,
            "question": ["What colour?", "Is it red?", "Is it blue?"],
            "answer": ["red", "Yes", "Yes"],
            "category": ["colour", "existence", "existence"],
            "l2-category": ["perception"] * 3,
        }
    )
    frame.to_csv(path, sep="\t", index=False)
    return path


def write_amber_jsonl(folder):
    """AMBER-like records (id, image, query, truth) in JSON Lines and an images folder."""
    images = folder / "images"
    images.mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        (images / f"AMBER_{i}.png").write_bytes(png(colour))
    records = [{"id": i + 1, "image": f"AMBER_{i}.png", "query": "Is there a dog?", "truth": "no"} for i in range(3)]
    path = folder / "query.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, images


AMBER_COLUMNS = {"question": "query", "answer": "truth"}


def validate(value, tmp_path, strict=True):
    out = tmp_path / "out"
    return validate_source_and_write(
        value, out / "source", out / "questions.csv", out / "v.json", out / "v.md", strict=strict, limit=None
    )


def report(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "v.json").read_text())


# --------------------------------------------------------------------------- each form


def test_hub_style_parquet_folder_becomes_the_validated_form(tmp_path):
    folder = write_pope_parquet(tmp_path / "pope")
    result, materialised = validate({"kind": "parquet", "path": str(folder), "split": "adversarial"}, tmp_path)
    table = result.table
    assert table["question_id"].tolist() == ["1", "2", "3", "4"]
    assert table["answer"].tolist() == ["yes", "no", "yes", "no"]
    assert list(table.columns) == ["question_id", "image_id", "question", "answer", "id", "image_source", "category"]
    # identical images are stored once, under the SHA-256 of their bytes
    assert table["image_id"][0] == table["image_id"][1] != table["image_id"][2]
    assert len(list(materialised.images.iterdir())) == 3
    assert table["image_id"][2] == hashlib.sha256(png(COLOURS[1])).hexdigest()[:32] + ".png"  # stable names
    stored = Image.open(materialised.images / table["image_id"][2])
    assert stored.getpixel((0, 0)) == COLOURS[1]
    entry = report(tmp_path)["source"]["sources"][0]
    assert entry["kind"] == "parquet" and entry["split"] == "adversarial" and len(entry["sha256"]) == 64
    assert entry["columns"] == {
        "question_id": "question_id",
        "image": "image",
        "question": "question",
        "answer": "answer",
        "keep": ["id", "image_source", "category"],
    }
    assert entry["columns_left_out"] == {}


def test_a_mathvista_source_takes_decoded_image_over_its_image_path_column(tmp_path):
    rows = {
        "pid": ["1", "2"],
        "question": ["How many?", "What length?"],
        "image": ["images/1.jpg", "images/2.jpg"],  # MathVista's path column, not the image
        "decoded_image": [{"bytes": png(COLOURS[0]), "path": None}, {"bytes": png(COLOURS[1]), "path": None}],
        "choices": [["1", "2"], None],
        "answer": ["2", "3.5"],
    }
    features = datasets.Features(
        {
            "pid": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("string"),
        }
    )
    path = tmp_path / "testmini.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    result, _ = validate({"kind": "parquet", "path": str(path)}, tmp_path)
    assert result.table["question_id"].tolist() == ["1", "2"]
    assert result.table["choices"].tolist() == ['["1", "2"]', ""]  # lists kept as JSON
    entry = report(tmp_path)["source"]["sources"][0]
    assert entry["columns"]["image"] == "decoded_image" and entry["columns_left_out"] == {}
    assert result.table["image"].tolist() == ["images/1.jpg", "images/2.jpg"]  # the path, kept as text


def test_save_to_disk_folder_needs_its_split(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"random": pope_dataset(), "popular": pope_dataset()}).save_to_disk(str(folder))
    with pytest.raises(DatasetError, match="choose a split with `split` \\(found: random, popular\\)"):
        validate({"kind": "disk", "path": str(folder)}, tmp_path)
    result, _ = validate({"kind": "disk", "path": str(folder), "split": "popular"}, tmp_path)
    assert result.table["question_id"].tolist() == ["1", "2", "3", "4"]
    assert report(tmp_path)["source"]["sources"][0]["kind"] == "disk"


def test_vlmevalkit_tsv_with_base64_and_pointer_rows(tmp_path):
    path = write_vlmevalkit_tsv(tmp_path / "MME.tsv")
    result, materialised = validate({"kind": "tsv", "path": str(path)}, tmp_path)
    table = result.table
    assert table["question_id"].tolist() == ["10", "11", "12"]
    assert table["image_id"][0] == table["image_id"][1] != table["image_id"][2]  # row 11 points to row 10
    assert Image.open(materialised.images / table["image_id"][2]).getpixel((0, 0)) == COLOURS[2]
    assert table["l2-category"].tolist() == ["perception"] * 3


def test_bad_embedded_images_are_errors_naming_the_source_row(tmp_path):
    not_an_image = base64.b64encode(b"this is no image at all, just some bytes" * 3).decode()
    path = write_vlmevalkit_tsv(tmp_path / "bad.tsv", [not_an_image, "99", "%%% not base64 %%% " * 5])
    with pytest.raises(DatasetError) as error:
        validate({"kind": "tsv", "path": str(path)}, tmp_path)
    problems = report(tmp_path)["problems"]
    assert [(p["row"], p["question_id"], p["kind"]) for p in problems] == [
        (1, "10", "bad_source_image"),
        (2, "11", "bad_source_image"),
        (3, "12", "bad_source_image"),
    ]
    assert "row 1 of tsv source" in problems[0]["message"] and "cannot be decoded" in problems[0]["message"]
    assert "row index '99', which is not in the file" in problems[1]["message"]
    assert "neither base64 image data nor a row index" in problems[2]["message"]
    assert "bad_source_image" in str(error.value)
    # lenient: the rows are dropped and listed, nothing else
    result, _ = validate({"kind": "tsv", "path": str(path)}, tmp_path, strict=False)
    assert result.rows_dropped == 3 and result.table.empty


def test_jsonl_with_an_images_folder(tmp_path):
    path, images = write_amber_jsonl(tmp_path / "amber")
    source = {"kind": "json", "path": str(path), "images": str(images), "columns": AMBER_COLUMNS}
    result, _ = validate(source, tmp_path)
    assert result.table["question_id"].tolist() == ["1", "2", "3"]
    assert result.table["question"].tolist() == ["Is there a dog?"] * 3
    assert result.table["answer"].tolist() == ["no"] * 3
    entry = report(tmp_path)["source"]["sources"][0]
    assert entry["columns"]["answer"] == "truth" and "images_listing_sha256" in entry


def test_json_list_with_a_missing_image_names_the_row(tmp_path):
    path, images = write_amber_jsonl(tmp_path / "amber")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["image"] = "AMBER_missing.png"
    listed = tmp_path / "amber" / "query.json"
    listed.write_text(json.dumps(records))
    with pytest.raises(DatasetError):
        validate({"kind": "json", "path": str(listed), "images": str(images), "columns": AMBER_COLUMNS}, tmp_path)
    (problem,) = report(tmp_path)["problems"]
    assert problem["row"] == 2 and problem["question_id"] == "2" and "AMBER_missing.png" in problem["message"]


def test_a_missing_column_is_a_fatal_error_naming_it_with_the_columns_found(tmp_path):
    path, images = write_amber_jsonl(tmp_path / "amber")
    with pytest.raises(
        DatasetError,
        match="has no answer column \\(tried answer, gt_answer\\); columns found: id, image, query, truth; name it with columns.answer",
    ):
        validate({"kind": "json", "path": str(path), "images": str(images), "columns": {"question": "query"}}, tmp_path)
    written = report(tmp_path)
    assert written["fatal"] and written["problems"][0]["kind"] == "unreadable_source"
    with pytest.raises(DatasetError, match="column 'prompt' \\(columns.question\\) is not in the source"):
        validate(
            {"kind": "json", "path": str(path), "images": str(images), "columns": {"question": "prompt"}}, tmp_path
        )


def test_duplicated_ids_name_both_source_rows(tmp_path):
    folder = write_pope_parquet(tmp_path / "pope", question_ids=("1", "2", "1", "4"))
    with pytest.raises(DatasetError):
        validate({"kind": "parquet", "path": str(folder)}, tmp_path)
    duplicated = [p for p in report(tmp_path)["problems"] if p["kind"] == "duplicate_question_id"]
    assert [(p["row"], p["question_id"]) for p in duplicated] == [(1, "1"), (3, "1")]
    # MME's copies repeat question_id for the two questions of an image: "#row" numbers the rows instead
    result, _ = validate({"kind": "parquet", "path": str(folder), "columns": {"question_id": "#row"}}, tmp_path)
    assert result.table["question_id"].tolist() == ["1", "2", "3", "4"]
    assert result.table["question"][2] == "Is there a thing 2 in the image?"


def test_sources_combined_with_a_dataset_column(tmp_path):
    folder = write_pope_parquet(tmp_path / "pope")
    tsv = write_vlmevalkit_tsv(tmp_path / "MME.tsv")
    value = [
        {"kind": "parquet", "path": str(folder), "name": "pope", "columns": {"keep": ["category"]}},
        {"kind": "tsv", "path": str(tsv), "name": "mme"},
    ]
    result, materialised = validate(value, tmp_path)
    table = result.table
    assert table["question_id"].tolist() == ["pope_1", "pope_2", "pope_3", "pope_4", "mme_10", "mme_11", "mme_12"]
    assert table["dataset"].tolist() == ["pope"] * 4 + ["mme"] * 3
    assert table["category"].tolist() == ["adversarial"] * 4 + ["colour", "existence", "existence"]
    assert table["l2-category"].tolist() == [""] * 4 + ["perception"] * 3
    # POPE's red image and MME's red image are the same bytes: stored once
    assert table["image_id"][0] == table["image_id"][4] and len(list(materialised.images.iterdir())) == 3
    assert [s["name"] for s in materialised.provenance["sources"]] == ["pope", "mme"]


def test_a_named_source_alone_gets_its_dataset_column(tmp_path):
    tsv = write_vlmevalkit_tsv(tmp_path / "MME.tsv")
    result, _ = validate({"kind": "tsv", "path": str(tsv), "name": "mme"}, tmp_path)
    assert result.table["question_id"].tolist() == ["mme_10", "mme_11", "mme_12"]
    assert result.table["dataset"].tolist() == ["mme"] * 3


def test_materialised_set_is_reused_until_the_source_or_column_map_changes(tmp_path):
    path, images = write_amber_jsonl(tmp_path / "amber")
    source = Source(kind="json", path=str(path), images=str(images), columns=AMBER_COLUMNS)
    assert not materialise(source, tmp_path / "m").reused
    assert materialise(source, tmp_path / "m").reused
    changed_map = Source(kind="json", path=str(path), images=str(images), columns={**AMBER_COLUMNS, "keep": []})
    assert not materialise(changed_map, tmp_path / "m").reused
    assert materialise(changed_map, tmp_path / "m").reused
    path.write_text(path.read_text().replace("Is there a dog?", "Is there a cat?"))
    again = materialise(changed_map, tmp_path / "m")
    assert not again.reused
    assert pd.read_csv(again.csv)["question"].tolist() == ["Is there a cat?"] * 3


def test_hub_dataset_is_read_offline_from_the_datasets_cache(tmp_path):
    """The Hub path (load_dataset(id, config, split, revision)) with HF_HUB_OFFLINE=1 and a datasets cache
    laid out as an online load of a parquet Hub repo leaves it (<cache>/<owner>___<name>/<config>/...)."""
    home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}"}
    build = textwrap.dedent(
        f"""
        import shutil
        from pathlib import Path
        import datasets
        from datasets.packaged_modules.parquet.parquet import Parquet
        from test_sources import write_pope_parquet
        folder = write_pope_parquet(Path({str(tmp_path / "repo")!r}))
        files = {{"adversarial": [str(folder / "data" / "adversarial-00000-of-00001.parquet")]}}
        builder = Parquet(dataset_name="pope", config_name="default", data_files=files, hash="0" * 16)
        builder.download_and_prepare()
        root = Path(datasets.config.HF_DATASETS_CACHE)
        target = root / "lab___pope" / "default" / Path(builder.cache_dir).relative_to(root / "pope").parts[-2]
        target.mkdir(parents=True)
        shutil.move(builder.cache_dir, target / ("0" * 16))
        shutil.rmtree(root / "pope")
        """
    )
    subprocess.run([sys.executable, "-c", build], env=env, check=True, capture_output=True, timeout=300)
    source = {"kind": "hub", "id": "lab/pope", "config": "default", "split": "adversarial", "revision": "0123abc"}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vlmstates", "validate", "--source", json.dumps(source), "--table"]
    command += [str(out / "questions.csv"), "--report-json", str(out / "v.json"), "--report-md", str(out / "v.md")]
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, env=offline, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert pd.read_csv(out / "questions.csv", dtype=str)["question_id"].tolist() == ["1", "2", "3", "4"]
    entry = json.loads((out / "v.json").read_text())["source"]["sources"][0]
    assert {k: entry[k] for k in source} == source and entry["dataset_fingerprint"]
    assert read_source_record(out / "questions.csv")["sources"][0]["id"] == "lab/pope"
    assert (out / "source" / "images").is_dir()  # materialised beside the table by default
    # an unknown Hub id, offline, fails naming the source
    source["id"] = "lab/absent"
    command[command.index("--source") + 1] = json.dumps(source)
    result = subprocess.run(command, env=offline, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "hub source 'lab/absent' (split adversarial) cannot be loaded" in result.stderr


def test_validation_of_a_source_runs_in_the_core_environment(tmp_path):
    """The validate_dataset job's environment (envs/core.yaml) holds what a source needs: datasets, pyarrow."""
    from test_envs import run_in_environment

    folder = write_pope_parquet(tmp_path / "pope")
    source = json.dumps({"kind": "parquet", "path": str(folder), "split": "adversarial"})
    out = tmp_path / "out"
    run_in_environment(
        "core",
        tmp_path,
        *("validate", "--source", source, "--table", str(out / "q.csv")),
        *("--report-json", str(out / "v.json"), "--report-md", str(out / "v.md")),
    )
    assert pd.read_csv(out / "q.csv", dtype=str)["question_id"].tolist() == ["1", "2", "3", "4"]


def test_plain_csv_validation_records_the_csv_hash(demo, tmp_path):
    table, images = demo
    validate_and_write(table, images, tmp_path / "q.csv", tmp_path / "v.json", tmp_path / "v.md")
    (entry,) = read_source_record(tmp_path / "q.csv")["sources"]
    assert entry["kind"] == "csv" and entry["path"] == str(table) and len(entry["sha256"]) == 64
    assert json.loads((tmp_path / "v.json").read_text())["source"]["sources"] == [entry]
    assert "| Source | csv" in (tmp_path / "v.md").read_text()


# --------------------------------------------------------------------------- config


def _config(dataset: dict) -> dict:
    return {"dataset": dataset, "models": {"m": {"model": "resources/checkpoints/tiny-qwen2_5_vl"}}}


def test_config_takes_a_source_or_a_list_of_them(tmp_path):
    check_config(_config({"source": {"kind": "hub", "id": "lmms-lab/POPE", "split": "adversarial"}}), SCHEMA)
    both = [{"kind": "tsv", "path": "a.tsv", "name": "a"}, {"kind": "parquet", "path": "b", "name": "b"}]
    check_config(_config({"source": both}), SCHEMA)
    for dataset, message in [
        ({"csv": "q.csv", "images": "i", "source": {"kind": "tsv", "path": "a"}}, "`dataset.csv`: set together"),
        ({"csv": "q.csv"}, "`dataset.images`: required"),
        ({"source": {"kind": "tsv", "path": "a", "colums": {}}}, "did you mean `columns`"),
        ({"source": {"kind": "zip", "path": "a"}}, "not one of"),
        ({"source": [{"kind": "tsv", "path": "a"}, {"kind": "tsv", "path": "b"}]}, "different `name` for each"),
        ({"source": {"kind": "tsv", "path": "a", "columns": {"answr": "x"}}}, "did you mean `answer`"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_config(_config(dataset), SCHEMA)


def test_documented_recipes_are_valid_configs():
    """Every `dataset:` block of docs/datasets.md passes the schema."""
    text = (REPO / "docs" / "datasets.md").read_text()
    blocks = [b.split("```")[0] for b in text.split("```yaml\n")[1:]]
    recipes = [yaml.safe_load(b) for b in blocks if b.startswith("dataset:")]
    assert len(recipes) >= 6
    for recipe in recipes:
        check_config(_config(recipe["dataset"]), SCHEMA)


# --------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    path, images = write_amber_jsonl(root / "amber")
    return {
        "parquet": {"kind": "parquet", "path": str(write_pope_parquet(root / "pope")), "split": "adversarial"},
        "tsv": {"kind": "tsv", "path": str(write_vlmevalkit_tsv(root / "MME.tsv"))},
        "json": {"kind": "json", "path": str(path), "images": str(images), "columns": AMBER_COLUMNS},
    }


@pytest.mark.parametrize("kind", ["parquet", "tsv", "json"])
def test_extract_from_a_source_records_it_in_every_embeddings_file(kind, source_files, tiny_checkpoint, tmp_path):
    source_file = tmp_path / "source.yaml"
    source_file.write_text(yaml.safe_dump(source_files[kind]))
    out = tmp_path / "out"
    argv = ["extract", "--source", str(source_file), "--output-dir", str(out), "--test", "--shard-size", "2"]
    argv += ["--model", str(tiny_checkpoint("qwen2_5_vl")), "--batch-size", "2", "--max-new-tokens", "2"]
    assert main(argv) == 0
    name = "tiny-qwen2_5_vl"
    merged = read_embeddings(out / name / "embeddings.h5")
    assert (merged.table["status"] == "ok").all() and len(merged.table) == 3
    recorded = json.loads(merged.attrs[DATASET_SOURCE_ATTR])
    assert recorded == json.loads((out / "dataset" / "validation.json").read_text())["source"]
    assert recorded["sources"][0]["kind"] == kind and recorded["sources"][0]["columns"]["question_id"]
    shard = read_embeddings(out / name / "shards" / "shard_0000.h5")
    assert shard.attrs[DATASET_SOURCE_ATTR] == merged.attrs[DATASET_SOURCE_ATTR]


# --------------------------------------------------------------------------- the workflow


@pytest.mark.slow
def test_workflow_runs_parquet_tsv_and_jsonl_sources_with_only_a_dataset_section(tmp_path):
    """The whole workflow (validation, extraction, merge, labels, probes with a breakdown by source,
    inspection) from three sources of three forms in one set: a POPE-shaped parquet folder, a VLMEvalKit TSV
    with base64 and pointer rows, and AMBER-like JSONL with an images folder."""
    folder = write_pope_parquet(tmp_path / "pope")
    tsv = write_vlmevalkit_tsv(tmp_path / "MME.tsv")
    jsonl, images = write_amber_jsonl(tmp_path / "amber")
    sources = [
        {"name": "pope", "kind": "parquet", "path": str(folder), "split": "adversarial"},
        {"name": "mme", "kind": "tsv", "path": str(tsv)},
        {"name": "amber", "kind": "json", "path": str(jsonl), "images": str(images), "columns": AMBER_COLUMNS},
    ]
    config = {
        "dataset": {"source": sources},
        "models": {"tiny": {"model": "resources/checkpoints/tiny-qwen2_5_vl", "max_new_tokens": 2}},
        "probes": {"breakdown": ["dataset"]},
    }
    workdir = tmp_path / "run"
    (workdir / "config").mkdir(parents=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]
    merged = read_embeddings(workdir / "results" / "tiny" / "embeddings.h5")
    expected = ["pope_1", "pope_2", "pope_3", "pope_4", "mme_10", "mme_11", "mme_12", "amber_1", "amber_2", "amber_3"]
    assert merged.table["question_id"].tolist() == expected
    assert (merged.table["status"] == STATUS_OK).all()
    recorded = json.loads(merged.attrs[DATASET_SOURCE_ATTR])
    assert [s["kind"] for s in recorded["sources"]] == ["parquet", "tsv", "json"]
    assert recorded["sources"][0]["path"] == str(folder) and recorded["sources"][0]["split"] == "adversarial"
    subsets = pd.read_csv(workdir / "results" / "tiny" / "probes" / "subsets.csv")
    assert {"pope", "mme", "amber"} <= set(subsets.loc[subsets["subset"] == "dataset", "value"])
    assert (workdir / "results" / "dataset" / "source" / "questions.csv").exists()
    # an unchanged source is not validated again
    again = subprocess.run([*command, "-n"], capture_output=True, text=True, timeout=600)
    assert "validate_dataset" not in again.stdout + again.stderr
