"""Qwen3-VL's DeepStack: which state a decoder block's recorded vector is; and Qwen3-VL-MoE, served by the same entry.

Qwen3-VL adds vision features (each from an intermediate ViT block, through its own deepstack merger) to the
decoder's hidden states at the image positions after decoder blocks 0, 1 and 2 return, outside the blocks. A
block's forward hook, and transformers' `hidden_states[k + 1]`, see the state before that addition; block k + 1
reads the state after it. The engine records the block's output: this test shows it, on the tiny checkpoint.

Qwen3-VL-MoE (model_type qwen3_vl_moe) differs only in its decoder blocks' MLPs (sparse MoE); the qwen3_vl entry
serves it, and its tiny checkpoint (vlmstates.demo.tiny.qwen3_vl.build_moe, no family of its own) keeps the contract of
tests/test_family_contract.py here.
"""

from __future__ import annotations

import pytest
import torch
from oracle import assert_decoder_vectors_match, rel_error
from test_family_contract import qwen3_vl_vision

from vlmstates.demo.dataset import demo_questions
from vlmstates.demo.tiny.qwen3_vl import build_moe
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ModelSettings
from vlmstates.store import STATUS_OK, VISION_ONLY, layer_key


@pytest.fixture(scope="module")
def qwen3_vl(tiny_checkpoint, tmp_path_factory):
    settings = ModelSettings.from_config(
        "qwen3_vl",
        {
            "model": str(tiny_checkpoint("qwen3_vl")),
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": 2,
        },
    )
    images = tmp_path_factory.mktemp("qwen3-vl-deepstack")
    questions = demo_questions(images, 2, [(96, 64), (300, 200)], seed=5)
    loaded = load_model(settings)
    results = Extractor(loaded, progress=False, batch_size=2).extract(questions, images)
    return loaded, questions, images, results


def test_recorded_block_output_is_the_state_before_the_deepstack_injection(qwen3_vl):
    loaded, questions, images, results = qwen3_vl
    model = loaded.model
    blocks = loaded.adapter.decoder_blocks(model)
    injected = range(len(model.config.vision_config.deepstack_visual_indexes))  # after blocks 0, 1, 2
    assert list(injected) == [0, 1, 2] and len(blocks) == 4
    for question, result in zip(questions, results):
        image = load_image(resolve_image_path(images, question.image_id))
        inputs = loaded.adapter.build_batch(loaded, [loaded.settings.format_prompt(question.question)], [image]).inputs
        block_inputs = {}

        def keep_input(k):
            def hook(module, args):
                block_inputs[k] = args[0][0].clone()  # returns None: a returned value would replace the input

            return hook

        handles = [blocks[k + 1].register_forward_pre_hook(keep_input(k)) for k in injected]
        try:
            with torch.inference_mode():
                hidden = model(**inputs, output_hidden_states=True).hidden_states
                vision = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        finally:
            for handle in handles:
                handle.remove()
        vt, qt = result.vision_token_position, result.query_token_position
        for k in injected:
            recorded_vt = torch.from_numpy(result.vectors[layer_key("vision_token_representation", k)])
            recorded_qt = torch.from_numpy(result.vectors[layer_key("query_token_representation", k)])
            # the recorded vector is block k's output, before the injection: hidden_states[k + 1]
            assert rel_error(recorded_vt, hidden[k + 1][0, vt]) < 1e-4, k
            # block k + 1 reads it plus the k-th deepstack feature of the last image token (the image's last row)
            assert rel_error(block_inputs[k][vt], hidden[k + 1][0, vt] + vision.deepstack_features[k][-1]) < 1e-4, k
            assert rel_error(recorded_vt, block_inputs[k][vt]) > 1e-2, k
            # text positions get no injection: there the recorded vector is block k + 1's input too
            assert rel_error(recorded_qt, block_inputs[k][qt]) < 1e-4, k


def test_qwen3_vl_moe_is_served_by_the_entry_and_keeps_the_contract(tmp_path):
    checkpoint = build_moe(tmp_path / "tiny-qwen3_vl_moe")
    settings = ModelSettings.from_config(
        "qwen3_vl_moe",
        {
            "model": str(checkpoint),
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": 3,
            "multimodal_representation": True,
        },
    )
    images = tmp_path / "images"
    questions = demo_questions(images, 4, [(96, 64), (640, 480), (64, 128), (300, 200)], seed=3)
    loaded = load_model(settings)
    model = loaded.model
    assert loaded.adapter.family == "qwen3_vl" and type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert type(loaded.adapter.decoder_blocks(model)[0].mlp).__name__ == "Qwen3VLMoeTextSparseMoeBlock"
    batched = Extractor(loaded, progress=False, batch_size=4).extract(questions, images)
    singles = Extractor(loaded, progress=False, batch_size=1).extract(questions, images)
    assert all(r.status == STATUS_OK for r in batched + singles)
    assert len({r.num_image_tokens for r in batched}) > 1 and len({r.num_prompt_tokens for r in batched}) > 1
    extractor = Extractor(loaded, progress=False)
    image_token = loaded.adapter.image_token_id(model)
    tokenizer = loaded.processor.tokenizer
    with torch.inference_mode():
        for question, result, single in zip(questions, batched, singles):
            image = load_image(resolve_image_path(images, question.image_id))
            batch = loaded.adapter.build_batch(loaded, [loaded.settings.format_prompt(question.question)], [image])
            ids = batch.input_ids[0].tolist()
            assert result.vision_token_position == max(i for i, t in enumerate(ids) if t == image_token)
            assert result.query_token_position == len(ids) - 1
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, ("qwen3_vl_moe", question.question_id))
            assert rel_error(result.vectors[VISION_ONLY], qwen3_vl_vision(model, batch.inputs)) < 1e-4
            assert result.answer == single.answer
            for key, value in single.vectors.items():
                assert rel_error(result.vectors[key], value) < 1e-4, (question.question_id, key)
            out = model.generate(**batch.inputs, do_sample=False, max_new_tokens=3)
            assert result.answer == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
