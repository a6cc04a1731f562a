"""The capture hooks run in the prefill only: each removes itself once its vectors are taken, so the decoding
steps of generate() run without them (tiny Qwen2.5-VL, fp32, CPU)."""

from __future__ import annotations

import math

import pytest

from vlmstates.dataset import read_validated_table
from vlmstates.extraction.capture import PrefillCapture
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.settings import ModelSettings
from vlmstates.store import STATUS_OK

BATCH = 2


def events_of_a_run(tiny_checkpoint, demo, monkeypatch, answers: bool) -> tuple[list[str], list, int]:
    """The order in which the engine armed the capture, the model ran a prefill or a decoding step, and a
    capture hook was called."""
    table, images = demo
    questions = questions_of(read_validated_table(table).head(2 * BATCH + 1))
    settings = ModelSettings.from_config(
        "qwen",
        {
            "model": str(tiny_checkpoint("qwen2_5_vl")),
            "batch_size": BATCH,
            "max_new_tokens": 4,
            "device": "cpu",
            "dtype": "float32",
            "layers": [0, 1],
            "answers": answers,
        },
    )
    lm = load_model(settings)
    events: list[str] = []
    arm, block_hook, projector_hook = PrefillCapture.arm, PrefillCapture._block_hook, PrefillCapture._projector_hook

    def logged_arm(self, *args, **kwargs):
        events.append("arm")
        return arm(self, *args, **kwargs)

    def counted_block_hook(self, layer):
        hook = block_hook(self, layer)

        def counted(module, args, output):
            events.append("capture")
            return hook(module, args, output)

        return counted

    def counted_projector_hook(self, module, args):
        events.append("capture")
        return projector_hook(self, module, args)

    def step(module, args, kwargs):  # a decoding step feeds one new position per row
        ids = kwargs.get("input_ids")
        ids = kwargs["inputs_embeds"] if ids is None else ids
        events.append("prefill" if ids.shape[1] > 1 else "decode")

    monkeypatch.setattr(PrefillCapture, "arm", logged_arm)
    monkeypatch.setattr(PrefillCapture, "_block_hook", counted_block_hook)
    monkeypatch.setattr(PrefillCapture, "_projector_hook", counted_projector_hook)
    handle = lm.model.register_forward_pre_hook(step, with_kwargs=True)
    try:
        results = Extractor(lm, progress=False, min_new_tokens=4).extract(questions, images)
    finally:
        handle.remove()
    return events, results, math.ceil(len(questions) / BATCH)


@pytest.mark.parametrize("answers", [True, False], ids=["generating", "prefill_only"])
def test_no_capture_hook_runs_after_the_prefill(tiny_checkpoint, demo, monkeypatch, answers):
    events, results, batches = events_of_a_run(tiny_checkpoint, demo, monkeypatch, answers)
    assert all(r.status == STATUS_OK for r in results)
    assert events.count("arm") == events.count("prefill") == batches
    assert events.count("decode") == (batches * 3 if answers else 0)  # 4 new tokens: 3 steps after the prefill
    # each batch: the projector's hook and one per recorded block (2), once each, and none once decoding began
    per_batch = " ".join(events).split("arm")[1:]
    assert [part.split().count("capture") for part in per_batch] == [3] * batches
    assert all("capture" not in part.partition("decode")[2] for part in per_batch), events
