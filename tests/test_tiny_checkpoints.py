"""The tiny checkpoints load and run like real hub checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmstates.demo.tiny import TINY_FAMILIES, atomic_output_dir, build_tiny_checkpoint

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

QUESTION = "Is the red circle left of the blue square?"
SECOND_QUESTION = "How many apples are on the table?"


# The first two families' checkpoints in detail; every family's is loaded and run by tests/test_family_contract.py
# (Phi-4's also by tests/test_phi4_multimodal.py).
@pytest.fixture(scope="module", params=["qwen2_5_vl", "gemma3"])
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    out = tmp_path_factory.mktemp(family) / "ckpt"
    path = build_tiny_checkpoint(family, out, seed=0)
    assert path == out
    return family, path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    family, path = checkpoint
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    model.eval()
    return family, processor, model


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _images_arg(family: str, images: list[Image.Image]):
    # Gemma 3 wants the images nested per sample; Qwen takes a flat list.
    return [[im] for im in images] if family == "gemma3" else images


def _red_blue_image(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    img.paste((220, 20, 20), (0, 0, width // 2, height // 2))
    img.paste((20, 20, 220), (width // 2, height // 2, width, height))
    return img


def _expected_image_tokens(family: str, model, inputs, index: int) -> int:
    if family == "gemma3":
        return model.config.mm_tokens_per_image
    merge = model.config.vision_config.spatial_merge_size
    return int(inputs["image_grid_thw"][index].prod()) // (merge * merge)


def test_config_model_type_and_size(checkpoint):
    family, path = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["text_config"]["num_hidden_layers"] == 4
    assert transformers.AutoConfig.from_pretrained(path).model_type == family
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    # nothing half-written left next to the folder
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


def test_loads_as_real_classes(loaded):
    family, processor, model = loaded
    expected = {
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
        "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor"),
    }[family]
    assert (type(model).__name__, type(processor).__name__) == expected
    assert model.dtype == torch.float32
    tok = processor.tokenizer
    cfg = model.config
    assert cfg.text_config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(model.generation_config, name) is not None
    assert model.generation_config.pad_token_id == tok.pad_token_id == cfg.text_config.pad_token_id
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    if family == "qwen2_5_vl":
        names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
        ids = {t: tok.convert_tokens_to_ids(t) for t in names}
        assert cfg.image_token_id == ids["<|image_pad|>"]
        assert cfg.video_token_id == ids["<|video_pad|>"]
        assert cfg.vision_start_token_id == ids["<|vision_start|>"]
        assert cfg.vision_end_token_id == ids["<|vision_end|>"]
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    else:
        assert cfg.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>") == tok.image_token_id
        assert cfg.boi_token_id == tok.convert_tokens_to_ids("<start_of_image>")
        assert cfg.eoi_token_id == tok.convert_tokens_to_ids("<end_of_image>")
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
        assert tok.unk_token == "<unk>"


def test_any_text_tokenizes_and_round_trips(loaded):
    _, processor, _ = loaded
    tok = processor.tokenizer
    text = "Naïve café: 漢字, emoji 🙂, tabs\tand\nnewlines — 12345."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None:
        assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template_and_image_tokens(loaded):
    family, processor, model = loaded
    prompt = processor.apply_chat_template(_messages(QUESTION), add_generation_prompt=True, tokenize=False)
    if family == "qwen2_5_vl":
        assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
    else:
        assert prompt == (
            "<bos><start_of_turn>user\n<start_of_image>" + QUESTION + "<end_of_turn>\n<start_of_turn>model\n"
        )
    img = _red_blue_image(96, 64)
    inputs = processor(text=[prompt], images=_images_arg(family, [img]), return_tensors="pt")
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert n_image == _expected_image_tokens(family, model, inputs, 0) > 0
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(out.logits).all()

    # As with the real checkpoints: the Gemma tokenizer prepends <bos> itself, so a
    # prompt rendered with tokenize=False (which already starts with <bos>) gets two
    # unless add_special_tokens=False; the Qwen tokenizer adds nothing.
    ids = inputs["input_ids"][0].tolist()
    plain = processor(text=[prompt], images=_images_arg(family, [img]), add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ][0].tolist()
    if family == "gemma3":
        bos = processor.tokenizer.bos_token_id
        assert ids[:3] == [bos, bos, processor.tokenizer.convert_tokens_to_ids("<start_of_turn>")]
        assert plain == ids[1:]
    else:
        assert plain == ids


def test_image_size_changes_qwen_token_count(loaded):
    family, processor, model = loaded
    if family != "qwen2_5_vl":
        pytest.skip("Gemma 3 resizes every image to the same square")
    prompt = processor.apply_chat_template(_messages(QUESTION), add_generation_prompt=True, tokenize=False)
    counts = []
    for size in [(96, 64), (64, 128), (640, 480)]:
        inputs = processor(text=[prompt], images=[_red_blue_image(*size)], return_tensors="pt")
        counts.append(int((inputs["input_ids"] == model.config.image_token_id).sum()))
    assert len(set(counts)) == 3
    assert max(counts) <= 32


def test_qwen_video_input(loaded):
    family, processor, model = loaded
    if family != "qwen2_5_vl":
        pytest.skip("Gemma 3 takes no video")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|>" in prompt
    video = torch.randint(0, 256, (4, 64, 96, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    inputs = processor(text=[prompt], videos=[video.numpy()], return_tensors="pt")
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video == int(inputs["video_grid_thw"][0].prod()) // 4 > 0
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_image_changes_the_output(loaded):
    family, processor, model = loaded
    prompt = processor.apply_chat_template(_messages(QUESTION), add_generation_prompt=True, tokenize=False)
    logits = []
    for colour in [(255, 0, 0), (0, 0, 255)]:
        inputs = processor(
            text=[prompt], images=_images_arg(family, [Image.new("RGB", (64, 64), colour)]), return_tensors="pt"
        )
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_left_padded_batch_generates(loaded):
    family, processor, model = loaded
    processor.tokenizer.padding_side = "left"
    prompts = [
        processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        for q in (QUESTION, SECOND_QUESTION + " Answer briefly, with a number only.")
    ]
    images = [_red_blue_image(96, 64), _red_blue_image(64, 128)]
    inputs = processor(text=prompts, images=_images_arg(family, images), padding=True, return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and (mask[:, -1] == 1).all() and (mask == 0).any()
    for row in range(2):
        n_image = int((inputs["input_ids"][row] == model.config.image_token_id).sum())
        assert n_image == _expected_image_tokens(family, model, inputs, row)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_same_seed_same_weights(checkpoint, tmp_path):
    family, path = checkpoint
    again = build_tiny_checkpoint(family, tmp_path / "again", seed=0)
    first = safetensors_torch.load_file(path / "model.safetensors")
    second = safetensors_torch.load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.dtype == torch.float32 for v in first.values())
    assert (path / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    # rebuilding in place replaces the folder; another seed gives other weights
    build_tiny_checkpoint(family, again, seed=1)
    third = safetensors_torch.load_file(again / "model.safetensors")
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'no_such_family'; known families: " + ", ".join(TINY_FAMILIES)):
        build_tiny_checkpoint("no_such_family", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failed_build_leaves_no_folder(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
