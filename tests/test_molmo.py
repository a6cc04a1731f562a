"""The Molmo adapter, tested against a STAND-IN for Molmo's remote code (tests/molmo_standin), not the real model.

The real Molmo checkpoints exist only as remote code with a hard-coded CLIP ViT-L/14-336, so no tiny
checkpoint of them can be built. The stand-in is our own small implementation of the same interface
(module paths, `processor.process` outputs, `generate_from_batch`), written into a local folder and loaded
through transformers' real remote-code path (`trust_remote_code=True`, `auto_map`). These tests show the
adapter reads that interface correctly: positions, captured vectors against an unbatched forward with
output_hidden_states, the vision-only vector, answers, and the batch handling. They say nothing about
whether the real remote code behaves as the stand-in does. The file runs under transformers 5.x (the
project's default environment) and 4.48.3 (envs/molmo.yaml, see .ci/molmo-env.sh).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from molmo_standin import build_standin_checkpoint
from oracle import assert_decoder_vectors_match, rel_error
from vlmstates.adapters import family_of_model_type
from vlmstates.adapters.molmo import MolmoAdapter, left_pad_collate
from vlmstates.dataset import load_image, read_validated_table, resolve_image_path
from vlmstates.engine import Extractor, load_model
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.shards import questions_of
from vlmstates.store import STATUS_OK, VISION_ONLY, layer_key

N_SAMPLES = 8
MAX_NEW_TOKENS = 6


def molmo_settings(folder, **entry) -> ModelSettings:
    values = {"model": str(folder), "trust_remote_code": True, "max_new_tokens": MAX_NEW_TOKENS}
    values.update(entry)
    return ModelSettings.from_config("molmo_standin", values)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_standin_checkpoint(tmp_path_factory.mktemp("molmo") / "molmo_standin_checkpoint")


@pytest.fixture(scope="module")
def extracted(standin, demo):
    """Extraction of the demo's first questions; the config asks for batches of 4, the adapter runs 1."""
    table, images = demo
    settings = molmo_settings(standin, batch_size=4, multimodal_representation=True)
    extractor = Extractor(load_model(settings), progress=False)
    questions = questions_of(read_validated_table(table).head(N_SAMPLES))
    return extractor, questions, images, extractor.extract(questions, images)


def processed(extractor, question, images) -> dict:
    """One sample straight from the processor, as the model card feeds it: a batch of one."""
    image = load_image(resolve_image_path(images, question.image_id))
    text = extractor.settings.format_prompt(question.question)
    sample = extractor.loaded.processor.process(images=[image], text=text)
    return {k: v.unsqueeze(0) for k, v in sample.items()}


# -- loading -----------------------------------------------------------------------------------------
def test_loading_refuses_without_trust_remote_code(standin):
    with pytest.raises(ConfigError, match=r"models\.molmo_standin\.trust_remote_code"):
        load_model(molmo_settings(standin, trust_remote_code=False))


def test_loading_refuses_an_attention_setting(standin):
    with pytest.raises(ConfigError, match=r"models\.molmo_standin\.attn_implementation"):
        load_model(molmo_settings(standin, attn_implementation="eager"))


def test_loads_through_remote_code(extracted):
    extractor, *_ = extracted
    loaded = extractor.loaded
    assert family_of_model_type("molmo") == "molmo"
    assert isinstance(loaded.adapter, MolmoAdapter)
    # the classes come from the checkpoint folder's files, imported by transformers' remote-code loader
    assert type(loaded.model).__module__.startswith("transformers_modules.")
    assert type(loaded.processor).__module__.startswith("transformers_modules.")
    assert loaded.settings.batch_size == 1
    assert extractor.image_token_id == loaded.processor.tokenizer.convert_tokens_to_ids("<im_patch>")
    dims = extractor.vector_dims()
    assert dims[VISION_ONLY] == 24 and dims[layer_key("query_token_representation", 0)] == 32
    assert extractor.layers == tuple(range(extractor.num_layers)) == (0, 1, 2, 3)


# -- positions ---------------------------------------------------------------------------------------
def test_positions_come_from_image_input_idx(extracted):
    extractor, questions, images, results = extracted
    patch_id = extractor.image_token_id
    assert all(r.status == STATUS_OK for r in results), [r.error for r in results]
    for question, result in zip(questions, results):
        sample = processed(extractor, question, images)
        ids = sample["input_ids"][0].tolist()
        index = sample["image_input_idx"][0]
        assert result.vision_token_position == int(index.max())
        assert result.vision_token_position == max(i for i, t in enumerate(ids) if t == patch_id)
        assert result.num_image_tokens == int((index >= 0).sum())
        assert result.query_token_position == len(ids) - 1 == result.num_prompt_tokens - 1
    # the demo's images differ in shape, so the crop grids (and token counts) differ
    assert len({r.num_image_tokens for r in results}) > 1


def test_positions_reject_a_row_without_image_tokens(extracted):
    extractor, questions, images, _ = extracted
    sample = {k: v[0] for k, v in processed(extractor, questions[0], images).items()}
    sample["image_input_idx"] = torch.full_like(sample["image_input_idx"], -1)
    batch = left_pad_collate([sample], torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="no image patch token"):
        extractor.adapter.find_positions(extractor.loaded, batch)


# -- vectors -----------------------------------------------------------------------------------------
def test_vectors_equal_unbatched_output_hidden_states(extracted):
    extractor, questions, images, results = extracted
    model = extractor.loaded.model
    with torch.inference_mode():
        for question, result in zip(questions, results):
            hidden = model(**processed(extractor, question, images), output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, question.question_id)


def test_vision_only_is_the_mean_of_the_projector_input_over_used_tokens(extracted):
    """Run the vision backbone alone, take image_projector's input, average the tokens that enter the prompt."""
    extractor, questions, images, results = extracted
    backbone = extractor.loaded.model.model.vision_backbone
    seen = []
    handle = backbone.image_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    some_unused = False
    try:
        with torch.inference_mode():
            for question, result in zip(questions, results):
                sample = processed(extractor, question, images)
                seen.clear()
                backbone(sample["images"], sample["image_masks"])
                features = seen[0][0]  # [crops, tokens, D]
                index = sample["image_input_idx"][0]
                assert features.shape[:2] == index.shape
                used = [features[c, t] for c in range(index.shape[0]) for t in range(index.shape[1]) if index[c, t] >= 0]
                expected = torch.stack(used).mean(dim=0)
                assert rel_error(result.vectors[VISION_ONLY], expected) < 1e-4, question.question_id
                if len(used) < index.numel():
                    some_unused = True
                    assert rel_error(result.vectors[VISION_ONLY], features.reshape(-1, features.shape[-1]).mean(0)) > 1e-3
    finally:
        handle.remove()
    assert some_unused, "no sample had unused pooled tokens; the mask was not exercised"


# -- answers -----------------------------------------------------------------------------------------
def test_answers_equal_a_direct_generate_from_batch(extracted):
    from transformers import GenerationConfig

    extractor, questions, images, results = extracted
    tokenizer = extractor.loaded.processor.tokenizer
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, stop_strings="<|endoftext|>", use_cache=True)
    with torch.inference_mode():
        for question, result in zip(questions[:4], results):
            sample = processed(extractor, question, images)
            output = extractor.loaded.model.generate_from_batch(sample, config, tokenizer=tokenizer)
            answer = tokenizer.decode(output[0, sample["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            assert result.answer == answer


def test_generate_is_one_prefill_then_decode_steps(extracted):
    """The hooks' premise: the first block call of generate_from_batch is the whole prompt."""
    extractor, questions, images, _ = extracted
    adapter, loaded = extractor.adapter, extractor.loaded
    lengths = []
    handle = adapter.decoder_blocks(loaded.model)[0].register_forward_hook(
        lambda module, args, output: lengths.append(output[0].shape[1])
    )
    try:
        image = load_image(resolve_image_path(images, questions[0].image_id))
        batch = adapter.build_batch(loaded, [questions[0].question], [image])
        with torch.inference_mode():
            adapter.generate(loaded, batch, max_new_tokens=4, min_new_tokens=4)
    finally:
        handle.remove()
    assert lengths == [batch.input_ids.shape[1], 1, 1, 1]


# -- batches -----------------------------------------------------------------------------------------
def test_left_pad_collate_shifts_image_input_idx(extracted):
    extractor, questions, images, _ = extracted
    samples = [{k: v[0] for k, v in processed(extractor, q, images).items()} for q in questions[:4]]
    lengths = [s["input_ids"].shape[0] for s in samples]
    crops = [s["images"].shape[0] for s in samples]
    assert len(set(lengths)) > 1 and len(set(crops)) > 1
    batch = left_pad_collate(samples, torch.float32, torch.device("cpu"))
    width = max(lengths)
    assert batch.input_ids.shape == (4, width) and batch.inputs["images"].shape[1] == max(crops)
    for row, sample in enumerate(samples):
        pad = width - lengths[row]
        assert batch.input_ids[row, :pad].eq(-1).all() and batch.attention_mask[row, :pad].eq(0).all()
        assert batch.input_ids[row, pad:].tolist() == sample["input_ids"].tolist()
        shifted = batch.inputs["image_input_idx"][row]
        n = crops[row]
        assert shifted[n:].eq(-1).all() and batch.inputs["images"][row, n:].eq(-1).all()
        original = sample["image_input_idx"]
        assert torch.equal(shifted[:n] >= 0, original >= 0)
        assert torch.equal(shifted[:n][original >= 0], original[original >= 0] + pad)
    positions = extractor.adapter.find_positions(extractor.loaded, batch)
    assert positions.vision == [int(s["image_input_idx"].max()) for s in samples]
    assert positions.query == [n - 1 for n in lengths]


def test_left_padded_prefill_equals_unbatched(extracted):
    """With image_input_idx shifted, a left-padded prefill matches each sample's own forward: only the
    first answer token of generate_from_batch (taken at column valid-1) rules batching out."""
    extractor, questions, images, _ = extracted
    model = extractor.loaded.model
    samples = [{k: v[0] for k, v in processed(extractor, q, images).items()} for q in questions[:3]]
    batch = left_pad_collate(samples, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        batched = model(**batch.inputs, output_hidden_states=True).hidden_states
        for row, sample in enumerate(samples):
            single = model(**{k: v[None] for k, v in sample.items()}, output_hidden_states=True).hidden_states
            pad = batch.input_ids.shape[1] - sample["input_ids"].shape[0]
            for k in range(1, len(single)):
                assert rel_error(batched[k][row, pad:], single[k][0]) < 1e-4, (row, k)


def test_a_larger_batch_runs_one_sample_at_a_time(extracted):
    """Handed batches of 4 (as shards.py does from the config), results equal the one-sample run."""
    extractor, questions, images, results = extracted
    adapter, loaded = extractor.adapter, extractor.loaded
    images_of = [load_image(resolve_image_path(images, q.image_id)) for q in questions[:2]]
    with pytest.raises(ValueError, match="one sample per batch"):
        adapter.build_batch(loaded, [q.question for q in questions[:2]], images_of)
    four = Extractor(replace(loaded, settings=replace(loaded.settings, batch_size=4)), progress=False)
    again = four.extract(questions, images)
    for first, second in zip(results, again):
        assert second.status == STATUS_OK and second.answer == first.answer
        for key, value in first.vectors.items():
            assert rel_error(second.vectors[key], value) < 1e-5, key


# -- sizes -------------------------------------------------------------------------------------------
def test_sizes_from_config_keys():
    adapter = MolmoAdapter()
    flat = SimpleNamespace(config=SimpleNamespace(hidden_size=3584, max_position_embeddings=4096))
    olmo_style = SimpleNamespace(
        config=SimpleNamespace(d_model=2048, max_sequence_length=4096, vision_backbone={"image_emb_dim": 1024})
    )
    assert adapter.hidden_size(flat) == 3584 and adapter.hidden_size(olmo_style) == 2048
    assert adapter.max_prompt_tokens(flat) == 4096 == adapter.max_prompt_tokens(olmo_style)
    assert adapter.vision_hidden_size(olmo_style) == 1024


def test_pool_projector_input_checks_the_layout():
    adapter = MolmoAdapter()
    index = torch.tensor([[[3, 4], [-1, 6]]])  # [B=1, crops=2, tokens=2]
    batch = SimpleNamespace(inputs={"image_input_idx": index})
    features = torch.arange(12, dtype=torch.float32).reshape(1, 2, 2, 3)
    pooled = adapter.pool_projector_input(features, batch)
    assert torch.allclose(pooled[0], features[0].reshape(4, 3)[[0, 1, 3]].mean(dim=0))
    with pytest.raises(RuntimeError, match="layout"):
        adapter.pool_projector_input(features[:, :1], batch)
