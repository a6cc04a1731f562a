"""The numbers are right: positions, captured vectors against transformers' own hidden states, batching.

Every check compares the engine with an independent computation on the same tiny checkpoint of the real
architecture: an unbatched fp32 forward with output_hidden_states=True, the vision tower run on its own,
and an unbatched generate().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import NATIVE_FAMILIES
from oracle import assert_decoder_vectors_match, rel_error
from vlmstates.dataset import load_image, read_validated_table, resolve_image_path
from vlmstates.engine import Extractor, load_model
from vlmstates.settings import ModelSettings
from vlmstates.shards import questions_of
from vlmstates.store import STATUS_OK

N_SAMPLES = 8


def independent_vision_features(family: str, model, inputs) -> torch.Tensor:
    """The projector's input computed by running the vision tower alone, mean-pooled."""
    if family == "qwen2_5_vl":
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        return out.last_hidden_state.mean(dim=0)
    if family == "gemma3":
        return model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state.mean(dim=1)[0]
    raise AssertionError(family)


@pytest.fixture(scope="module", params=NATIVE_FAMILIES)
def extracted(request, tiny_checkpoint, demo):
    """One family's extractor (batch size 4, all layers, multimodal on) and its results on the demo."""
    family = request.param
    table, images = demo
    settings = ModelSettings.from_config(
        family,
        {"model": str(tiny_checkpoint(family)), "batch_size": 4, "max_new_tokens": 6, "multimodal_representation": True},
    )
    extractor = Extractor(load_model(settings), progress=False)
    questions = questions_of(read_validated_table(table).head(N_SAMPLES))
    results = extractor.extract(questions, images)
    return family, extractor, questions, images, results


def single_inputs(extractor, question, images):
    image = load_image(resolve_image_path(images, question.image_id))
    batch = extractor.adapter.build_batch(extractor.loaded, [extractor.settings.format_prompt(question.question)], [image])
    return batch


def test_all_layers_recorded_and_ok(extracted):
    family, extractor, questions, _, results = extracted
    assert extractor.layers == tuple(range(extractor.num_layers))
    assert [r.question_id for r in results] == [q.question_id for q in questions]
    assert all(r.status == STATUS_OK for r in results), [r.error for r in results]
    # the demo's images differ in size, so Qwen's dynamic resolution gives different image token counts
    if family == "qwen2_5_vl":
        assert len({r.num_image_tokens for r in results}) > 1


def test_positions_are_the_last_image_token_and_the_last_prompt_token(extracted):
    _, extractor, questions, images, results = extracted
    for question, result in zip(questions, results):
        ids = single_inputs(extractor, question, images).input_ids[0].tolist()
        image_positions = [i for i, t in enumerate(ids) if t == extractor.image_token_id]
        assert result.vision_token_position == image_positions[-1]
        assert ids[result.vision_token_position] == extractor.image_token_id
        assert result.num_image_tokens == len(image_positions)
        assert result.query_token_position == len(ids) - 1 == result.num_prompt_tokens - 1


def test_prompt_tokens_equal_the_processors_own_chat_template_route(extracted):
    """One user turn, the image then the text, generation prompt added; no special token doubled."""
    _, extractor, questions, images, _ = extracted
    processor = extractor.loaded.processor
    for question in questions[:3]:
        image = load_image(resolve_image_path(images, question.image_id))
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question.question}]}]
        expected = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        expected_ids = list(np.asarray(expected["input_ids"]).reshape(-1))
        assert single_inputs(extractor, question, images).input_ids[0].tolist() == expected_ids


def test_vectors_equal_unbatched_output_hidden_states(extracted):
    family, extractor, questions, images, results = extracted
    model = extractor.loaded.model
    with torch.inference_mode():
        for question, result in zip(questions, results):
            batch = single_inputs(extractor, question, images)
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, (family, question.question_id))
            vision = independent_vision_features(family, model, batch.inputs)
            assert rel_error(result.vectors["vision_only_representation"], vision) < 1e-4


def test_answers_equal_unbatched_generate(extracted):
    _, extractor, questions, images, results = extracted
    tokenizer = extractor.loaded.processor.tokenizer
    with torch.inference_mode():
        for question, result in zip(questions[:4], results):
            batch = single_inputs(extractor, question, images)
            out = extractor.loaded.model.generate(
                **batch.inputs, do_sample=False, max_new_tokens=extractor.settings.max_new_tokens
            )
            answer = tokenizer.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True).strip()
            assert result.answer == answer


def test_batch_of_four_equals_batch_of_one(extracted):
    family, extractor, questions, images, results = extracted
    singles = Extractor(extractor.loaded, progress=False, batch_size=1).extract(questions, images)
    for batched, single in zip(results, singles):
        assert batched.answer == single.answer
        assert batched.vision_token_position == single.vision_token_position
        assert batched.query_token_position == single.query_token_position
        for key, value in single.vectors.items():
            assert rel_error(batched.vectors[key], value) < 1e-4, (family, batched.question_id, key)
