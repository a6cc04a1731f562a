"""The image budget (vlmstates.extraction.image_budget): min_pixels / max_pixels set on the processor, recorded,
hashed, refused where a family has none, and the dataset's largest image estimated before any extraction job."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmstates.dataset import validate_dataset, write_validation_outputs
from vlmstates.extraction.engine import Extractor, load_model
from vlmstates.extraction.image_budget import check_image_budget, image_budget_report, image_tokens
from vlmstates.settings import ConfigError, ModelSettings
from vlmstates.store import IMAGE_BUDGET_ATTR, SHARD_INVARIANT_ATTRS

SIZES = {"small": (112, 84), "large": (1600, 1200)}  # under and over the tiny checkpoint's max_pixels


def qwen_settings(checkpoint, **budget) -> ModelSettings:
    return ModelSettings.from_config(
        "qwen", {"model": str(checkpoint), "device": "cpu", "dtype": "float32", "batch_size": 1, **budget}
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A validated table of two images of different sizes: (table, images folder)."""
    root = tmp_path_factory.mktemp("budget")
    images = root / "images"
    images.mkdir()
    rows = ["question_id,image_id,question,answer"]
    for name, size in SIZES.items():
        Image.new("RGB", size, (120, 30, 200)).save(images / f"{name}.png")
        rows.append(f"{name},{name}.png,What colour is it?,purple")
    (root / "questions.csv").write_text("\n".join(rows) + "\n")
    table = root / "validated.csv"
    write_validation_outputs(validate_dataset(root / "questions.csv", images), table, root / "v.json", root / "v.md")
    return table, images


def test_the_budget_is_part_of_the_config_hash_and_unset_keeps_the_old_one():
    plain = ModelSettings.from_config("m", {"model": "a/b"})
    assert "max_pixels" not in plain.identity() and "min_pixels" not in plain.identity()
    assert plain.config_hash() == ModelSettings.from_config("m", {"model": "a/b", "max_pixels": None}).config_hash()
    bounded = ModelSettings.from_config("m", {"model": "a/b", "max_pixels": 1003520})
    assert bounded.identity()["max_pixels"] == 1003520 and bounded.config_hash() != plain.config_hash()
    with pytest.raises(ConfigError, match=r"models\.m: min_pixels 9 is above max_pixels 4"):
        ModelSettings.from_config("m", {"model": "a/b", "min_pixels": 9, "max_pixels": 4})
    with pytest.raises(ConfigError, match=r"models\.m\.max_pixels must be a positive number of pixels"):
        ModelSettings.from_config("m", {"model": "a/b", "max_pixels": 0})


def test_a_family_without_a_pixel_budget_refuses_it():
    settings = ModelSettings.from_config("g", {"model": "a/b", "max_pixels": 1003520})
    with pytest.raises(ConfigError, match=r"models\.g\.max_pixels: the gemma3 family has no pixel budget: .*896x896"):
        check_image_budget("gemma3", settings)
    check_image_budget("qwen2_5_vl", settings)


def test_the_budget_reaches_the_processor_and_the_file(tiny_checkpoint, dataset):
    checkpoint = tiny_checkpoint("qwen2_5_vl")
    default = load_model(qwen_settings(checkpoint))
    bounded = load_model(qwen_settings(checkpoint, min_pixels=28 * 28, max_pixels=6 * 28 * 28))
    large = SIZES["large"]
    # the tiny checkpoint's own max_pixels (25088: 24 tokens for this size) and the config's (4704: fewer)
    assert image_tokens(default.processor, *large) == 24
    tokens = image_tokens(bounded.processor, *large)
    assert 1 <= tokens < 24
    # the processor's call (what extraction runs) gives what its count says
    batch = bounded.adapter.build_batch(bounded, ["What colour is it?"], [Image.new("RGB", large)])
    assert int(batch.inputs["image_grid_thw"].prod()) // 4 == tokens
    attributes = Extractor(bounded, progress=False).attributes()
    assert attributes[IMAGE_BUDGET_ATTR] == {"min_pixels": 784, "max_pixels": 4704}
    assert Extractor(default, progress=False).attributes()[IMAGE_BUDGET_ATTR] == {
        "min_pixels": 3136,
        "max_pixels": 25088,
    }
    assert IMAGE_BUDGET_ATTR in SHARD_INVARIANT_ATTRS


def test_the_largest_image_is_estimated_and_one_over_the_context_stops_the_run(tiny_checkpoint, dataset, tmp_path):
    table, images = dataset
    checkpoint = tiny_checkpoint("qwen2_5_vl")
    report = image_budget_report(qwen_settings(checkpoint), table, images, tmp_path / "ok.json")
    assert report["largest_image"] == {"image_id": "large.png", "width": 1600, "height": 1200, "image_tokens": 24}
    assert json.loads((tmp_path / "ok.json").read_text()) == report
    # every image resized to ~5000 tokens: more than the tiny decoder's context of 4096
    huge = qwen_settings(checkpoint, min_pixels=5000 * 28 * 28, max_pixels=5000 * 28 * 28)
    with pytest.raises(
        ConfigError,
        match=r"models\.qwen: image .* alone gives \d+ image tokens, more than the model's context of 4096; set models\.qwen\.max_pixels",
    ):
        image_budget_report(huge, table, images, tmp_path / "over.json")
