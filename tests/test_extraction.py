"""Extraction beyond the family contract: legacy image-processor names and the recorded generation settings.

Positions, captured vectors against transformers' own hidden states, the vision-only vector, batch 4 against
batch 1 and answers against unbatched generate() are checked for every family in tests/test_family_contract.py.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from vlmstates.dataset import read_validated_table
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.shards import questions_of
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ModelSettings

QUESTION = "Is the red circle left of the blue square?"


def single_inputs(extractor, question, images):
    image = load_image(resolve_image_path(images, question.image_id))
    return extractor.adapter.build_batch(
        extractor.loaded, [extractor.settings.format_prompt(question.question)], [image]
    )


# -- legacy image-processor names ----------------------------------------------------------------


def legacy_layout(checkpoint, out, image_processor_type: str):
    """A copy of a tiny checkpoint laid out as transformers 4.x saved it (the image processor's settings
    in preprocessor_config.json, as on the hub), naming `image_processor_type`."""
    shutil.copytree(checkpoint, out)
    processor = json.loads((out / "processor_config.json").read_text())
    image_processor = processor.pop("image_processor")
    image_processor.update(image_processor_type=image_processor_type, processor_class=processor["processor_class"])
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def cpu_settings(path) -> ModelSettings:
    return ModelSettings.from_config("legacy", {"model": str(path), "device": "cpu", "dtype": "float32"})


def noise_image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_legacy_image_processor_name_loads_with_the_familys_processor(tiny_checkpoint, tmp_path):
    from transformers import AutoProcessor

    original = tiny_checkpoint("qwen2_5_vl")
    legacy = legacy_layout(original, tmp_path / "legacy", "Qwen2_5_VLImageProcessor")
    with pytest.raises(ValueError, match="Unrecognized image processor"):  # what a plain load does
        AutoProcessor.from_pretrained(legacy)
    fixed, reference = load_model(cpu_settings(legacy)), load_model(cpu_settings(original))
    assert type(fixed.processor) is not type(reference.processor)  # the pinned subclass, for this load only
    assert isinstance(fixed.processor, type(reference.processor))
    assert type(fixed.processor.image_processor) is type(reference.processor.image_processor)
    assert fixed.processor.tokenizer.padding_side == "left"
    # the file's settings were read (640x480 hits the tiny pixel budget, the others do not)
    for seed, (width, height) in enumerate([(96, 64), (64, 128), (640, 480)]):
        image = noise_image(width, height, seed)
        got = fixed.adapter.build_batch(fixed, [QUESTION], [image]).inputs
        expected = reference.adapter.build_batch(reference, [QUESTION], [image]).inputs
        assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"]), (width, height)
        assert torch.equal(got["pixel_values"], expected["pixel_values"]), (width, height)
        assert torch.equal(got["input_ids"], expected["input_ids"]), (width, height)
    with pytest.raises(ValueError, match="Unrecognized image processor"):  # nothing global was changed
        AutoProcessor.from_pretrained(legacy)


def test_unknown_image_processor_name_stops_naming_the_file_the_field_and_the_fix(tiny_checkpoint, tmp_path):
    from transformers import AutoProcessor

    from vlmstates.settings import ConfigError

    unknown = legacy_layout(tiny_checkpoint("qwen2_5_vl"), tmp_path / "unknown", "Qwen25VisionProcessor")
    with pytest.raises(ConfigError) as error:
        load_model(cpu_settings(unknown))
    message = str(error.value)
    for part in (
        "models.legacy",
        str(unknown / "preprocessor_config.json"),
        "image_processor_type",
        "'Qwen25VisionProcessor'",
    ):
        assert part in message, (part, message)
    fix = '"image_processor_type": "Qwen2VLImageProcessor"'
    assert fix in message
    # the fix as the message gives it makes the checkpoint load
    config_file = unknown / "preprocessor_config.json"
    config_file.write_text(config_file.read_text().replace('"image_processor_type": "Qwen25VisionProcessor"', fix))
    assert type(AutoProcessor.from_pretrained(unknown).image_processor).__name__ == "Qwen2VLImageProcessor"


# -- generation settings -------------------------------------------------------------------------

ANSWER_TOKENS = 12  # long enough for the tiny model to repeat itself, so a repetition penalty shows


def hand_greedy(model, tokenizer, inputs, steps: int, eos_ids, repetition_penalty: float) -> str:
    """Greedy decoding by hand, for a batch of one: a full forward per step, argmax of the last logits,
    after the repetition penalty as its definition says (every token of the sequence so far, the prompt's
    too: positive logits divided by it, negative ones multiplied)."""
    ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    prompt_length = ids.shape[1]
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra).logits[0, -1]
        seen = ids[0].unique()
        penalised = logits[seen]
        logits[seen] = torch.where(penalised < 0, penalised * repetition_penalty, penalised / repetition_penalty)
        token = int(logits.argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if "mm_token_type_ids" in extra:  # Qwen's per-token modality (0: text) grows with the sequence
            extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, 1))
        if token in eos_ids:
            break
    return tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True).strip()


class GenerateSpy:
    """Records the generation_config each generate() call of a model is given."""

    def __init__(self, model, monkeypatch):
        self.configs = []
        original = model.generate

        def spy(*args, **kwargs):
            self.configs.append(copy.deepcopy(kwargs.get("generation_config")))
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)


@pytest.fixture(scope="module")
def qwen_generation(tiny_checkpoint, demo):
    """The tiny Qwen2.5-VL (its real generation_config.json settings), with and without an override."""
    table, images = demo
    path = tiny_checkpoint("qwen2_5_vl")
    questions = questions_of(read_validated_table(table).head(4))
    loaded = {}
    for variant, generation in (("checkpoint", {}), ("plain", {"repetition_penalty": 1.0})):
        entry = {
            "model": str(path),
            "batch_size": 4,
            "max_new_tokens": ANSWER_TOKENS,
            "device": "cpu",
            "generation": generation,
        }
        loaded[variant] = load_model(ModelSettings.from_config("qwen", entry))
    return path, questions, images, loaded


def test_the_checkpoints_generation_settings_are_recorded(qwen_generation, monkeypatch, tmp_path):
    from vlmstates.store import merge_shards, read_embeddings, write_embeddings

    path, questions, images, loaded = qwen_generation
    on_disk = json.loads((path / "generation_config.json").read_text())
    assert on_disk["repetition_penalty"] == 1.05 and on_disk["do_sample"] is True  # the real model's facts
    extractor = Extractor(loaded["checkpoint"], progress=False)
    spy = GenerateSpy(loaded["checkpoint"].model, monkeypatch)
    results = extractor.extract(questions, images)
    recorded = extractor.attributes()["generation_config"]
    assert recorded["repetition_penalty"] == on_disk["repetition_penalty"]
    assert recorded["eos_token_id"] == on_disk["eos_token_id"]
    assert (recorded["do_sample"], recorded["num_beams"]) == (False, 1)  # greedy, whatever the file says
    assert (recorded["max_new_tokens"], recorded["min_new_tokens"]) == (ANSWER_TOKENS, 0)
    assert "temperature" not in recorded  # greedy decoding does not read it
    # the record is what generate() was given
    assert spy.configs and all(c.repetition_penalty == 1.05 and c.do_sample is False for c in spy.configs)
    # written, read back and merged with the file
    shard = write_embeddings(tmp_path / "shard.h5", results, extractor.vector_dims(), extractor.attributes())
    assert read_embeddings(shard).generation_config == recorded
    merged = merge_shards([shard], [q.question_id for q in questions], tmp_path / "merged.h5")
    assert read_embeddings(merged).generation_config == recorded


def test_every_attribute_a_file_carries_is_declared_in_the_store(qwen_generation, tmp_path):
    from vlmstates import store
    from vlmstates.extraction.shards import resume_identity

    _, questions, images, loaded = qwen_generation
    extractor = Extractor(loaded["checkpoint"], progress=False)
    results = extractor.extract(questions[:1], images)
    identity = resume_identity(extractor.settings, questions[:1], shard=0, shard_size=1)
    attrs = extractor.attributes() | identity | {store.CREATED_ATTR: "now", store.DATASET_SOURCE_ATTR: "{}"}
    shard = store.write_embeddings(tmp_path / "shard.h5", results, extractor.vector_dims(), attrs)
    merged = store.merge_shards([shard], [questions[0].question_id], tmp_path / "merged.h5")
    declared = {value for name, value in vars(store).items() if name.endswith("_ATTR")}
    declared |= {store.shard_values_attr(name) for name in store.PER_SHARD_LISTED_ATTRS}
    written = set(store.read_embeddings(merged).attrs)
    assert written - declared == set()
    assert set(store.SHARD_INVARIANT_ATTRS) - {store.PAPER_POSITIONS_ATTR} <= written  # the latter only when on


def test_a_generation_override_is_what_generate_runs_with(qwen_generation, monkeypatch):
    _, questions, images, loaded = qwen_generation
    answers, recorded = {}, {}
    for variant, lm in loaded.items():
        extractor = Extractor(lm, progress=False)
        spy = GenerateSpy(lm.model, monkeypatch)
        answers[variant] = [r.answer for r in extractor.extract(questions, images)]
        recorded[variant] = extractor.attributes()["generation_config"]
        assert {c.repetition_penalty for c in spy.configs} == {recorded[variant]["repetition_penalty"]}
    assert (recorded["checkpoint"]["repetition_penalty"], recorded["plain"]["repetition_penalty"]) == (1.05, 1.0)
    assert loaded["plain"].settings.config_hash() != loaded["checkpoint"].settings.config_hash()
    # each answer is greedy decoding done by hand with the recorded penalty
    lm = loaded["plain"]
    tokenizer = lm.processor.tokenizer
    eos = set(recorded["plain"]["eos_token_id"])
    with torch.inference_mode():
        for k, question in enumerate(questions):
            inputs = single_inputs(Extractor(lm, progress=False, prefetch=0), question, images).inputs
            for variant in loaded:
                expected = hand_greedy(
                    lm.model, tokenizer, inputs, ANSWER_TOKENS, eos, recorded[variant]["repetition_penalty"]
                )
                assert answers[variant][k] == expected, (variant, question.question_id)
    assert answers["plain"] != answers["checkpoint"]  # the penalty matters here, so the check can fail


@pytest.mark.parametrize(
    "generation, message",
    [
        (
            {"repetition_penality": 1.0},
            r"models\.qwen\.generation\.repetition_penality is not a GenerationConfig field \(did you mean repetition_penalty",
        ),
        ({"do_sample": True}, r"models\.qwen\.generation\.do_sample cannot be set: answers are greedy"),
        (
            {"max_new_tokens": 5},
            r"models\.qwen\.generation\.max_new_tokens cannot be set: set models\.<name>\.max_new_tokens",
        ),
        ({"repetition_penalty": None}, r"models\.qwen\.generation\.repetition_penalty is null"),
        ([1.0], r"models\.qwen\.generation must be a mapping"),
    ],
)
def test_bad_generation_settings_are_refused_naming_the_key(tiny_checkpoint, generation, message):
    from vlmstates.settings import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings = ModelSettings.from_config(
            "qwen", {"model": str(tiny_checkpoint("qwen2_5_vl")), "generation": generation}
        )
        load_model(settings)
