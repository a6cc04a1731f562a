"""The HDF5 schema: round trip, and merges that refuse anything incomplete or inconsistent."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import REPO

from vlmstates.store import (
    LAYERED_REPRESENTATIONS,
    STATUS_FAILED,
    VISION_ONLY,
    MergeError,
    SampleResult,
    iter_layers,
    layer_key,
    merge_shards,
    parse_key,
    read_embeddings,
    write_embeddings,
)

LAYERS = (0, 2)
DIMS = {VISION_ONLY: 3} | {
    layer_key(r, k): 4 for r in ("vision_token_representation", "query_token_representation") for k in LAYERS
}
ATTRS = {"model": "m", "family": "f", "layers": list(LAYERS), "config_hash": "abc", "dtype": "float32"}


def make_results(ids, seed=0, failed=()):
    rng = np.random.default_rng(seed)
    results = []
    for qid in ids:
        if qid in failed:
            results.append(SampleResult.failed(qid, f"img_{qid}.png", f"q {qid}?", "yes", "image: broken"))
            continue
        vectors = {key: rng.standard_normal(dim).astype(np.float32) for key, dim in DIMS.items()}
        results.append(
            SampleResult(
                qid,
                f"img_{qid}.png",
                f"q {qid}?",
                "yes",
                answer="no",
                vision_token_position=3,
                query_token_position=9,
                num_prompt_tokens=10,
                num_image_tokens=4,
                vectors=vectors,
            )
        )
    return results


def write_shards(tmp_path, groups, attrs=ATTRS):
    paths = []
    for i, ids in enumerate(groups):
        paths.append(write_embeddings(tmp_path / f"shard_{i}.h5", make_results(ids, seed=i), DIMS, attrs))
    return paths


def test_round_trip_keeps_strings_ids_and_vectors(tmp_path):
    ids = ["001", "002", "010"]
    results = make_results(ids, failed={"002"})
    emb = read_embeddings(write_embeddings(tmp_path / "x.h5", results, DIMS, ATTRS))
    assert emb.table["question_id"].tolist() == ids
    assert emb.table["status"].tolist() == ["ok", STATUS_FAILED, "ok"]
    assert emb.table["error"][1] == "image: broken"
    assert emb.layers == list(LAYERS)
    assert emb.representation_keys()[0] == VISION_ONLY
    data = emb.load(layer_key("query_token_representation", 2))
    np.testing.assert_array_equal(data[0], results[0].vectors[layer_key("query_token_representation", 2)])
    assert np.isnan(data[1]).all()  # a failed sample keeps its row, with NaN vectors
    assert not list(tmp_path.glob(".*tmp*"))


def test_merge_concatenates_in_dataset_order(tmp_path):
    paths = write_shards(tmp_path, [["a", "b"], ["c"]])
    merged = read_embeddings(merge_shards(paths, ["a", "b", "c"], tmp_path / "all.h5"))
    assert merged.table["question_id"].tolist() == ["a", "b", "c"]
    expected = np.concatenate([read_embeddings(p).load(VISION_ONLY) for p in paths])
    np.testing.assert_array_equal(merged.load(VISION_ONLY), expected)
    assert merged.attrs["num_shards"] == 2


@pytest.mark.parametrize(
    "groups, expected, message",
    [
        ([["a", "b"]], ["a", "b", "c"], "in no shard"),
        ([["a", "b"], ["b", "c"]], ["a", "b", "c"], "appears twice"),
        ([["b", "c"], ["a"]], ["a", "b", "c"], "out of dataset order"),
        ([["a", "b", "x"]], ["a", "b"], "not in the validated dataset"),
    ],
)
def test_merge_refuses_incomplete_coverage(tmp_path, groups, expected, message):
    with pytest.raises(MergeError, match=message):
        merge_shards(write_shards(tmp_path, groups), expected, tmp_path / "all.h5")
    assert not (tmp_path / "all.h5").exists()


def test_merge_refuses_disagreeing_layers(tmp_path):
    first = write_shards(tmp_path, [["a"]])
    other = write_embeddings(tmp_path / "other.h5", make_results(["b"]), DIMS, ATTRS | {"layers": [0, 1]})
    with pytest.raises(MergeError, match=r"other\.h5: attribute 'layers'"):
        merge_shards(first + [other], ["a", "b"], tmp_path / "all.h5")


def test_merge_refuses_non_finite_vectors_of_ok_rows(tmp_path):
    path = write_shards(tmp_path, [["a", "b"]])[0]
    with h5py.File(path, "r+") as f:
        f[VISION_ONLY][1, 0] = np.inf
    with pytest.raises(MergeError, match="non-finite values in 1 rows with status ok .question_id b"):
        merge_shards([path], ["a", "b"], tmp_path / "all.h5")


def test_merge_refuses_truncated_shard(tmp_path):
    paths = write_shards(tmp_path, [["a"], ["b"]])
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])
    with pytest.raises(MergeError, match=r"shard_1\.h5 is unreadable"):
        merge_shards(paths, ["a", "b"], tmp_path / "all.h5")


def test_merge_keeps_the_generation_settings_and_refuses_disagreeing_ones(tmp_path):
    plain = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 8}
    penalised = plain | {"repetition_penalty": 1.05}
    first = write_embeddings(tmp_path / "a.h5", make_results(["a"]), DIMS, ATTRS | {"generation_config": plain})
    second = write_embeddings(
        tmp_path / "b.h5", make_results(["b"], seed=1), DIMS, ATTRS | {"generation_config": plain}
    )
    merged = read_embeddings(merge_shards([first, second], ["a", "b"], tmp_path / "all.h5"))
    assert merged.generation_config == plain
    other = write_embeddings(
        tmp_path / "c.h5", make_results(["b"], seed=1), DIMS, ATTRS | {"generation_config": penalised}
    )
    with pytest.raises(MergeError, match=r"c\.h5: attribute 'generation_config'"):
        merge_shards([first, other], ["a", "b"], tmp_path / "all2.h5")
    assert (
        read_embeddings(write_embeddings(tmp_path / "old.h5", make_results(["a"]), DIMS, ATTRS)).generation_config
        is None
    )


def test_vector_keys_read_back_into_representation_and_layer():
    for representation in LAYERED_REPRESENTATIONS:
        assert parse_key(layer_key(representation, 12)) == (representation, 12)
    assert parse_key(VISION_ONLY) == (VISION_ONLY, None)
    for bad in ("question_id", "query_token_representation/layer_x", "other_representation/layer_1"):
        with pytest.raises(ValueError, match="not a vector"):
            parse_key(bad)
    keys = [layer_key("query_token_representation", k) for k in (10, 2)] + [VISION_ONLY]
    assert iter_layers(keys, "query_token_representation") == [2, 10]


def attribute_names_written_as_literals(source: str) -> list[str]:
    """String literals used as a key of something called `attrs` (`x.attrs["name"]`, `attrs.get("name")`)."""
    import ast

    def is_attrs(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "attrs") or (
            isinstance(node, ast.Attribute) and node.attr == "attrs"
        )

    found = []
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Subscript) and is_attrs(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_attrs(node.func.value):
            key = node.args[0] if node.args else None
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.append(key.value)
    return found


def test_file_attribute_names_are_written_only_in_the_store():
    package = REPO / "src" / "vlmstates"
    literals = {
        str(path.relative_to(package)): names
        for path in sorted(package.rglob("*.py"))
        if path.name != "store.py" and (names := attribute_names_written_as_literals(path.read_text()))
    }
    assert literals == {}
    assert attribute_names_written_as_literals('f.attrs["model"]; attrs.get("family")') == ["model", "family"]
