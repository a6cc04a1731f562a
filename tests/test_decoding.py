"""`models.<name>.decoding`: the answer decoded with a static KV cache (`static`), its steps compiled
(`static_compiled`), or transformers' dynamic cache (`dynamic`, the default), on the tiny checkpoints (fp32, CPU).

A static cache changes no answer; the prefill the hooks capture attends over the cache's whole allocated
length (masked), so its vectors equal the dynamic path's within fp32 rounding, not bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import StaticCache

from vlmstates.dataset import read_validated_table
from vlmstates.extraction import engine
from vlmstates.extraction.adapters import adapter_for_family
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.settings import DECODINGS, DYNAMIC, STATIC, STATIC_COMPILED, ConfigError, ModelSettings
from vlmstates.store import STATUS_OK

#: of each vector's largest entry: measured 2.5e-7 at most (qwen2_5_vl, gemma3, gemma3n, glm4v, llava)
VECTOR_TOLERANCE = 1e-6


def settings(path, family: str, **entry) -> ModelSettings:
    values = {
        "model": str(path),
        "batch_size": 3,
        "max_new_tokens": 6,
        "device": "cpu",
        "dtype": "float32",
        "multimodal_representation": True,
    }
    return ModelSettings.from_config(family, values | entry)


def extract(tiny_checkpoint, demo, family: str, decoding: str, samples: int = 4):
    """(results, the recorded generation config, the cache class of each forward of the model)."""
    table, images = demo
    questions = questions_of(read_validated_table(table).head(samples))
    lm = load_model(settings(tiny_checkpoint(family), family, decoding=decoding))
    caches = []

    def record_cache(module, args, kwargs):
        caches.append(type(kwargs.get("past_key_values")))

    handle = lm.model.register_forward_pre_hook(record_cache, with_kwargs=True)
    extractor = Extractor(lm, progress=False)
    try:
        results = extractor.extract(questions, images)
    finally:
        handle.remove()
    return results, extractor.attributes()["generation_config"], caches


def assert_same_answers_and_close_vectors(dynamic, static):
    assert all(r.status == STATUS_OK for r in dynamic + static)
    assert [r.answer for r in static] == [r.answer for r in dynamic] and any(r.answer for r in dynamic)
    for a, b in zip(dynamic, static):
        assert a.vectors.keys() == b.vectors.keys()
        for key, expected in a.vectors.items():
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(b.vectors[key], expected, rtol=0, atol=VECTOR_TOLERANCE * scale, err_msg=key)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava"])
def test_a_static_cache_gives_the_dynamic_caches_answers_and_vectors(tiny_checkpoint, demo, family):
    dynamic, dynamic_record, dynamic_caches = extract(tiny_checkpoint, demo, family, DYNAMIC)
    static, static_record, static_caches = extract(tiny_checkpoint, demo, family, STATIC)
    assert_same_answers_and_close_vectors(dynamic, static)
    # every forward, prefill and decoding steps, ran with a static cache; the file says so
    assert static_caches and all(issubclass(cache, StaticCache) for cache in static_caches)
    assert not any(issubclass(cache, StaticCache) for cache in dynamic_caches)
    assert static_record["cache_implementation"] == "static" and static_record["disable_compile"] is True
    assert dynamic_record.get("cache_implementation") != "static" and "disable_compile" not in dynamic_record
    assert "compile_config" not in static_record


@pytest.mark.slow
def test_compiled_decoding_gives_the_dynamic_caches_answers(tiny_checkpoint, demo, monkeypatch):
    """static_compiled compiles the decoding step's forward (torch.compile, here on the CPU: the C compiler
    inductor needs) and answers as the dynamic cache does."""
    compiled = []
    compile_for_real = torch.compile

    def counting_compile(*args, **kwargs):
        compiled.append(kwargs)
        return compile_for_real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    dynamic, _, _ = extract(tiny_checkpoint, demo, "qwen2_5_vl", DYNAMIC, samples=3)
    assert compiled == []
    static, record, caches = extract(tiny_checkpoint, demo, "qwen2_5_vl", STATIC_COMPILED, samples=3)
    assert_same_answers_and_close_vectors(dynamic, static)
    assert len(compiled) == 1 and all(issubclass(cache, StaticCache) for cache in caches)
    assert record["cache_implementation"] == "static" and record["compile_config"]["backend"] == "inductor"


@pytest.mark.parametrize("family", ["molmo", "paligemma"])
def test_a_family_without_a_static_cache_is_refused_before_any_weight_is_read(tmp_path, family):
    """A folder with only a config.json: the refusal comes before the processor or the weights are read."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family}))
    reason = adapter_for_family(family).no_static_cache
    assert reason
    for decoding in (STATIC, STATIC_COMPILED):
        entry = {"trust_remote_code": True} if family == "molmo" else {}
        with pytest.raises(ConfigError, match=rf"models\.{family}\.decoding: {decoding} is not available") as error:
            load_model(settings(tmp_path, family, decoding=decoding, **entry))
        assert reason in str(error.value)


def test_paligemmas_refusal_is_still_needed(tiny_checkpoint, demo, monkeypatch):
    """The reason PaliGemma is refused: transformers' PaliGemma fails with a static cache. When an upgrade
    fixes it, this fails, and the refusal can go."""
    monkeypatch.setattr(engine, "check_decoding", lambda adapter, settings: None)
    results, _, _ = extract(tiny_checkpoint, demo, "paligemma", STATIC, samples=2)
    assert all(r.status != STATUS_OK and "'dict' object has no attribute 'ndim'" in r.error for r in results)


# -- settings --------------------------------------------------------------------------------------
def test_dynamic_keeps_the_config_hash_and_the_others_change_it():
    entry = {"model": "org/model"}
    plain = ModelSettings.from_config("m", entry)
    assert plain.decoding == DYNAMIC and "decoding" not in plain.identity()
    assert ModelSettings.from_config("m", entry | {"decoding": DYNAMIC}).config_hash() == plain.config_hash()
    hashes = {ModelSettings.from_config("m", entry | {"decoding": d}).config_hash() for d in DECODINGS}
    assert len(hashes) == len(DECODINGS)


def test_a_bad_decoding_names_the_key():
    with pytest.raises(ConfigError, match=r"models\.m\.decoding must be one of dynamic, static, static_compiled"):
        ModelSettings.from_config("m", {"model": "x", "decoding": "compiled"})
    with pytest.raises(ConfigError, match=r"models\.m\.decoding: static does nothing with answers: false"):
        ModelSettings.from_config("m", {"model": "x", "decoding": STATIC, "answers": False})
    for field_name in ("cache_implementation", "compile_config", "disable_compile", "use_cache"):
        with pytest.raises(ConfigError, match=rf"models\.m\.generation\.{field_name} cannot be set"):
            ModelSettings.from_config("m", {"model": "x", "generation": {field_name: "static"}})


def test_the_workflow_refuses_a_static_cache_for_a_family_without_one_before_any_job(tmp_path):
    from test_workflow import default_config, snakemake, workdir_with_config

    config = default_config()
    config["models"] = {"tiny_pg": {"model": "resources/checkpoints/tiny-paligemma", "decoding": STATIC}}
    result = snakemake(workdir_with_config(tmp_path, config), "-n", check=False)
    assert result.returncode != 0
    assert "models.tiny_pg.decoding: static is not available for the paligemma family" in result.stdout + result.stderr
