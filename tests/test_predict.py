"""`vlmstates predict`: one image answered through the extraction engine, on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from vlmstates.cli import main
from vlmstates.extraction.predict import TASK_PROMPTS, PredictError, prompt_template


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return str(tiny_checkpoint("qwen2_5_vl"))


@pytest.fixture(scope="module")
def image(demo):
    _, images = demo
    return str(sorted(images.iterdir())[0])


def run(capsys, *args):
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "task, question, prompt",
    [
        ("vqa", "Is the circle red?", "Is the circle red?"),
        ("caption", None, TASK_PROMPTS["caption"]),
        ("ocr", None, TASK_PROMPTS["ocr"]),
    ],
)
def test_json_output_per_task(qwen, image, capsys, task, question, prompt):
    args = ["--model", qwen, "--image", image, "--task", task, "--format", "json", "--max-new-tokens", "3"]
    args += ["--device", "cpu"] + (["--question", question] if question else [])
    code, out, err = run(capsys, *args)
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt"] == prompt  # the text the engine put in the user turn
    assert (result["task"], result["model"], result["question"], result["device"]) == (task, qwen, question, "cpu")
    assert isinstance(result["answer"], str)
    assert result["load_seconds"] >= 0 and result["answer_seconds"] >= 0


def test_txt_output_is_the_answer_alone(qwen, image, capsys):
    args = ["--model", qwen, "--image", image, "--question", "What color is the square?", "--max-new-tokens", "3"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    code, as_json, err = run(capsys, *args, "--format", "json")
    assert out == json.loads(as_json)["answer"] + "\n"  # greedy: the same answer both times


def test_custom_prompt_template(qwen, image, capsys):
    args = [
        "--model",
        qwen,
        "--image",
        image,
        "--prompt",
        "Answer briefly: {question}",
        "--question",
        "Why?",
        "--format",
        "json",
        "--max-new-tokens",
        "2",
    ]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["prompt"] == "Answer briefly: Why?"


def test_prompt_presets_and_their_question_rules():
    assert prompt_template("vqa", question="Why?") == "{question}"
    assert prompt_template("caption") == "Describe this image."
    assert prompt_template("ocr") == "Read all the text in this image."
    assert prompt_template("caption", prompt="Name the shapes.") == "Name the shapes."
    with pytest.raises(PredictError, match="--task vqa needs --question"):
        prompt_template("vqa")
    with pytest.raises(PredictError, match="--question is not used"):
        prompt_template("ocr", question="Why?")
    with pytest.raises(PredictError, match="--task 'poem'"):
        prompt_template("poem")


def test_bad_image_is_refused_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "missing.png"
    code, _, err = run(capsys, "--model", str(tmp_path / "no-model"), "--image", str(missing), "--task", "caption")
    assert code == 1
    assert f"--image {missing}: no such file" in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code, _, err = run(capsys, "--model", str(tmp_path / "no-model"), "--image", str(broken), "--task", "caption")
    assert code == 1
    assert f"--image {broken}: cannot load image" in err
