"""One image answered from the command line (the MolmoE seed's prediction tool), through the extraction engine.

The prompt is a template in the syntax of the models config's `prompt`: `{question}` is replaced by the
question. Each task has a preset template; `--prompt` replaces it. The answer comes from the engine's
Extractor (one batch of one sample): the same chat template, batch building and greedy generate() call
as an extraction job with these settings, so no second generation path exists to drift from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmstates.errors import VlmstatesError
from vlmstates.images import load_image, resolve_image_path
from vlmstates.settings import ModelSettings
from vlmstates.store import STATUS_FAILED

TASK_PROMPTS = {
    "vqa": "{question}",
    "caption": "Describe this image.",
    "ocr": "Read all the text in this image.",
}


class PredictError(VlmstatesError, ValueError):
    """The image, task or prompt cannot be used, or the model failed on the sample; the message says which."""


@dataclass
class Prediction:
    answer: str
    model: str
    task: str
    question: str | None
    prompt: str
    device: str
    load_seconds: float
    answer_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def prompt_template(task: str, prompt: str | None = None, question: str | None = None) -> str:
    """The task's preset template, or `prompt`; checks that a question is given exactly when it is used."""
    if task not in TASK_PROMPTS:
        raise PredictError(f"--task {task!r}: choose one of {', '.join(TASK_PROMPTS)}")
    template = TASK_PROMPTS[task] if prompt is None else prompt
    if not template.strip():
        raise PredictError("--prompt is empty")
    uses_question = "{question}" in template
    if uses_question and not question:
        where = f"--task {task}" if prompt is None else f"--prompt {template!r} (it contains {{question}})"
        raise PredictError(f"{where} needs --question")
    if question and not uses_question:
        raise PredictError(
            f"--question is not used by the prompt {template!r}: use --task vqa, or put {{question}} in --prompt"
        )
    return template


def checked_image(image: str | Path) -> Path:
    """The image's real path, refused before the model loads when it is missing or cannot be decoded."""
    path = Path(image)
    if not path.is_file():
        raise PredictError(f"--image {image}: no such file")
    real = path.resolve()
    try:
        load_image(resolve_image_path(real.parent, real.name)).close()
    except (ValueError, OSError) as error:  # ImagePathError and ImageLoadError are ValueErrors
        raise PredictError(f"--image {image}: {error}") from error
    return real


def predict(
    model: str,
    image: str | Path,
    task: str = "vqa",
    question: str | None = None,
    prompt: str | None = None,
    device: str = "auto",
    max_new_tokens: int = 200,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Prediction:
    template = prompt_template(task, prompt, question)
    if max_new_tokens < 1:
        raise PredictError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    image_path = checked_image(image)
    # Built directly, not from_config: a preset without {question} (caption, ocr) is a valid prompt here.
    settings = ModelSettings(
        name="predict",
        model=model,
        revision=revision,
        batch_size=1,
        max_new_tokens=max_new_tokens,
        prompt=template,
        trust_remote_code=trust_remote_code,
        device=device,
    )
    from vlmstates.extraction.engine import (  # torch is imported only once the input is checked
        Extractor,
        Question,
        load_model,
    )

    started = time.perf_counter()
    extractor = Extractor(load_model(settings), progress=False, batch_size=1)
    loaded = time.perf_counter()
    sample = Question(question_id="predict", image_id=image_path.name, question=question or "", answer="")
    [result] = extractor.extract([sample], image_path.parent)
    if result.status == STATUS_FAILED:
        raise PredictError(f"{model} failed on {image}: {result.error}")
    return Prediction(
        answer=result.answer,
        model=model,
        task=task,
        question=question,
        prompt=settings.format_prompt(question or ""),
        device=str(extractor.loaded.device),
        load_seconds=round(loaded - started, 3),
        answer_seconds=round(time.perf_counter() - loaded, 3),
    )
