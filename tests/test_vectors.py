"""Vectors in one line: `vlmstates.load` and `iter_chunks` against the raw HDF5 datasets of a file the store
wrote, and `export-hf` read back by the `datasets` library equal to the HDF5, column by column."""

from __future__ import annotations

import json
import logging

import datasets
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import REPO
from test_envs import run_in_environment
from test_workflow import default_config, snakemake, workdir_with_config

import vlmstates
from vlmstates.cli import main
from vlmstates.inspection.hf_dataset import ExportError, export_hf_dataset
from vlmstates.store import (
    INT_COLUMNS,
    LAYERED_REPRESENTATIONS,
    MULTIMODAL,
    OPTIONAL_INT_COLUMNS,
    PAPER_POSITIONS_ATTR,
    PAPER_VISION_TOKEN,
    QUERY_TOKEN,
    STRING_COLUMNS,
    VISION_ONLY,
    VISION_TOKEN,
    SampleResult,
    layer_key,
    write_embeddings,
)
from vlmstates.vectors import VectorsError
from vlmstates.workflow.config_check import check_config

LAYERS = (0, 3, 7)
DIMS = {VISION_ONLY: 5} | {layer_key(r, k): 6 for r in LAYERED_REPRESENTATIONS for k in LAYERS}
CODES = {VISION_ONLY: "VF", VISION_TOKEN: "VT", QUERY_TOKEN: "QT", MULTIMODAL: "MM", PAPER_VISION_TOKEN: "VT_paper"}
FAILED = {"q02", "q05", "q06"}


def write_file(path, n=9, failed=FAILED):
    """A file of the store's writer: n rows (some failed), every representation at LAYERS, paper positions."""
    rng = np.random.default_rng(1)
    results = []
    for i in range(n):
        qid = f"q{i:02d}"
        if qid in failed:
            results.append(SampleResult.failed(qid, f"img{i % 4}.png", f"question {i}?", "no", f"error {i}"))
            continue
        vectors = {key: rng.standard_normal(dim).astype(np.float32) for key, dim in DIMS.items()}
        results.append(
            SampleResult(
                qid,
                f"img{i % 4}.png",
                f"question {i} – ünïcode?",
                "yes",
                answer=f"answer {i}",
                vision_token_position=i,
                query_token_position=10 + i,
                num_prompt_tokens=20 + i,
                num_image_tokens=4,
                paper_vision_token_position=i + 1,
                vectors=vectors,
            )
        )
    attrs = {"model": "Org/Tiny", "family": "qwen2_5_vl", "layers": list(LAYERS), PAPER_POSITIONS_ATTR: True}
    return write_embeddings(path, results, DIMS, attrs)


@pytest.fixture
def embeddings(tmp_path):
    return write_file(tmp_path / "embeddings.h5")


def raw(path, key):
    with h5py.File(path, "r") as f:
        return f[key].asstr()[()] if f[key].dtype.kind == "O" else f[key][()]


def ok_mask(path):
    return raw(path, "status") == "ok"


# ------------------------------------------------------------------ load


def test_load_picks_the_chosen_representations_and_layers_of_the_ok_rows(embeddings, caplog):
    with caplog.at_level(logging.INFO):
        vectors = vlmstates.load(embeddings, representations=["VT", "QT"], layers=[3])
    assert f"{embeddings}: 3 rows that failed are left out (rows='all' keeps them)" in caplog.messages
    ok = ok_mask(embeddings)
    assert list(vectors.vectors) == ["VT_layer_3", "QT_layer_3"]
    np.testing.assert_array_equal(vectors["VT_layer_3"], raw(embeddings, layer_key(VISION_TOKEN, 3))[ok])
    np.testing.assert_array_equal(vectors["QT_layer_3"], raw(embeddings, layer_key(QUERY_TOKEN, 3))[ok])
    assert vectors["VT_layer_3"].dtype == np.float32
    assert vectors.rows.index.tolist() == np.flatnonzero(ok).tolist()
    for column in (*STRING_COLUMNS, *INT_COLUMNS, *OPTIONAL_INT_COLUMNS):
        assert vectors.rows[column].tolist() == raw(embeddings, column)[ok].tolist(), column
    assert vectors.attrs["model"] == "Org/Tiny"


def test_load_defaults_to_everything_and_all_rows_on_request(embeddings):
    vectors = vlmstates.load(embeddings, rows="all")
    assert len(vectors) == 9 and sorted(vectors.rows.loc[vectors.rows.status == "failed", "question_id"]) == sorted(
        FAILED
    )
    expected = {("VF" if k == VISION_ONLY else f"{CODES[k.split('/')[0]]}_layer_{k.split('_')[-1]}"): k for k in DIMS}
    assert set(vectors.vectors) == set(expected)
    for column, key in expected.items():
        np.testing.assert_array_equal(vectors[column], raw(embeddings, key))  # NaN rows of failed samples too


def test_hdf5_names_select_as_the_codes_do_and_vf_ignores_layers(embeddings):
    by_code = vlmstates.load(embeddings, representations=["VF", "VT_paper"], layers=[7])
    by_name = vlmstates.load(embeddings, representations=[VISION_ONLY, PAPER_VISION_TOKEN], layers=[7])
    assert list(by_code.vectors) == list(by_name.vectors) == ["VF", "VT_paper_layer_7"]
    assert list(vlmstates.load(embeddings, "VT_paper", 7).vectors) == ["VT_paper_layer_7"]  # one of each, unlisted
    np.testing.assert_array_equal(by_code["VF"], raw(embeddings, VISION_ONLY)[ok_mask(embeddings)])


def test_frame_holds_each_rows_vector(embeddings):
    vectors = vlmstates.load(embeddings, representations=["MM"], layers=[0, 7])
    frame = vectors.to_frame()
    assert list(frame.columns[-2:]) == ["MM_layer_0", "MM_layer_7"]
    np.testing.assert_array_equal(np.stack(frame["MM_layer_7"].to_list()), vectors["MM_layer_7"])
    assert frame["question_id"].tolist() == vectors.rows["question_id"].tolist()


def test_a_shard_reads_as_a_merged_file_does(tmp_path):
    shard = write_file(tmp_path / "shard_0000.h5", n=3, failed=())
    assert len(vlmstates.load(shard, representations=["QT"], layers=[0])) == 3


# ------------------------------------------------------------------ chunks


@pytest.mark.parametrize("rows", ["ok", "all"])
@pytest.mark.parametrize("chunk_rows", [1, 2, 4, 100])
def test_chunks_yield_what_one_read_gives(embeddings, rows, chunk_rows):
    whole = vlmstates.load(embeddings, representations=["VT", "VF"], layers=[0, 7], rows=rows)
    chunks = list(vlmstates.iter_chunks(embeddings, ["VT", "VF"], [0, 7], rows=rows, chunk_rows=chunk_rows))
    assert all(0 < len(c) <= chunk_rows for c in chunks)
    assert [i for c in chunks for i in c.rows.index] == whole.rows.index.tolist()
    for column in whole.vectors:
        np.testing.assert_array_equal(np.concatenate([c[column] for c in chunks]), whole[column])
    assert [q for c in chunks for q in c.rows["question_id"]] == whole.rows["question_id"].tolist()


def test_load_in_small_slices_equals_the_raw_datasets(embeddings):
    vectors = vlmstates.load(embeddings, representations=["QT"], layers=[3], chunk_rows=2)
    np.testing.assert_array_equal(
        vectors["QT_layer_3"], raw(embeddings, layer_key(QUERY_TOKEN, 3))[ok_mask(embeddings)]
    )


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "selection, message",
    [
        ({"representations": ["QT"], "layers": [3, 12]}, "has no QT vectors at layer 12; its QT layers are 0, 3, 7"),
        ({"representations": ["XY"]}, "unknown representation 'XY': use VF, VT, VT_paper, QT, MM"),
        ({"rows": "failed"}, "rows must be one of ok, all"),
    ],
)
def test_a_bad_selection_names_the_file_and_what_it_holds(embeddings, selection, message):
    with pytest.raises(VectorsError, match=message):
        vlmstates.load(embeddings, **selection)
    with pytest.raises(VectorsError, match=message):
        vlmstates.iter_chunks(embeddings, **selection)  # refused when called, before the first chunk


def test_a_representation_the_file_lacks_is_named_with_what_it_holds(tmp_path):
    path = tmp_path / "e.h5"
    dims = {VISION_ONLY: 2, layer_key(VISION_TOKEN, 1): 2}
    write_embeddings(path, [SampleResult("a", "i", "q", "t", vectors={k: np.ones(2) for k in dims})], dims, {})
    with pytest.raises(VectorsError, match=rf"{path} has no QT vectors .*; it holds VF, VT layers 1$"):
        vlmstates.load(path, representations=["QT"])


def test_a_missing_or_foreign_file_is_named(tmp_path):
    with pytest.raises(VectorsError, match=f"{tmp_path / 'nope.h5'}: no such file"):
        vlmstates.load(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(VectorsError, match="other.h5: not an embeddings file of this schema"):
        vlmstates.load(tmp_path / "other.h5")


# ------------------------------------------------------------------ export to a Hugging Face dataset


def assert_dataset_equals_file(dataset, path, rows):
    """Every column of `dataset` equals the HDF5's, the vectors in their stored dtype."""
    kept = ok_mask(path) if rows == "ok" else np.ones(len(raw(path, "status")), bool)
    table = dataset.with_format("arrow")[:]
    assert table.num_rows == kept.sum()
    for column in (*STRING_COLUMNS, *INT_COLUMNS, *OPTIONAL_INT_COLUMNS):
        assert table[column].to_pylist() == raw(path, column)[kept].tolist(), column
        assert dataset.features[column].dtype == ("string" if column in STRING_COLUMNS else "int64")
    with h5py.File(path, "r") as f:
        for key, dim in DIMS.items():
            column = "VF" if key == VISION_ONLY else f"{CODES[key.split('/')[0]]}_layer_{key.split('_')[-1]}"
            stored = f[key][()][kept]
            assert dataset.features[column] == datasets.List(datasets.Value(stored.dtype.name), length=dim)
            values = table[column].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            assert values.dtype == stored.dtype, column
            np.testing.assert_array_equal(values, stored)  # NaN of failed rows included
            np.testing.assert_array_equal(dataset.with_format("numpy")[:][column], stored)
        assert set(dataset.column_names) == {*STRING_COLUMNS, *INT_COLUMNS, *OPTIONAL_INT_COLUMNS} | {
            "VF" if k == VISION_ONLY else f"{CODES[k.split('/')[0]]}_layer_{k.split('_')[-1]}" for k in DIMS
        }


@pytest.mark.parametrize("rows", ["all", "ok"])
def test_export_reads_back_with_load_from_disk_equal_to_the_file(embeddings, tmp_path, rows):
    out = export_hf_dataset(embeddings, tmp_path / "hf", rows=rows, shard_bytes=200)  # several slices
    dataset = datasets.load_from_disk(str(out))
    assert_dataset_equals_file(dataset, embeddings, rows)
    assert json.loads(dataset.info.description)["model"] == "Org/Tiny"


def test_parquet_export_reads_back_with_load_dataset_equal_to_the_file(embeddings, tmp_path):
    out = export_hf_dataset(embeddings, tmp_path / "hf", format="parquet", shard_bytes=200)
    files = sorted((out / "data").iterdir())
    assert len(files) > 1 and files[0].name == f"train-00000-of-{len(files):05d}.parquet"
    dataset = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert_dataset_equals_file(dataset, embeddings, "all")
    assert json.loads(pq.read_schema(files[0]).metadata[b"vlmstates"])["family"] == "qwen2_5_vl"


def test_export_keeps_a_float16_file_float16(embeddings, tmp_path):
    with h5py.File(embeddings, "a") as f:
        for key in DIMS:
            data = f[key][()].astype(np.float16)
            del f[key]
            f[key] = data
    out = export_hf_dataset(embeddings, tmp_path / "hf")
    dataset = datasets.load_from_disk(str(out))
    assert dataset.data.schema.field("VF").type == pa.list_(pa.float16(), 5)
    assert_dataset_equals_file(dataset, embeddings, "all")


def test_export_hf_command_exports_the_selection(embeddings, tmp_path):
    out = tmp_path / "hf"
    assert main(["export-hf", str(embeddings), str(out), "--representations", "VT", "--layers", "7"]) == 0
    dataset = datasets.load_from_disk(str(out))
    assert [c for c in dataset.column_names if "layer" in c or c == "VF"] == ["VT_layer_7"]
    np.testing.assert_array_equal(
        dataset.with_format("numpy")[:]["VT_layer_7"], raw(embeddings, layer_key(VISION_TOKEN, 7))
    )
    assert main(["export-hf", str(embeddings), str(out), "--format", "parquet", "--rows", "ok"]) == 0  # replaces it
    assert [p.name for p in out.iterdir()] == ["data"]


def test_export_refuses_a_folder_it_did_not_write_and_a_bad_layer(embeddings, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes exists and is not an earlier export"):
        export_hf_dataset(embeddings, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert main(["export-hf", str(embeddings), str(tmp_path / "hf"), "--layers", "5"]) == 1
    assert "embeddings.h5 has no VT vectors at layer 5; its VT layers are 0, 3, 7" in capsys.readouterr().err


def test_export_hf_runs_in_the_core_environment_of_its_rule(embeddings, tmp_path):
    """The rule's environment (envs/core.yaml) holds what the command imports: datasets and pyarrow."""
    run_in_environment("core", tmp_path, "export-hf", str(embeddings), str(tmp_path / "hf"), "--format", "parquet")
    assert_dataset_equals_file(
        datasets.load_dataset("parquet", data_dir=str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "c")),
        embeddings,
        "all",
    )


# ------------------------------------------------------------------ the workflow target


def test_the_workflow_target_is_off_by_default_and_runs_export_hf_when_on(tmp_path):
    config = default_config()
    check_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    assert config["export"]["hf_dataset"] is False and config["export"]["hf_format"] == "arrow"
    config = default_config()
    config["export"] = {"hf_dataset": True, "hf_format": "parquet"}
    dry = snakemake(workdir_with_config(tmp_path, config), "-n", "-p").stdout
    model = next(iter(config["models"]))
    assert f"vlmstates export-hf results/{model}/embeddings.h5 results/{model}/hf_dataset --format parquet" in dry
    assert yaml.safe_load((REPO / "config" / "config.yaml").read_text()).get("export", {}).get("hf_dataset") in (
        None,
        False,
    )
