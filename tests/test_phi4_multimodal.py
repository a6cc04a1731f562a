"""Phi-4-multimodal: loading, positions, captured vectors against independent computations, batching.

On the tiny checkpoint of the native architecture as built by default (tests/conftest.py), with its vision
LoRA in vision-lora/ as the real checkpoint ships one, and the same weights without it (built here). The
oracle is an unbatched fp32 forward with output_hidden_states=True of a model loaded independently, the
LoRA folded into its weights by hand (not through peft), and for the vision-only vector the image
embedding's vision tower run on its own with the projection's input rebuilt from its parts. The tiny decoder switches its long-RoPE factors at 1024 positions (the real one
at 4096), which a 4-crop image passes: that is what makes mixed crop counts change vectors here.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import assert_decoder_vectors_match, fold_in_lora, rel_error
from PIL import Image

from vlmstates.dataset import Question, read_validated_table
from vlmstates.demo.tiny import phi4_multimodal as tiny_phi4
from vlmstates.extraction.adapters import adapter_for_family, family_of_model_type
from vlmstates.extraction.adapters.phi4_multimodal import Phi4MultimodalAdapter, crop_grid
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import QUERY_TOKEN, STATUS_OK, VISION_ONLY, layer_key

FAMILY = "phi4_multimodal"
N_SAMPLES = 4
QUESTION = "Is the red circle left of the blue square?"


def settings_for(path, **entry) -> ModelSettings:
    values = {"model": str(path), "batch_size": 4, "max_new_tokens": 3, "device": "cpu", "dtype": "float32", **entry}
    return ModelSettings.from_config("tiny-phi4", values)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share: on a busy machine two threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as built by default (`vlmstates tiny`, the workflow), with its vision LoRA as the
    real one ships it, and the same base weights without the LoRA."""
    base = tiny_phi4.build(tmp_path_factory.mktemp("phi4") / "tiny-phi4-base", seed=0, vision_lora=False)
    return {"base": base, "vision_lora": tiny_checkpoint(FAMILY)}


@pytest.fixture(scope="module")
def reference_models(checkpoints):
    """Independent fp32 models for the oracle: loaded afresh through transformers alone, the LoRA variant
    with the adapter folded into its weights by hand (tests/oracle.py), not through peft. Eager attention
    is bidirectional in the vision tower, as the adapter makes every kernel."""
    from transformers import Phi4MultimodalForCausalLM
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    models = {}
    for variant, path in checkpoints.items():
        model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        maybe_install_capturing_hooks(model.model)  # transformers 5.23's hook bug (see the adapter)
        if variant == "vision_lora":
            assert fold_in_lora(model, path / "vision-lora") == 4 * model.config.num_hidden_layers
        models[variant] = model
    return models


@pytest.fixture(scope="module", params=["base", "vision_lora"])
def extracted(request, checkpoints, demo):
    """Batch size 4, all layers, multimodal on, on the first demo questions (one-crop images)."""
    table, images = demo
    extractor = Extractor(
        load_model(settings_for(checkpoints[request.param], multimodal_representation=True)), progress=False
    )
    questions = questions_of(read_validated_table(table).head(N_SAMPLES))
    results = extractor.extract(questions, images)
    return request.param, extractor, questions, images, results


def single_batch(extractor, question, images):
    image = load_image(resolve_image_path(images, question.image_id))
    return extractor.adapter.build_batch(
        extractor.loaded, [extractor.settings.format_prompt(question.question)], [image]
    )


def independent_projection_input_mean(model, inputs) -> tuple[torch.Tensor, int]:
    """Mean of the rows the projection MLP receives for a one-image batch, and their number.

    Rebuilt from the vision tower's feature layer: 2x2 average pooling to 16x16 per crop; the HD crops
    tiled and cut to the useful area read off the patch mask, each row followed by the "sub" separator;
    then the "global" separator; then the global image's 16 rows, each with the "sub" separator.
    """
    embed = model.model.embed_tokens_extend.image_embed
    config = model.config.vision_config
    pixels = inputs["image_pixel_values"][0].to(model.dtype)  # [1 + crops, 3, 448, 448]
    patch_mask = inputs["image_attention_mask"][0].bool()  # [1 + crops, 32, 32]
    tower = embed.img_processor(pixels, patch_attention_mask=patch_mask, output_hidden_states=True)
    features = tower.hidden_states[config.feature_layer].float()  # [1 + crops, 1024, Dv]
    side, dim = config.image_size // config.patch_size, features.shape[-1]
    grid = features.reshape(-1, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, kernel_size=2).permute(0, 2, 3, 1)  # [1 + crops, 16, 16, Dv]
    cell = pooled.shape[1]
    height, width = inputs["image_sizes"][0].tolist()
    rows, cols = height // config.crop_size, width // config.crop_size
    tiles = pooled[1 : 1 + rows * cols].reshape(rows, cols, cell, cell, dim)
    hd = tiles.permute(0, 2, 1, 3, 4).reshape(rows * cell, cols * cell, dim)
    mask = patch_mask[1 : 1 + rows * cols, 0::2, 0::2].reshape(rows, cols, cell, cell)
    mask = mask.permute(0, 2, 1, 3).reshape(rows * cell, cols * cell)
    useful_rows, useful_cols = int(mask[:, 0].sum()), int(mask[0, :].sum())
    sub = embed.sub_img_feature_extensor.detach().float().reshape(dim)
    glb = embed.global_img_feature_extensor.detach().float().reshape(dim)
    total = (
        hd[:useful_rows, :useful_cols].sum(dim=(0, 1))
        + useful_rows * sub
        + glb
        + pooled[0].sum(dim=(0, 1))
        + cell * sub
    )
    count = useful_rows * (useful_cols + 1) + 1 + cell * (cell + 1)
    return total / count, count


# -- the tiny checkpoint -----------------------------------------------------------------------


def test_tiny_checkpoint_is_small_real_and_reproducible(checkpoints, tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoProcessor

    path = checkpoints["base"]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == FAMILY and config["num_hidden_layers"] == 4
    assert config["vision_config"]["image_size"] // config["vision_config"]["patch_size"] == 32
    for folder in checkpoints.values():
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 5 * 2**20
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (type(model).__name__, type(processor).__name__) == ("Phi4MultimodalForCausalLM", "Phi4MultimodalProcessor")
    assert type(processor.image_processor).__name__ == "Phi4MultimodalImageProcessor"
    assert type(processor.audio_processor).__name__ == "Phi4MultimodalFeatureExtractor"
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny_phi4.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids) and model.config.vocab_size == len(tok)
    assert model.config.vision_config.image_token_id == ids["<|image|>"] == processor.image_token_id
    assert model.config.audio_config.audio_token_id == ids["<|audio|>"] == processor.audio_token_id
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == [ids["<|endoftext|>"], ids["<|end|>"]]
    text = "Naïve café: 漢字, emoji 🙂, tabs\tand\nnewlines — 12345."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # same seed, same weights; the LoRA checkpoint shares them
    again = tiny_phi4.build(tmp_path / "again", seed=0)  # the default build ships the vision LoRA
    first, second = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    lora_base = load_file(checkpoints["vision_lora"] / "model.safetensors")
    assert all(torch.equal(first[k], lora_base[k]) for k in first)
    lora = load_file(checkpoints["vision_lora"] / "vision-lora" / "adapter_model.safetensors")
    assert lora and all(".layers." in k and ("lora_A" in k or "lora_B" in k) for k in lora)
    lora_again = load_file(again / "vision-lora" / "adapter_model.safetensors")
    assert lora.keys() == lora_again.keys() and all(torch.equal(lora[k], lora_again[k]) for k in lora)


# -- registry, revision, options ---------------------------------------------------------------


def test_family_serves_native_and_hub_main_model_types(tmp_path):
    assert family_of_model_type("phi4_multimodal") == family_of_model_type("phi4mm") == FAMILY
    adapter = adapter_for_family(FAMILY)
    assert isinstance(adapter, Phi4MultimodalAdapter) and adapter.family == FAMILY
    assert Phi4MultimodalAdapter.default_revision == "refs/pr/70"
    hub = "microsoft/Phi-4-multimodal-instruct"
    assert adapter.revision(ModelSettings.from_config("m", {"model": hub})) == "refs/pr/70"
    assert adapter.revision(ModelSettings.from_config("m", {"model": hub, "revision": "abc123"})) == "abc123"
    assert adapter.revision(ModelSettings.from_config("m", {"model": str(tmp_path)})) is None


def test_options_are_checked(checkpoints):
    adapter = adapter_for_family(FAMILY)
    with pytest.raises(ConfigError, match="unknown key.*vison_lora"):
        adapter.use_vision_lora(settings_for(checkpoints["base"], options={"vison_lora": False}))
    with pytest.raises(ConfigError, match="true or false"):
        adapter.use_vision_lora(settings_for(checkpoints["base"], options={"vision_lora": "no"}))
    with pytest.raises(ConfigError, match="no vision-lora"):
        load_model(settings_for(checkpoints["base"], options={"vision_lora": True}))


def test_vision_lora_is_loaded_active_and_can_be_turned_off(checkpoints):
    assert (checkpoints["vision_lora"] / "vision-lora" / "adapter_config.json").is_file()
    assert not (checkpoints["base"] / "vision-lora").exists()
    loaded = {
        "base": load_model(settings_for(checkpoints["base"])),
        "on": load_model(settings_for(checkpoints["vision_lora"])),
        "off": load_model(settings_for(checkpoints["vision_lora"], options={"vision_lora": False})),
    }
    assert loaded["on"].model.active_adapters() == ["vision"]
    assert not getattr(loaded["off"].model, "_hf_peft_config_loaded", False)
    assert not getattr(loaded["base"].model, "_hf_peft_config_loaded", False)
    last = {}
    with torch.inference_mode():
        for name, lm in loaded.items():
            batch = lm.adapter.build_batch(lm, [QUESTION], [noise_image(128, 96, 0)])
            last[name] = lm.model(**batch.inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    assert rel_error(last["off"], last["base"]) < 1e-6  # the LoRA checkpoint's base weights are the tiny's
    assert rel_error(last["on"], last["base"]) > 1e-2


def test_merge_vision_lora_is_checked(checkpoints):
    adapter = adapter_for_family(FAMILY)
    assert adapter.merge_vision_lora(settings_for(checkpoints["vision_lora"])) is False  # the default
    merged = settings_for(checkpoints["vision_lora"], options={"merge_vision_lora": True})
    assert merged.config_hash() != settings_for(checkpoints["vision_lora"]).config_hash()
    with pytest.raises(ConfigError, match="merge_vision_lora must be true or false"):
        adapter.merge_vision_lora(settings_for(checkpoints["vision_lora"], options={"merge_vision_lora": "yes"}))
    with pytest.raises(ConfigError, match="no LoRA to merge"):
        adapter.merge_vision_lora(
            settings_for(checkpoints["vision_lora"], options={"merge_vision_lora": True, "vision_lora": False})
        )
    with pytest.raises(ConfigError, match="no vision-lora/ to merge"):
        load_model(settings_for(checkpoints["base"], options={"merge_vision_lora": True}))


#: merged minus unmerged, relative (norm of the difference over the norm), fp32: measured at most 4.2e-7 over
#: every key of the first 8 demo questions (the merged weights round W + s*B@A once)
MERGE_TOLERANCE = 2e-6


def test_a_merged_vision_lora_gives_the_unmerged_vectors_and_leaves_no_lora_layer(checkpoints, demo):
    from peft.tuners.tuners_utils import BaseTunerLayer

    table, images = demo
    questions = questions_of(read_validated_table(table).head(N_SAMPLES))
    runs = {}
    for name, options in {"unmerged": {}, "merged": {"merge_vision_lora": True}, "off": {"vision_lora": False}}.items():
        lm = load_model(settings_for(checkpoints["vision_lora"], multimodal_representation=True, options=options))
        lora_layers = [m for m in lm.model.modules() if isinstance(m, BaseTunerLayer)]
        runs[name] = lora_layers, Extractor(lm, progress=False).extract(questions, images), lm
    assert len(runs["unmerged"][0]) == 4 * runs["unmerged"][2].model.config.num_hidden_layers
    assert runs["merged"][0] == [] and not runs["merged"][2].model._hf_peft_config_loaded
    for unmerged, merged, off in zip(runs["unmerged"][1], runs["merged"][1], runs["off"][1]):
        assert unmerged.status == merged.status == STATUS_OK and unmerged.vectors.keys() == merged.vectors.keys()
        for key in unmerged.vectors:
            assert rel_error(merged.vectors[key], unmerged.vectors[key]) < MERGE_TOLERANCE, key
        # the LoRA was merged, not dropped: without it the decoder's vectors move far beyond the tolerance
        key = layer_key(QUERY_TOKEN, 1)
        assert rel_error(merged.vectors[key], off.vectors[key]) > 1e-2


# -- crop counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic_hd", [36, 4])
def test_crop_grid_is_the_image_processors(checkpoints, dynamic_hd):
    """The grid computed without processing equals the processor's, on both branches of its rule."""
    adapter = adapter_for_family(FAMILY)
    loaded = load_model(settings_for(checkpoints["base"]))
    processor = copy.deepcopy(loaded.processor.image_processor)
    processor.dynamic_hd = dynamic_hd  # 4: most of these sizes take the closest-aspect-ratio branch
    sizes = [
        (96, 128),
        (448, 448),
        (449, 448),
        (900, 400),
        (300, 500),
        (1000, 1000),
        (2000, 500),
        (500, 1500),
        (1300, 900),
    ]
    for width, height in sizes:
        image = Image.new("RGB", (width, height), (120, 30, 200))
        out = processor(images=[image], return_tensors="pt")
        crop_h, crop_w = (out["image_sizes"][0] // 448).tolist()
        assert crop_grid(processor, width, height) == (crop_w, crop_h), (width, height, dynamic_hd)
        if dynamic_hd == 36:  # the live processor: the group is the number of HD crops it cuts
            assert adapter.batch_group(loaded, *image.size) == out["image_pixel_values"].shape[1] - 1 == crop_w * crop_h


# -- prompt and positions ----------------------------------------------------------------------


def test_prompt_is_the_phi4_chat_format(extracted):
    _, extractor, questions, images, _ = extracted
    processor = extractor.loaded.processor
    question = questions[0]
    prompt = extractor.adapter.chat_prompt(extractor.loaded, question.question)
    assert prompt == f"<|user|><|image|>{question.question}<|end|><|assistant|>"
    ids = single_batch(extractor, question, images).input_ids[0].tolist()
    tok = processor.tokenizer
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    for special in ("<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>"):
        assert ids.count(tok.convert_tokens_to_ids(special)) == (special != "<|endoftext|>")


def test_all_ok_and_positions(extracted):
    _, extractor, questions, images, results = extracted
    assert extractor.layers == tuple(range(extractor.num_layers)) == (0, 1, 2, 3)
    assert extractor.image_token_id == extractor.loaded.processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert all(r.status == STATUS_OK for r in results), [r.error for r in results]
    for question, result in zip(questions, results):
        ids = single_batch(extractor, question, images).input_ids[0].tolist()
        image_positions = [i for i, t in enumerate(ids) if t == extractor.image_token_id]
        assert ids[result.vision_token_position] == extractor.image_token_id
        assert result.vision_token_position == image_positions[-1]
        assert result.num_image_tokens == len(image_positions) >= 256 + 16 + 1
        assert result.query_token_position == len(ids) - 1 == result.num_prompt_tokens - 1


# -- the oracle --------------------------------------------------------------------------------


def test_vectors_equal_unbatched_output_hidden_states(extracted, reference_models):
    """Against the independent model of the variant: with the LoRA folded in by hand for the checkpoint
    that has one, so vectors computed without the LoRA active would not match."""
    variant, extractor, questions, images, results = extracted
    model = reference_models[variant]
    assert extractor.vector_dims()[VISION_ONLY] == model.config.vision_config.hidden_size
    with torch.inference_mode():
        for question, result in zip(questions, results):
            batch = single_batch(extractor, question, images)
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, (variant, question.question_id))
            vision, rows = independent_projection_input_mean(model, batch.inputs)
            assert rows == result.num_image_tokens
            assert rel_error(result.vectors[VISION_ONLY], vision) < 1e-4, (variant, question.question_id)


def test_the_lora_changes_the_reference(extracted, reference_models):
    """The LoRA moves the decoder's states well beyond the oracle's tolerance, so the oracle above tells an
    active LoRA from a missing one; its vision tower (decoder-only LoRA) is untouched."""
    _, extractor, questions, images, _ = extracted
    batch = single_batch(extractor, questions[0], images)
    with torch.inference_mode():
        states = {v: m(**batch.inputs, output_hidden_states=True).hidden_states for v, m in reference_models.items()}
        towers = {v: independent_projection_input_mean(m, batch.inputs)[0] for v, m in reference_models.items()}
    assert rel_error(states["vision_lora"][0], states["base"][0]) < 1e-6  # same embeddings in
    for k in range(1, len(states["base"])):
        assert rel_error(states["vision_lora"][k], states["base"][k]) > 1e-2, k
    assert rel_error(towers["vision_lora"], towers["base"]) < 1e-6


def test_batch_of_four_equals_batch_of_one(extracted):
    variant, extractor, questions, images, results = extracted
    one_at_a_time = replace(extractor.loaded, settings=replace(extractor.settings, batch_size=1))
    singles = Extractor(one_at_a_time, progress=False).extract(questions, images)
    # one crop each, but of different sizes and aspects: different image token counts, so left padding,
    # and both kinds of crops, filled (no padded patch: SDPA without a mask when alone) and padded
    loaded = extractor.loaded
    crops = [single_batch(extractor, q, images).inputs["image_attention_mask"][0, 1:] for q in questions]
    assert {
        extractor.adapter.batch_group(loaded, *load_image(resolve_image_path(images, q.image_id)).size)
        for q in questions
    } == {1}
    assert {bool(mask.all()) for mask in crops} == {True, False}
    assert len({r.num_prompt_tokens for r in results}) > 1
    for batched, single in zip(results, singles):
        assert batched.answer == single.answer
        assert (batched.vision_token_position, batched.query_token_position) == (
            single.vision_token_position,
            single.query_token_position,
        )
        for key, value in single.vectors.items():
            assert rel_error(batched.vectors[key], value) < 1e-4, (variant, batched.question_id, key)


# -- batching across crop counts ---------------------------------------------------------------


def test_images_of_other_crop_counts_are_never_batched_together(checkpoints, tmp_path, monkeypatch):
    # 1 crop, 2x2 crops, 1 crop, 2x2 crops; the 4-crop prompts are longer than the tiny decoder's
    # original_max_position_embeddings (1024), the 1-crop ones shorter
    sizes = [(128, 96), (800, 800), (160, 160), (700, 600)]
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    questions = []
    for i, (width, height) in enumerate(sizes):
        noise_image(width, height, i).save(images_dir / f"im{i}.png")
        questions.append(Question(f"q{i}", f"im{i}.png", QUESTION, "yes"))
    images = [load_image(images_dir / q.image_id) for q in questions]

    extractor = Extractor(load_model(settings_for(checkpoints["base"], batch_size=4)), progress=False)
    adapter, loaded = extractor.adapter, extractor.loaded
    assert [adapter.batch_group(loaded, *image.size) for image in images] == [1, 4, 1, 4]

    batches = []
    build_batch = adapter.build_batch

    def recording_build_batch(loaded_, texts, batch_images):
        batches.append([adapter.batch_group(loaded_, *image.size) for image in batch_images])
        return build_batch(loaded_, texts, batch_images)

    monkeypatch.setattr(adapter, "build_batch", recording_build_batch)
    batched = extractor.extract(questions, images_dir)
    assert sorted(batches) == [[1, 1], [4, 4]]
    one_at_a_time = replace(loaded, settings=replace(loaded.settings, batch_size=1))
    singles = Extractor(one_at_a_time, progress=False).extract(questions, images_dir)
    for b, s in zip(batched, singles):
        assert b.status == s.status == STATUS_OK
        assert b.answer == s.answer
        for key, value in s.vectors.items():
            assert rel_error(b.vectors[key], value) < 1e-4, (b.question_id, key)

    # Why: in one batch with the 4-crop image, the 1-crop image's vectors change (long-RoPE factors
    # are chosen for the whole batch from its longest row).
    limit = loaded.model.config.original_max_position_embeddings
    assert singles[0].num_prompt_tokens <= limit < singles[1].num_prompt_tokens
    mixed = build_batch(loaded, [QUESTION, QUESTION], images[:2])
    with torch.inference_mode():
        query_last = loaded.model(**mixed.inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    norm = adapter.final_norm(loaded.model)
    single_last = norm(torch.from_numpy(singles[0].vectors[layer_key("query_token_representation", 3)])[None, None])[
        0, 0
    ]
    assert rel_error(query_last, single_last.detach()) > 1e-3


# -- the vision tower --------------------------------------------------------------------------


def test_vision_tower_attends_both_ways_with_every_kernel(checkpoints):
    """transformers marks the tower causal; SDPA then ran it causal when no patch was padded."""
    sdpa = load_model(settings_for(checkpoints["base"], attn_implementation="sdpa"))
    eager = load_model(settings_for(checkpoints["base"], attn_implementation="eager"))
    image = noise_image(448, 448, 7)  # fills its crop: no padded patch, so no attention mask
    inputs = sdpa.processor.image_processor(images=[image], return_tensors="pt")
    pixels = inputs["image_pixel_values"].flatten(0, 1)
    mask = inputs["image_attention_mask"].flatten(0, 1).bool()
    assert mask.all()

    def features(lm):
        tower = lm.model.model.embed_tokens_extend.image_embed.img_processor
        assert not any(layer.self_attn.is_causal for layer in tower.encoder.layers)
        with torch.inference_mode():
            return tower(pixels, patch_attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    assert rel_error(features(sdpa), features(eager)) < 1e-5
    # the same image next to one with padded patches (the mask path) gives the same features
    padded = sdpa.processor.image_processor(images=[noise_image(128, 96, 8)], return_tensors="pt")
    assert not padded["image_attention_mask"].bool().all()
    both_pixels = torch.cat([pixels, padded["image_pixel_values"].flatten(0, 1)])
    both_mask = torch.cat([mask, padded["image_attention_mask"].flatten(0, 1).bool()])
    tower = sdpa.model.model.embed_tokens_extend.image_embed.img_processor
    with torch.inference_mode():
        together = tower(both_pixels, patch_attention_mask=both_mask, output_hidden_states=True).hidden_states[-2]
    assert rel_error(together[: len(pixels)], features(sdpa)) < 1e-5
    # with transformers' causal flag put back, SDPA's unmasked path differs
    for layer in tower.encoder.layers:
        layer.self_attn.is_causal = True
    with torch.inference_mode():
        causal = tower(pixels, patch_attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    assert rel_error(causal, features(eager)) > 1e-2
