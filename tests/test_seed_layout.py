"""The seed scripts' per-question layout: export from the columnar file, read back, inspect both layouts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from vlmstates.cli import main
from vlmstates.inspection.report import describe, open_embeddings
from vlmstates.inspection.seed_layout import (
    SeedLayoutError,
    export_seed_layout,
    is_seed_layout,
    plan_parts,
    read_seed_layout,
)
from vlmstates.store import STATUS_FAILED, VISION_ONLY, SampleResult, layer_key, read_embeddings, write_embeddings

LAYERS = (0, 2)
REPRESENTATIONS = ("vision_token_representation", "query_token_representation", "multimodal_representation")
DIMS = {VISION_ONLY: 3} | {layer_key(r, k): 4 for r in REPRESENTATIONS for k in LAYERS}
ATTRS = {
    "model": "Org/Tiny-VL-1B",
    "family": "qwen2_5_vl",
    "device": "cpu",
    "dtype": "float32",
    "layers": list(LAYERS),
    "config_hash": "abc123",
}


def columnar(path, ids, failed=()):
    rng = np.random.default_rng(0)
    results = []
    for qid in ids:
        if qid in failed:
            results.append(SampleResult.failed(qid, f"img_{qid}.png", f"q {qid}?", "yes", "image: broken"))
        else:
            vectors = {key: rng.standard_normal(dim).astype(np.float32) for key, dim in DIMS.items()}
            results.append(
                SampleResult(
                    qid,
                    f"img_{qid}.png",
                    f"q {qid}?",
                    "yes",
                    answer=f"answer {qid}",
                    vision_token_position=3,
                    query_token_position=9,
                    num_prompt_tokens=10,
                    num_image_tokens=4,
                    vectors=vectors,
                )
            )
    return write_embeddings(path, results, DIMS, ATTRS)


def assert_same_rows_and_vectors(got, expected):
    for column in ("question_id", "image_id", "question", "ground_truth_answer", "answer", "status"):
        assert got.table[column].tolist() == expected.table[column].tolist(), column
    assert got.vector_dims == expected.vector_dims
    for key in expected.representation_keys():
        np.testing.assert_array_equal(got.load(key), expected.load(key))  # NaN rows of failed samples too


def test_round_trip_columnar_to_seed_layout_keeps_vectors(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3", "q4", "q5"])
    export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=2)
    back = read_seed_layout(tmp_path / "seed")
    assert_same_rows_and_vectors(back, read_embeddings(source))
    assert back.layers == list(LAYERS)
    assert (back.table["vision_token_position"] == -1).all()  # not in the seed layout
    assert not list((tmp_path / "seed").glob(".*tmp*"))


def test_parts_are_numbered_from_001_with_part_size_questions(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3", "q4", "q5"])
    parts = export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=2)
    assert [p.name for p in parts] == [f"tiny_embeddings_part_00{n}.h5" for n in (1, 2, 3)]
    groups = []
    for part in parts:
        with h5py.File(part, "r") as f:
            groups.append(list(f))
    assert groups == [["q1", "q2"], ["q3", "q4"], ["q5"]]


def test_part_files_hold_the_seed_groups_and_attributes(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3"])
    parts = export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=2)
    with h5py.File(parts[0], "r") as f:
        assert {k: f.attrs[k] for k in ("model_name", "model_type", "device", "dtype", "num_samples")} == {
            "model_name": "Org/Tiny-VL-1B",
            "model_type": "qwen2_5_vl",
            "device": "cpu",
            "dtype": "float32",
            "num_samples": 2,
        }
        assert "created_at" in f.attrs
        group = f["q2"]
        # read as the seeds' analysis scripts read it: scalar strings as bytes, vectors by layer
        assert group["answer"][()].decode("utf-8") == "answer q2"
        assert group["ground_truth_answer"][()].decode("utf-8") == "yes"
        assert sorted(group["query_token_representation"]) == ["layer_0", "layer_2"]
        assert group["vision_only_representation"].shape == (3,)
        assert group["vision_token_representation/layer_2"].dtype == np.float32
    with h5py.File(parts[1], "r") as f:
        assert f.attrs["num_samples"] == 1 and f.attrs["part"] == 2 and f.attrs["num_parts"] == 2


def test_failed_samples_get_no_group_but_are_listed_and_read_back(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3", "q4"], failed={"q2"})
    parts = export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=2)
    with h5py.File(parts[0], "r") as f:
        assert list(f) == ["q1", "q3"]  # the failed q2 sits between them, in no group
        assert f.attrs["num_samples"] == 2 and f.attrs["num_failed"] == 1
        assert "q2" in f.attrs["failed"] and "image: broken" in f.attrs["failed"]
    back = read_seed_layout(tmp_path / "seed")
    assert_same_rows_and_vectors(back, read_embeddings(source))
    assert back.table["status"].tolist()[1] == STATUS_FAILED
    assert back.attrs["num_failed"] == 1


def test_plan_parts_counts_only_successful_samples():
    ok, bad = "ok", "failed"
    assert plan_parts([ok, ok, ok, ok, ok], 2) == [[0, 1], [2, 3], [4]]
    assert plan_parts([ok, bad, ok, ok], 2) == [[0, 1, 2], [3]]
    assert plan_parts([bad, bad], 2) == [[0, 1]]  # all failed: one part without groups
    assert plan_parts([], 2) == [[]]


def test_reexport_removes_parts_of_the_earlier_export(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3"])
    export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=1)
    (tmp_path / "seed" / "notes.txt").write_text("kept")
    export_seed_layout(source, tmp_path / "seed", prefix="tiny", part_size=2)
    assert sorted(p.name for p in (tmp_path / "seed").iterdir()) == [
        "notes.txt",
        "tiny_embeddings_part_001.h5",
        "tiny_embeddings_part_002.h5",
    ]


def test_bad_question_id_prefix_and_part_size_are_refused(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["a/b"])
    with pytest.raises(SeedLayoutError, match="question_id 'a/b' cannot name an HDF5 group"):
        export_seed_layout(source, tmp_path / "seed")
    with pytest.raises(SeedLayoutError, match="prefix 'x/y'"):
        export_seed_layout(columnar(tmp_path / "ok.h5", ["q1"]), tmp_path / "seed", prefix="x/y")
    with pytest.raises(SeedLayoutError, match="part size must be at least 1"):
        export_seed_layout(source, tmp_path / "seed", part_size=0)
    with pytest.raises(SeedLayoutError, match="cannot read embeddings file .*missing.h5"):
        export_seed_layout(tmp_path / "missing.h5", tmp_path / "seed")


def test_reads_a_file_written_by_the_seed_scripts(tmp_path):
    """Their files: groups in name order, no layers or failure attributes."""
    path = tmp_path / "gemma3_12b_embeddings_part_001.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {
                "model_name": "google/gemma-3-12b-it",
                "model_type": "gemma3",
                "device": "cuda",
                "dtype": "bfloat16",
                "num_samples": 2,
            }
        )
        for qid in ("b", "a"):
            group = f.create_group(qid)
            for name in ("question", "image_id", "answer", "ground_truth_answer"):
                group.create_dataset(name, data=f"{name} {qid}", dtype=h5py.string_dtype())
            group.create_dataset(VISION_ONLY, data=np.ones(5, np.float32))
            for representation in ("vision_token_representation", "query_token_representation"):
                for k in (0, 12):
                    group.create_dataset(f"{representation}/layer_{k}", data=np.full(8, k, np.float32))
    assert is_seed_layout(path) and is_seed_layout(tmp_path)
    emb = open_embeddings(path)
    assert emb.table["question_id"].tolist() == ["a", "b"]
    assert emb.table["answer"].tolist() == ["answer a", "answer b"]
    assert emb.layers == [0, 12]
    np.testing.assert_array_equal(emb.load("query_token_representation/layer_12"), np.full((2, 8), 12.0))


def test_inspect_reads_both_layouts(tmp_path, capsys):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2", "q3"], failed={"q3"})
    assert main(["export", str(source), str(tmp_path / "seed"), "--part-size", "2"]) == 0
    part = tmp_path / "seed" / "tiny_vl_1b_embeddings_part_001.h5"  # prefix from the model id
    assert not is_seed_layout(source) and is_seed_layout(part)
    assert describe(source).startswith(f"{source}: 3 samples, 2 ok, 1 failed")
    assert describe(tmp_path / "seed").startswith(f"{tmp_path / 'seed'}: 3 samples, 2 ok, 1 failed")
    capsys.readouterr()
    assert main(["inspect", str(part)]) == 0
    out = capsys.readouterr().out
    assert "model_name: Org/Tiny-VL-1B" in out and "query_token_representation/layer_2" in out
    assert main(["inspect", str(tmp_path / "nothing.h5")]) == 1
    assert "nothing.h5: no such file" in capsys.readouterr().err


def test_inspection_report_of_a_seed_layout(tmp_path):
    source = columnar(tmp_path / "embeddings.h5", ["q1", "q2"])
    export_seed_layout(source, tmp_path / "seed", prefix="tiny")
    out = tmp_path / "report"
    out.mkdir()
    assert (
        main(
            [
                "inspect",
                str(tmp_path / "seed"),
                "--html",
                str(out / "s.html"),
                "--png",
                str(out / "n.png"),
                "--json",
                str(out / "s.json"),
            ]
        )
        == 0
    )
    assert "2 samples: 2 ok, 0 failed" in (out / "s.html").read_text()
