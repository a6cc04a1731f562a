"""Provenance of every number: each file records the device, CUDA and cuDNN, each sub-model's attention
implementation, the dtype, and per row the batch size it ran in; merging keeps them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from test_store import ATTRS, DIMS, make_results

from vlmstates.extraction.attention import attention_implementations
from vlmstates.extraction.engine import load_model, machine_attributes
from vlmstates.extraction.shards import extract_shard
from vlmstates.settings import ModelSettings
from vlmstates.store import (
    ATTENTION_IMPLEMENTATIONS_ATTR,
    BATCH_SIZE_COLUMN,
    CUDA_VERSION_ATTR,
    CUDNN_VERSION_ATTR,
    DEVICE_NAME_ATTR,
    MergeError,
    merge_shards,
    read_embeddings,
    read_results,
    write_embeddings,
)


def test_a_shard_records_the_machine_the_attention_and_each_rows_batch_size(tiny_checkpoint, demo, tmp_path):
    table, images = demo
    settings = ModelSettings.from_config(
        "tiny", {"model": str(tiny_checkpoint("qwen2_5_vl")), "max_new_tokens": 2, "batch_size": 4}
    )
    shard = read_embeddings(extract_shard(settings, table, images, 0, 6, tmp_path / "shard_0000.h5"))
    assert shard.attrs[DEVICE_NAME_ATTR].startswith("cpu")
    assert shard.attrs[CUDA_VERSION_ATTR] == "" and shard.attrs[CUDNN_VERSION_ATTR] == ""
    assert shard.attrs["dtype"] == "float32"
    config = load_model(settings).model.config
    recorded = json.loads(shard.attrs[ATTENTION_IMPLEMENTATIONS_ATTR])
    assert recorded == {
        "model": config._attn_implementation,
        "text_config": config.text_config._attn_implementation,
        "vision_config": config.vision_config._attn_implementation,
    }
    assert sorted(shard.table[BATCH_SIZE_COLUMN].tolist()) == [2, 2, 4, 4, 4, 4]  # 6 questions in 4 + 2
    assert sorted(r.batch_size for r in read_results(shard.path)) == [2, 2, 4, 4, 4, 4]


def test_the_gpu_and_its_cuda_and_cudnn_versions_are_read_from_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91300)
    assert machine_attributes(torch.device("cuda")) == {
        DEVICE_NAME_ATTR: "NVIDIA H100 80GB HBM3",
        CUDA_VERSION_ATTR: "13.0",
        CUDNN_VERSION_ATTR: "91300",
    }


def test_a_model_without_sub_configs_reports_its_own_attention():
    class Config:
        _attn_implementation = "eager"
        sub_configs: dict = {}

    class Model(torch.nn.Module):
        config = Config()

    assert attention_implementations(Model()) == {"model": "eager"}
    assert attention_implementations(torch.nn.Linear(1, 1)) == {"model": ""}  # no config at all


def _shard(path, ids, seed, batch_size, **attrs):
    results = make_results(ids, seed=seed)
    for r in results:
        r.batch_size = batch_size
    return write_embeddings(path, results, DIMS, ATTRS | attrs)


def test_merge_keeps_each_shards_machine_and_the_batch_size_column(tmp_path):
    machine = {CUDA_VERSION_ATTR: "13.0", ATTENTION_IMPLEMENTATIONS_ATTR: {"model": "sdpa"}}
    first = _shard(tmp_path / "a.h5", ["a", "b"], 0, 2, **{DEVICE_NAME_ATTR: "NVIDIA H100"}, **machine)
    second = _shard(tmp_path / "b.h5", ["c"], 1, 1, **{DEVICE_NAME_ATTR: "NVIDIA A100"}, **machine)
    merged = read_embeddings(merge_shards([first, second], ["a", "b", "c"], tmp_path / "all.h5"))
    assert merged.table[BATCH_SIZE_COLUMN].tolist() == [2, 2, 1]
    assert json.loads(merged.attrs[f"shard_{DEVICE_NAME_ATTR}s"]) == ["NVIDIA H100", "NVIDIA A100"]
    assert merged.attrs[DEVICE_NAME_ATTR] == f"mixed: see shard_{DEVICE_NAME_ATTR}s"  # not shard 0's alone
    assert merged.attrs[CUDA_VERSION_ATTR] == "13.0"  # the same everywhere: kept


def test_merge_refuses_shards_that_ran_different_attention(tmp_path):
    first = _shard(tmp_path / "a.h5", ["a"], 0, 1, **{ATTENTION_IMPLEMENTATIONS_ATTR: {"model": "sdpa"}})
    second = _shard(tmp_path / "b.h5", ["b"], 1, 1, **{ATTENTION_IMPLEMENTATIONS_ATTR: {"model": "eager"}})
    with pytest.raises(MergeError, match=ATTENTION_IMPLEMENTATIONS_ATTR):
        merge_shards([first, second], ["a", "b"], tmp_path / "all.h5")


def test_a_shard_written_before_the_batch_size_column_reads_and_merges_as_unknown(tmp_path):
    old = _shard(tmp_path / "old.h5", ["a"], 0, 4)
    with h5py.File(old, "a") as f:
        del f[BATCH_SIZE_COLUMN]
    new = _shard(tmp_path / "new.h5", ["b"], 1, 4)
    assert read_results(old)[0].batch_size == 0
    merged = read_embeddings(merge_shards([old, new], ["a", "b"], tmp_path / "all.h5"))
    np.testing.assert_array_equal(merged.table[BATCH_SIZE_COLUMN], [0, 4])
