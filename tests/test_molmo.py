"""The Molmo adapter, tested against a STAND-IN for Molmo's remote code (tests/molmo_standin), not the real model.

The real Molmo checkpoints exist only as remote code with a hard-coded CLIP ViT-L/14-336, so no tiny
checkpoint of them can be built. The stand-in is our own small implementation of the same interface
(module paths, `processor.process` outputs, `generate_from_batch` over `GenerationMixin.generate`) and of
the real code's behaviours that a trial against it showed (the failures of generate_from_batch on padded
batches, no eos token, -100 indices, shifted image masks, ...), written into a local folder and loaded
through transformers' real remote-code path (`trust_remote_code=True`, `auto_map`), in 7B-O's config
layout and in MolmoE's (OLMo-style keys, mixture-of-experts blocks): every test that loads a checkpoint
runs on both. These tests show the adapter reads that interface correctly: positions, captured vectors
against an unbatched forward with output_hidden_states, the vision-only vector, answers against the
model's own generate_from_batch at batch 1, and batches equal to batch 1. They say nothing about the
numbers of the real model. The file runs under transformers 5.x (the project's default environment) and
4.48.3 (envs/molmo.yaml, see .ci/molmo-env.sh).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import watch_the_load
from molmo_standin import build_standin_checkpoint
from oracle import assert_decoder_vectors_match, assert_same_results, rel_error

from vlmstates.dataset import read_validated_table
from vlmstates.extraction.adapters import family_of_model_type
from vlmstates.extraction.adapters.molmo import (
    STOP_STRING,
    MolmoAdapter,
    cut_at_stop_string,
    generation_inputs,
    left_pad_collate,
)
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import STATUS_OK, VISION_ONLY, layer_key

N_SAMPLES = 8
MAX_NEW_TOKENS = 6


def molmo_settings(folder, **entry) -> ModelSettings:
    values = {"model": str(folder), "trust_remote_code": True, "max_new_tokens": MAX_NEW_TOKENS}
    values.update(entry)
    return ModelSettings.from_config("molmo_standin", values)


@pytest.fixture(scope="module", params=["molmo", "molmoe"])
def standin(request, tmp_path_factory):
    """The stand-in checkpoint in 7B-O's config layout, then in MolmoE's."""
    return build_standin_checkpoint(
        tmp_path_factory.mktemp("molmo") / f"{request.param}_standin_checkpoint", layout=request.param
    )


@pytest.fixture(scope="module")
def extracted(standin, demo):
    """Extraction of the demo's first questions in batches of 4."""
    table, images = demo
    settings = molmo_settings(standin, batch_size=4, multimodal_representation=True)
    extractor = Extractor(load_model(settings), progress=False)
    questions = questions_of(read_validated_table(table).head(N_SAMPLES))
    return extractor, questions, images, extractor.extract(questions, images)


@pytest.fixture(scope="module")
def batch_one(extracted):
    """The same questions one sample per batch, on the same loaded model."""
    extractor, questions, images, _ = extracted
    single = Extractor(replace(extractor.loaded, settings=replace(extractor.settings, batch_size=1)), progress=False)
    return single.extract(questions, images)


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


def test_the_weights_are_read_straight_onto_the_device(standin, monkeypatch):
    """The remote code's model takes device_map too (as its model card loads it), under 5.x and 4.48.3."""
    watch = watch_the_load(monkeypatch)
    loaded = load_model(molmo_settings(standin, device="cpu"))
    assert watch.device_maps[0] == torch.device("cpu")
    assert watch.models[0] is loaded.model and watch.later_moves == []


def test_loads_through_remote_code(extracted):
    extractor, *_ = extracted
    loaded = extractor.loaded
    assert family_of_model_type("molmo") == "molmo"
    assert isinstance(loaded.adapter, MolmoAdapter)
    # the classes come from the checkpoint folder's files, imported by transformers' remote-code loader
    assert type(loaded.model).__module__.startswith("transformers_modules.")
    assert type(loaded.processor).__module__.startswith("transformers_modules.")
    assert loaded.settings.batch_size == extractor.batch_size == 4
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
    sample["image_input_idx"] = torch.full_like(sample["image_input_idx"], -100)
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
                used = [
                    features[c, t] for c in range(index.shape[0]) for t in range(index.shape[1]) if index[c, t] >= 0
                ]
                expected = torch.stack(used).mean(dim=0)
                assert rel_error(result.vectors[VISION_ONLY], expected) < 1e-4, question.question_id
                if len(used) < index.numel():
                    some_unused = True
                    assert (
                        rel_error(result.vectors[VISION_ONLY], features.reshape(-1, features.shape[-1]).mean(0)) > 1e-3
                    )
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
        assert torch.equal(batch.inputs["image_masks"][row, :n], sample["image_masks"])  # as it came, shift kept
        original = sample["image_input_idx"]
        assert torch.equal(shifted[:n] >= 0, original >= 0)
        assert torch.equal(shifted[:n][original >= 0], original[original >= 0] + pad)
    positions = extractor.adapter.find_positions(extractor.loaded, batch)
    assert positions.vision == [int(s["image_input_idx"].max()) for s in samples]
    assert positions.query == [n - 1 for n in lengths]


def test_left_padded_prefill_equals_unbatched(extracted):
    """With image_input_idx shifted, a left-padded prefill matches each sample's own forward (the first
    answer token is another matter: see test_generate_from_batch_misreads_left_padding)."""
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


def test_batches_equal_batch_one(extracted, batch_one):
    """Batches of 4 (left-padded, through GenerationMixin.generate) give batch 1's answers and vectors."""
    _, _, _, results = extracted
    assert_same_results(results, batch_one)
    for batched, single in zip(results, batch_one):
        for key, value in single.vectors.items():
            assert rel_error(batched.vectors[key], value) < 1e-5, (batched.question_id, key)


def test_prefill_only_runs_without_a_cache_and_gives_the_answering_paths_vectors(extracted):
    """`answers: false`: generate() is given use_cache false (the file says so), and the vectors equal those
    of the answering run, batched alike."""
    extractor, questions, images, results = extracted
    settings = replace(extractor.settings, answers=False)
    prefill_only = Extractor(replace(extractor.loaded, settings=settings), progress=False)
    configs = []
    generate = extractor.loaded.model.generate

    def recording_generate(input_ids, generation_config, **kwargs):
        configs.append(generation_config)
        return generate(input_ids, generation_config, **kwargs)

    extractor.loaded.model.generate = recording_generate
    try:
        vectors_only = prefill_only.extract(questions, images)
    finally:
        del extractor.loaded.model.generate
    assert configs and all(config.use_cache is False for config in configs)
    assert prefill_only.attributes()["generation_config"]["use_cache"] is False
    assert all(r.status == STATUS_OK and r.answer == "" for r in vectors_only)
    for a, b in zip(results, vectors_only):
        assert a.vectors.keys() == b.vectors.keys()
        for key in a.vectors:
            assert np.array_equal(a.vectors[key], b.vectors[key]), (a.question_id, key)


def test_paper_positions_are_one_past_the_largest_image_input_idx(extracted):
    """`paper_positions: true`: VT also at the HALP paper code's Molmo position, one past the largest
    image_input_idx of the sample's own processor output, in batches as at batch 1, and equal to an
    unbatched forward's output_hidden_states there."""
    extractor, questions, images, _ = extracted
    settings = replace(extractor.settings, paper_positions=True)
    questions = questions[:4]
    paper = Extractor(replace(extractor.loaded, settings=settings), progress=False).extract(questions, images)
    single = Extractor(replace(extractor.loaded, settings=replace(settings, batch_size=1)), progress=False).extract(
        questions, images
    )
    model = extractor.loaded.model
    with torch.inference_mode():
        for question, result, alone in zip(questions, paper, single):
            sample = processed(extractor, question, images)
            expected = int(sample["image_input_idx"].max()) + 1
            assert result.paper_vision_token_position == alone.paper_vision_token_position == expected
            hidden = model(**sample, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, question.question_id)


def test_batches_are_padded_and_grouped_by_crop_count(extracted):
    """The extraction ran real batches (several rows, left padding) and each batch held one crop count."""
    extractor, questions, images, _ = extracted
    adapter, loaded = extractor.adapter, extractor.loaded
    seen = []
    build = adapter.build_batch

    def spy(host, texts, batch_images):
        batch = build(host, texts, batch_images)
        seen.append(
            (batch.inputs["images"].shape[1], [adapter.batch_group(host, *image.size) for image in batch_images], batch)
        )
        return batch

    adapter.build_batch = spy
    try:
        Extractor(loaded, progress=False, prefetch=0).extract(questions, images)
    finally:
        del adapter.build_batch
    assert max(batch.input_ids.shape[0] for *_, batch in seen) > 1
    assert any(not batch.attention_mask.all() for *_, batch in seen), "no batch was padded"
    for crops, groups, _ in seen:
        assert groups == [crops] * len(groups)  # no padding crops: the group is the crop count
    # the demo's images fall into several crop counts, so grouping was exercised
    assert len({crops for crops, _, _ in seen}) > 1
    for question in questions:
        image = load_image(resolve_image_path(images, question.image_id))
        assert adapter.batch_group(loaded, *image.size) == processed(extractor, question, images)["images"].shape[1]


def _stops_alone(loaded, sample, max_new_tokens) -> int | None:
    """After how many tokens the model's own generate_from_batch stops on one sample, None if it does not."""
    config = _config(max_new_tokens=max_new_tokens)
    with torch.inference_mode():
        out = loaded.model.generate_from_batch(
            {k: v[None] for k, v in sample.items()}, config, tokenizer=loaded.processor.tokenizer
        )
    new = out.shape[1] - sample["input_ids"].shape[0]
    return new if new < max_new_tokens else None


@pytest.fixture(scope="module")
def early_stop(standin, demo):
    """Four samples of one crop count (so one batch) of which some stop well before max_new_tokens and
    some do not: the stop token's output row is made a multiple of a token the answers produce, trying
    their tokens in turn until such a mix appears."""
    table, images = demo
    max_new = 8
    loaded = load_model(molmo_settings(standin, batch_size=4, max_new_tokens=max_new))
    extractor = Extractor(loaded, progress=False)
    questions = questions_of(read_validated_table(table))
    samples = {q.question_id: {k: v[0] for k, v in processed(extractor, q, images).items()} for q in questions}
    by_crops: dict[int, list] = {}
    for q in questions:
        by_crops.setdefault(samples[q.question_id]["images"].shape[0], []).append(q)
    chosen = max(by_crops.values(), key=len)[:4]
    assert len(chosen) > 1, "no two demo images share a crop count"
    head = loaded.model.model.transformer.ff_out.weight
    stop = loaded.processor.tokenizer.convert_tokens_to_ids(STOP_STRING)
    original = head[stop].clone()
    config = _config(max_new_tokens=max_new)
    with torch.inference_mode():
        out = loaded.model.generate_from_batch(
            {k: v[None] for k, v in samples[chosen[0].question_id].items()},
            config,
            tokenizer=loaded.processor.tokenizer,
        )
    tokens = out[0, samples[chosen[0].question_id]["input_ids"].shape[0] :].tolist()
    for scale in (1.02, 1.1, 1.5):  # barely above the token's logit: it takes over only where that token wins
        for token in tokens:
            with torch.no_grad():
                head[stop] = scale * head[token]
            ends = [_stops_alone(loaded, samples[q.question_id], max_new) for q in chosen]
            if None in ends and any(end is not None and end <= max_new - 2 for end in ends):
                return loaded, chosen, images, ends
    with torch.no_grad():
        head[stop] = original
    pytest.fail("no token made some rows stop early and others not")


def test_rows_that_stop_early_are_cut_at_the_stop_string(early_stop):
    """With no eos token a finished row keeps generating while the others run: its answer must end where
    batch 1 stops (here the batch holds rows that stop early and rows that do not)."""
    loaded, questions, images, ends = early_stop
    one = Extractor(replace(loaded, settings=replace(loaded.settings, batch_size=1)), progress=False).extract(
        questions, images
    )
    four = Extractor(loaded, progress=False).extract(questions, images)
    assert_same_results(four, one)
    # the batch did generate past a finished row's stop: what it produced there is not in its answer
    batch = loaded.adapter.build_batch(
        loaded,
        [loaded.settings.format_prompt(q.question) for q in questions],
        [load_image(resolve_image_path(images, q.image_id)) for q in questions],
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            batch.input_ids,
            _config(max_new_tokens=8),
            tokenizer=loaded.processor.tokenizer,
            **generation_inputs(batch, 8),
        )
    uncut = loaded.processor.tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert any(text.strip() != result.answer for text, result in zip(uncut, one)), (uncut, ends)


def test_cut_at_stop_string_takes_the_first():
    class Chars:  # a tokenizer of one character per id, the stop string being special
        def decode(self, ids, skip_special_tokens=False):
            text = "".join(chr(i) for i in ids)
            return text.replace(STOP_STRING, "") if skip_special_tokens else text

    ids = [ord(c) for c in "ab" + STOP_STRING + "cd" + STOP_STRING]
    assert cut_at_stop_string(Chars(), ids) == "ab"
    assert cut_at_stop_string(Chars(), [ord("x")]) == "x"


# -- what the real remote code does (the stand-in must too) -----------------------------------------
@pytest.fixture(scope="module")
def padded(extracted):
    """A left-padded batch of 3 samples of different lengths, and their prompts."""
    extractor, questions, images, _ = extracted
    samples = [{k: v[0] for k, v in processed(extractor, q, images).items()} for q in questions[:3]]
    assert len({s["input_ids"].shape[0] for s in samples}) > 1
    return extractor.loaded, samples, left_pad_collate(samples, torch.float32, torch.device("cpu"))


def _config(max_new_tokens: int = MAX_NEW_TOKENS):
    """What the model card hands generate_from_batch: greedy, Molmo's stop string."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=STOP_STRING, use_cache=True, do_sample=False)


def test_generate_from_batch_misreads_left_padding(padded):
    """The real method takes a padded row's first answer token at column valid-1: wrong answers."""
    loaded, samples, batch = padded
    tokenizer = loaded.processor.tokenizer
    with torch.inference_mode():
        out = loaded.model.generate_from_batch(batch.inputs, _config(), tokenizer=tokenizer)
        wrong = 0
        for row, sample in enumerate(samples):
            alone = loaded.model.generate_from_batch(
                {k: v[None] for k, v in sample.items()}, _config(), tokenizer=tokenizer
            )
            first = alone[0, sample["input_ids"].shape[0]]
            wrong += int(out[row, batch.input_ids.shape[1]] != first)
    assert wrong > 0


def test_generate_from_batch_rejects_the_ways_around_it(padded):
    """A prompt+max_new_tokens wide mask breaks the rotary embedding (positions from the whole mask), a
    position_ids argument collides with its own, a prompt-wide mask is refused."""
    loaded, _, batch = padded
    tokenizer, model = loaded.processor.tokenizer, loaded.model
    extra = generation_inputs(batch, MAX_NEW_TOKENS)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="shape"):
            model.generate_from_batch(
                dict(batch.inputs, attention_mask=extra["attention_mask"]), _config(), tokenizer=tokenizer
            )
        with pytest.raises(TypeError, match="position_ids"):
            model.generate_from_batch(batch.inputs, _config(), tokenizer=tokenizer, position_ids=extra["position_ids"])
        with pytest.raises((ValueError, AssertionError)):
            model.generate_from_batch(
                dict(batch.inputs, attention_mask=batch.attention_mask), _config(), tokenizer=tokenizer
            )


def test_generate_needs_the_full_width_mask(padded):
    """Through generate, the mask stays as given while it decodes: a prompt-wide one fails at the first step."""
    loaded, _, batch = padded
    extra = dict(generation_inputs(batch, MAX_NEW_TOKENS), attention_mask=batch.attention_mask)
    with torch.inference_mode(), pytest.raises(ValueError, match="attention_mask"):
        loaded.model.generate(batch.input_ids, _config(), tokenizer=loaded.processor.tokenizer, **extra)


def test_right_padding_fails_in_the_stop_string_criteria(padded):
    """Right padding puts -1 ids at the end of the prompt, which StopStringCriteria looks up."""
    loaded, samples, left = padded
    input_ids = torch.full_like(left.input_ids, -1)
    image_input_idx = left.inputs["image_input_idx"].clone()
    for row, sample in enumerate(samples):  # each row from column 0, its indices unshifted
        input_ids[row, : sample["input_ids"].shape[0]] = sample["input_ids"]
        index = sample["image_input_idx"]
        image_input_idx[row, : index.shape[0]] = torch.where(index >= 0, index, -1)
    inputs = dict(left.inputs, input_ids=input_ids, image_input_idx=image_input_idx)
    with torch.inference_mode(), pytest.raises(IndexError):
        loaded.model.generate_from_batch(inputs, _config(), tokenizer=loaded.processor.tokenizer)


def test_the_remote_code_quirks(extracted):
    """No eos token anywhere, -100 for unused pooled patches, image masks one crop off the images, a tuple
    from the vision backbone, a token embedding without .weight."""
    extractor, questions, images, _ = extracted
    model = extractor.loaded.model
    assert getattr(model.config, "eos_token_id", None) is None and model.generation_config.eos_token_id is None
    sample = processed(extractor, questions[0], images)
    index = sample["image_input_idx"]
    assert (index < 0).any() and set(index[index < 0].tolist()) == {-100}
    masks = sample["image_masks"][0]
    assert masks.shape[0] == sample["images"].shape[1] and bool(masks[-1].eq(1).all())
    assert not hasattr(model.get_input_embeddings(), "weight")
    with torch.inference_mode():
        out = model.model.vision_backbone(sample["images"], sample["image_masks"])
    assert isinstance(out, tuple)


def test_molmoe_layout_has_olmo_keys_and_experts(extracted):
    extractor, *_ = extracted
    config = extractor.loaded.model.config
    saved = config.to_dict()
    if "d_model" not in saved:
        pytest.skip("7B-O layout")
    assert "hidden_size" not in saved and "num_hidden_layers" not in saved
    assert (config.hidden_size, config.num_hidden_layers) == (saved["d_model"], saved["n_layers"])
    assert saved["moe_num_experts"] > saved["moe_top_k"] > 1
    assert any(
        "experts" in name for name, _ in extractor.adapter.decoder_blocks(extractor.loaded.model).named_modules()
    )


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
