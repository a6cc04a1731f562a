"""The contract every family keeps, one test module for all (the pattern of transformers' ModelTesterMixin).

Adding a family adds a row to CASES: its name, image sizes that make its processor give different image-token,
tile or sub-image counts, and an independent computation of the projector's input for one sample (the vision
tower run alone, as the real model's config says its features are taken). Per family, on its tiny checkpoint of
the real architecture, fp32 on CPU, with 4 questions of different lengths and images of different sizes:

* every captured vector equals an unbatched forward with output_hidden_states=True at the recorded positions
  (tests/oracle.py; the last block compared before the final norm);
* the vision-only vector equals the independent pooled projector input;
* the vision position holds the image token and is the last one; the query position is the last prompt token;
  the prompt is the processor's own chat-template route;
* a left-padded batch of 4 equals batch 1 (< 1e-4), the answers are identical, and equal unbatched generate().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from oracle import assert_decoder_vectors_match, rel_error
from vlmstates.adapters import adapter_class, families, family_of_model_type
from vlmstates.adapters.entries import ENTRIES
from vlmstates.benchmark import synthetic_inputs
from vlmstates.images import load_image, resolve_image_path
from vlmstates.engine import Extractor, load_model
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import STATUS_OK, VISION_ONLY

N_SAMPLES = 4


# -- independent projector inputs, one sample (batch of 1: no padding tile or image), mean-pooled -------------
def qwen_vision(model, inputs):
    # the patch merger's input: the windowed ViT's output before merging, all patches of the image
    return model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state.mean(dim=0)


def gemma_vision(model, inputs):
    return model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state[0].mean(dim=0)


def clip_layer_minus_2_without_cls(model, pixels):
    """LLaVA's features: the CLIP tower's second-to-last layer, the CLS position dropped (real config facts:
    vision_feature_layer -2, vision_feature_select_strategy "default")."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
    return hidden[:, 1:]


def llava_vision(model, inputs):
    return clip_layer_minus_2_without_cls(model, inputs["pixel_values"]).reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def llava_next_vision(model, inputs):
    tiles = inputs["pixel_values"][0]  # [tiles, C, H, W]: one image, so the processor padded none
    assert (tiles.flatten(1) != 0).any(dim=1).all()
    return clip_layer_minus_2_without_cls(model, tiles).reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def smolvlm_vision(model, inputs):
    images = inputs["pixel_values"][0]  # [sub-images + global, C, H, W]: one sample, so no all-zero padding image
    assert (images.flatten(1) != 0).any(dim=1).all() and inputs["pixel_attention_mask"].all()
    return model.model.vision_model(pixel_values=images).last_hidden_state.reshape(-1, model.config.vision_config.hidden_size).mean(dim=0)


def phi4_vision(model, inputs):
    # the projection MLP's input rebuilt from the vision tower's feature layer (tests/test_phi4_multimodal.py)
    from test_phi4_multimodal import independent_projection_input_mean

    return independent_projection_input_mean(model, inputs)[0]


@dataclass(frozen=True)
class Case:
    family: str
    sizes: list[tuple[int, int]]
    vision: Callable
    #: what must differ between the 4 samples, so that the batch is really mixed
    varies: str = "num_image_tokens"
    #: the prompt equals the processor's own apply_chat_template route (Phi-4's processor drops its template:
    #: tests/test_phi4_multimodal.py checks its documented format instead)
    processor_chat_template: bool = True


CASES = [
    Case("qwen2_5_vl", [(96, 64), (640, 480), (64, 128), (300, 200)], qwen_vision),
    Case("qwen2_vl", [(96, 64), (640, 480), (64, 128), (300, 200)], qwen_vision),
    Case("gemma3", [(96, 64), (640, 480), (64, 128), (1024, 768)], gemma_vision, varies="num_prompt_tokens"),
    Case("llava", [(96, 64), (640, 480), (64, 128), (300, 200)], llava_vision, varies="num_prompt_tokens"),
    # 1 + 2, 1 + 2, 1 + 4 and 1 + 3 tiles: the batch's pixel_values carry padding tiles
    Case("llava_next", [(96, 64), (64, 128), (200, 200), (300, 100)], llava_next_vision),
    # 12, 8, 16 and 8 sub-images + the global one: the batch carries all-zero padding images
    Case("smolvlm", [(96, 64), (64, 128), (200, 200), (300, 150)], smolvlm_vision),
    # own adapter code (the projection's inputs per image); one to six HD crops, batched by crop count
    Case("phi4_multimodal", [(448, 448), (600, 300), (300, 200), (500, 500)], phi4_vision, processor_chat_template=False),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to share threads: on a busy machine two run slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.family)
def run(request, tiny_checkpoint, tmp_path_factory):
    """A family's tiny model, 4 mixed questions, and their results at batch size 4 and 1."""
    case = request.param
    settings = ModelSettings.from_config(case.family, {
        "model": str(tiny_checkpoint(case.family)), "device": "cpu", "dtype": "float32", "max_new_tokens": 4,
        "multimodal_representation": True,
    })
    images = tmp_path_factory.mktemp(f"contract-{case.family}")
    questions = synthetic_inputs(images, N_SAMPLES, case.sizes, seed=3)
    loaded = load_model(settings)
    batched = Extractor(loaded, progress=False, batch_size=4).extract(questions, images)
    singles = Extractor(loaded, progress=False, batch_size=1).extract(questions, images)
    assert all(r.status == STATUS_OK for r in batched + singles), [r.error for r in batched + singles]
    return case, loaded, questions, images, batched, singles


def single_batch(loaded, question, images):
    image = load_image(resolve_image_path(images, question.image_id))
    return loaded.adapter.build_batch(loaded, [loaded.settings.format_prompt(question.question)], [image])


def test_every_family_has_a_case_an_entry_or_its_own_adapter():
    """Every family of the table is tested here (Molmo, remote code under transformers 4.48, in tests/test_molmo.py),
    and an entry's family serves its model types."""
    assert {case.family for case in CASES} == set(families()) - {"molmo"}
    for family, entry in ENTRIES.items():
        assert all(family_of_model_type(t) == family for t in entry.model_types)
        assert adapter_class(family).family == family and adapter_class(family).entry is entry


def test_an_unknown_model_type_names_every_supported_family():
    with pytest.raises(ConfigError) as error:
        family_of_model_type("no_such_vlm", "models.x")
    message = str(error.value)
    assert "models.x: model_type 'no_such_vlm' is not supported" in message
    assert all(family in message for family in families())


def test_loads_as_the_real_classes_with_the_entrys_modules(run):
    case, loaded, _, _, batched, _ = run
    model = loaded.model
    assert family_of_model_type(model.config.model_type) == case.family
    adapter = loaded.adapter
    assert len(adapter.decoder_blocks(model)) == model.config.get_text_config().num_hidden_layers
    # the declared width is the width the projector really receives (Qwen2-VL's is embed_dim, not hidden_size)
    assert batched[0].vectors[VISION_ONLY].shape == (adapter.vision_hidden_size(model),)
    assert sum(p.numel() for p in adapter.vision_tower(model).parameters()) > 0


def test_the_batch_is_mixed(run):
    """The comparisons below mean something only if the samples differ where the family's padding lies."""
    case, _, _, _, batched, _ = run
    assert len({getattr(r, case.varies) for r in batched}) > 1
    assert len({r.num_prompt_tokens for r in batched}) > 1


def test_positions_are_the_last_image_token_and_the_last_prompt_token(run):
    _, loaded, questions, images, batched, _ = run
    image_token = loaded.adapter.image_token_id(loaded.model)
    for question, result in zip(questions, batched):
        ids = single_batch(loaded, question, images).input_ids[0].tolist()
        image_positions = [i for i, t in enumerate(ids) if t == image_token]
        assert ids[result.vision_token_position] == image_token
        assert result.vision_token_position == image_positions[-1]
        assert result.num_image_tokens == len(image_positions)
        assert result.query_token_position == len(ids) - 1 == result.num_prompt_tokens - 1


def test_prompt_tokens_equal_the_processors_own_chat_template_route(run):
    case, loaded, questions, images, _, _ = run
    if not case.processor_chat_template:
        pytest.skip(f"{case.family}: the processor has no chat template of its own")
    for question in questions[:2]:
        image = load_image(resolve_image_path(images, question.image_id))
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question.question}]}]
        expected = loaded.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert single_batch(loaded, question, images).input_ids[0].tolist() == list(np.asarray(expected["input_ids"]).reshape(-1))


def test_vectors_equal_unbatched_output_hidden_states_and_the_independent_vision_features(run):
    case, loaded, questions, images, batched, _ = run
    extractor = Extractor(loaded, progress=False)
    with torch.inference_mode():
        for question, result in zip(questions, batched):
            inputs = single_batch(loaded, question, images).inputs
            hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states
            assert_decoder_vectors_match(extractor, result, hidden, (case.family, question.question_id))
            vision = case.vision(loaded.model, inputs)
            assert rel_error(result.vectors[VISION_ONLY], vision) < 1e-4, (case.family, question.question_id)


def test_batch_of_four_equals_batch_of_one(run):
    case, _, _, _, batched, singles = run
    for a, b in zip(batched, singles):
        assert (a.answer, a.vision_token_position, a.query_token_position) == (b.answer, b.vision_token_position, b.query_token_position)
        assert a.vectors.keys() == b.vectors.keys()
        for key, value in b.vectors.items():
            assert rel_error(a.vectors[key], value) < 1e-4, (case.family, a.question_id, key)


def test_answers_equal_unbatched_generate(run):
    _, loaded, questions, images, batched, _ = run
    tokenizer = loaded.processor.tokenizer
    with torch.inference_mode():
        for question, result in zip(questions, batched):
            batch = single_batch(loaded, question, images)
            out = loaded.model.generate(**batch.inputs, do_sample=False, max_new_tokens=loaded.settings.max_new_tokens)
            assert result.answer == tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_pooling_never_averages_padding(run):
    """Where a padded batch carries padding tiles or images, the adapter's row counts leave them out: the
    counts differ between samples, and sum to what the projector saw."""
    case, loaded, questions, images, _, _ = run
    from vlmstates.adapters.declarative import ROW_COUNTS, EntryAdapter

    if not isinstance(loaded.adapter, EntryAdapter):
        pytest.skip(f"{case.family} pools in its own code")

    pictures = [load_image(resolve_image_path(images, q.image_id)) for q in questions]
    batch = loaded.adapter.build_batch(loaded, [q.question for q in questions], pictures)
    seen = []
    handle = loaded.adapter.projector(loaded.model).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            loaded.model(**batch.inputs)
    finally:
        handle.remove()
    assert batch.projector_rows == ROW_COUNTS[loaded.adapter.entry.pooling](loaded, batch.inputs)
    assert sum(batch.projector_rows) == seen[0].shape[0]
    if loaded.adapter.entry.pooling in ("tile_counts", "real_images"):
        assert len(set(batch.projector_rows)) > 1
        assert sum(batch.projector_rows) < batch.inputs["pixel_values"].shape[0] * batch.inputs["pixel_values"].shape[1]


def test_the_all_families_config_validates_and_names_every_family_once():
    """config/all-families.yaml: a valid config with one hub checkpoint per family (Molmo's MolmoE aside)."""
    import yaml
    from snakemake.utils import validate

    from conftest import REPO

    config = yaml.safe_load((REPO / "config" / "all-families.yaml").read_text())
    validate(config, schema=str(REPO / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    hub_ids = {
        "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct", "gemma3": "google/gemma-3-12b-it",
        "phi4_multimodal": "microsoft/Phi-4-multimodal-instruct", "molmo": "allenai/Molmo-7B-O-0924",
        "llava_next": "llava-hf/llama3-llava-next-8b-hf", "smolvlm": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        "llava": "llava-hf/llava-1.5-7b-hf", "qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct",
    }
    assert set(hub_ids) == set(families())
    assert sorted(ModelSettings.from_config(n, e).model for n, e in config["models"].items()) == sorted(hub_ids.values())
