"""Batching: length-sorted plans, results in dataset order, prefetching, `batch_size: auto`, batch caps.

All on CPU with the tiny checkpoints; batched results must equal batch-1 results within fp32 tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from oracle import assert_same_results
from PIL import Image

from vlmstates.demo.dataset import demo_questions
from vlmstates.extraction import batching
from vlmstates.extraction.adapters import adapter_class
from vlmstates.extraction.batching import AUTO_BATCH_FIXED, SortKey, plan_batches, read_image_size, sort_keys
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import batch_size_for_attempt
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import STATUS_FAILED, STATUS_OK

# Mixed sizes: Qwen's dynamic resolution gives 6 to 32 image tokens, Phi-4 one to six crops (groups).
MIXED_SIZES = {
    "qwen2_5_vl": [(96, 64), (640, 480), (64, 128), (1024, 768), (300, 200)],
    "gemma3": [(96, 64), (640, 480), (64, 128), (1024, 768)],
    "phi4_multimodal": [(448, 448), (600, 300), (300, 200), (500, 500)],
}
N_SAMPLES = 10


@pytest.fixture(scope="module", params=list(MIXED_SIZES))
def setup(request, tiny_checkpoint, tmp_path_factory):
    """A family's loaded tiny model and questions with images of mixed sizes and questions of mixed lengths."""
    family = request.param
    settings = ModelSettings.from_config(
        family, {"model": str(tiny_checkpoint(family)), "max_new_tokens": 3, "multimodal_representation": True}
    )
    images = tmp_path_factory.mktemp(f"images-{family}")
    questions = demo_questions(images, N_SAMPLES, MIXED_SIZES[family], seed=1)
    loaded = load_model(settings)
    singles = Extractor(loaded, progress=False, batch_size=1).extract(questions, images)
    assert all(r.status == STATUS_OK for r in singles), [r.error for r in singles]
    return family, loaded, questions, images, singles


# -- the plan ------------------------------------------------------------------------------------------
def test_plan_groups_sorts_longest_first_and_puts_unreadable_last():
    keys = [SortKey(0, 10), SortKey(1, 50), None, SortKey(0, 30), SortKey(0, 30), SortKey(1, 5), SortKey(0, 20)]
    plan = plan_batches(keys, batch_size=2)
    assert plan == [[1, 5], [3, 4], [6, 0], [2]]
    assert sorted(i for batch in plan for i in batch) == list(range(len(keys)))
    assert plan_batches(keys, batch_size=2) == plan  # a function of its inputs: a resumed run plans the same


def test_batches_are_formed_by_length_not_dataset_order(setup):
    _, loaded, questions, images, _ = setup
    keys = sort_keys(loaded, questions, images)
    plan = plan_batches(keys, 4)
    assert plan != [list(range(i, min(i + 4, len(questions)))) for i in range(0, len(questions), 4)]
    lengths = [keys[b[0]].length for b in plan]
    assert lengths == sorted(lengths, reverse=True)


# -- results -------------------------------------------------------------------------------------------
def test_length_sorted_batches_equal_batch_of_one_in_dataset_order(setup):
    _, loaded, questions, images, singles = setup
    batched = Extractor(loaded, progress=False, batch_size=4).extract(questions, images)
    assert [r.question_id for r in batched] == [q.question_id for q in questions]
    assert_same_results(batched, singles)


def test_prefetching_gives_identical_results(setup):
    _, loaded, questions, images, _ = setup
    inline = Extractor(loaded, progress=False, batch_size=4, prefetch=0).extract(questions, images)
    ahead = Extractor(loaded, progress=False, batch_size=4, prefetch=2).extract(questions, images)
    assert_same_results(ahead, inline, exact=True)


def test_an_image_that_fails_to_decode_fails_alone_inside_its_batch(setup, tmp_path):
    _, loaded, questions, images, singles = setup
    for q in questions:
        (tmp_path / q.image_id).write_bytes((images / q.image_id).read_bytes())
    broken = tmp_path / questions[1].image_id
    with Image.open(broken) as image:  # as a JPEG, whose header reads without its pixels (a PNG's EXIF needs them)
        pixels = image.convert("RGB")
    pixels.save(broken, format="JPEG")
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    assert read_image_size(tmp_path, questions[1].image_id) is not None  # the header reads, the pixels do not
    results = Extractor(loaded, progress=False, batch_size=4).extract(questions, tmp_path)
    assert results[1].status == STATUS_FAILED and results[1].error.startswith("image:")
    assert_same_results(results[:1] + results[2:], singles[:1] + singles[2:])


# -- batch size: auto, caps, settings --------------------------------------------------------------------
def test_auto_batch_size_probes_full_length_answers_keeps_a_margin_and_records_a_normal_run(setup, monkeypatch):
    family, loaded, questions, images, singles = setup
    if family != "qwen2_5_vl":
        pytest.skip("the search does not depend on the family; one without batch groups shows it plainly")
    adapter_type = type(loaded.adapter)
    generate = adapter_type.generate
    calls = []  # (rows, max_new_tokens, min_new_tokens) of each generate() call

    def spy(self, loaded, batch, max_new_tokens, min_new_tokens=0):
        calls.append((batch.input_ids.shape[0], max_new_tokens, min_new_tokens))
        return generate(self, loaded, batch, max_new_tokens, min_new_tokens)

    monkeypatch.setattr(adapter_type, "generate", spy)
    monkeypatch.setattr(batching, "searches_batch_size", lambda device: True)
    monkeypatch.setenv("VLMSTATES_FAILPOINT", "oom_above:5")  # a GPU that fits 5 rows
    extractor = Extractor(loaded, progress=False, batch_size="auto")
    results = extractor.extract(questions, images)
    # 10 samples: the probe decodes every answer to max_new_tokens; 10 rows do not fit, 5 do, 3 keep a margin
    assert calls[:2] == [(10, 3, 3), (5, 3, 3)]
    assert extractor.batch_size == 3 == 5 * batching.AUTO_BATCH_MARGIN[0] // batching.AUTO_BATCH_MARGIN[1]
    assert calls[2:] == [(3, 3, 0)] * 3 + [(1, 3, 0)]  # then a normal run, the probed batch included
    # the file is what a fixed batch size of 3 gives: the probe's answers and vectors are not kept
    monkeypatch.delenv("VLMSTATES_FAILPOINT")
    fixed = Extractor(loaded, progress=False, batch_size=3).extract(questions, images)
    assert_same_results(results, fixed, exact=True)
    assert [r.batch_size for r in results] == [r.batch_size for r in fixed]
    assert_same_results(results, singles)


def test_auto_batch_size_starts_above_64_for_small_models_and_keeps_64_from_7b():
    assert batching.auto_batch_start(500_000_000) == 256
    assert batching.auto_batch_start(2_200_000_000) == 128
    assert batching.auto_batch_start(7_000_000_000) == batching.auto_batch_start(72_000_000_000) == 64
    keys = [SortKey(0, 1000 - i) for i in range(300)]
    tried = []

    def probe(indices, fits):
        tried.append(len(indices))
        if len(indices) > fits:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    found = batching.find_batch_size(keys, lambda b: True, lambda b: probe(b, fits=100), start=256)
    assert tried == [256, 128, 64] and found.batch_size == 48  # 64 fits, 3/4 of it keeps the margin
    assert found.batches == plan_batches(keys, 48)
    tried.clear()
    found = batching.find_batch_size(keys, lambda b: True, lambda b: probe(b, fits=300), start=256)
    assert tried == [256] and found.batch_size == 256  # nothing ran out: the start is the size, no margin


def test_auto_batch_size_without_device_memory_is_the_fixed_default(setup):
    _, loaded, questions, images, singles = setup
    extractor = Extractor(loaded, progress=False, batch_size="auto")
    assert_same_results(extractor.extract(questions[:3], images), singles[:3])
    assert extractor.batch_size == AUTO_BATCH_FIXED


def test_the_adapters_max_batch_size_caps_the_batch(tiny_checkpoint, caplog, monkeypatch):
    class CappedQwen(adapter_class("qwen2_5_vl")):
        max_batch_size = 2

    settings = ModelSettings.from_config("tiny", {"model": str(tiny_checkpoint("qwen2_5_vl")), "max_new_tokens": 2})
    loaded = replace(load_model(settings), adapter=CappedQwen())
    with caplog.at_level(logging.INFO, logger="vlmstates.extraction.engine"):
        assert Extractor(loaded, progress=False, batch_size=8).batch_size == 2
        assert Extractor(loaded, progress=False, batch_size="auto").batch_size == 2
        assert Extractor(loaded, progress=False, batch_size=1).batch_size == 1
    assert sum("capped at 2" in m for m in caplog.messages) == 2


def test_batch_size_setting_accepts_auto():
    assert ModelSettings.from_config("m", {"model": "x", "batch_size": "auto"}).batch_size == "auto"
    for bad in (0, "big", True, 2.5):
        with pytest.raises(ConfigError, match="batch_size"):
            ModelSettings.from_config("m", {"model": "x", "batch_size": bad})
    assert batch_size_for_attempt("auto", 3) == "auto" and batch_size_for_attempt(8, 3) == 2


# -- what the file records, and the mode it runs in ---------------------------------------------------------
def test_attention_implementation_is_recorded_and_prefill_runs_in_inference_mode(setup):
    _, loaded, questions, images, _ = setup
    extractor = Extractor(loaded, progress=False, batch_size=4)
    assert extractor.attributes()["attn_implementation"] == loaded.model.config._attn_implementation == "sdpa"
    modes = []
    handle = extractor.adapter.decoder_blocks(loaded.model)[0].register_forward_hook(
        lambda module, args, output: modes.append(torch.is_inference_mode_enabled())
    )
    try:
        extractor.extract(questions[:2], images)
    finally:
        handle.remove()
    assert modes and all(modes)
