"""The extraction engine: one batched generate() per batch captures the vectors and produces the answers."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from . import __version__
from .adapters import adapter_for_family, family_of_model_type
from .adapters.base import LoadedModel
from .capture import PrefillCapture
from .dataset import ImageLoadError, load_image, resolve_image_path
from .failpoints import failpoint
from .settings import ModelSettings, check_layers, default_layers, model_type_of
from .store import LAYERED_REPRESENTATIONS, VISION_ONLY, SampleResult, layer_key


@dataclass(frozen=True)
class Question:
    question_id: str
    image_id: str
    question: str
    answer: str


def select_device(setting: str = "auto") -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]


def select_attention(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model(settings: ModelSettings) -> LoadedModel:
    family = family_of_model_type(model_type_of(settings.model, settings.revision), f"models.{settings.name}")
    device = select_device(settings.device)
    dtype = select_dtype(settings.dtype, device)
    attn = select_attention(settings.attn_implementation, device)
    return adapter_for_family(family).load(settings, device, dtype, attn)


class Extractor:
    """A loaded model with its hooks; turns questions into `SampleResult`s in the order given."""

    def __init__(self, loaded: LoadedModel, progress: bool = True, batch_size: int | None = None):
        self.loaded = loaded
        self.batch_size = batch_size or loaded.settings.batch_size
        self.adapter = loaded.adapter
        self.settings = loaded.settings
        model = loaded.model
        self.num_layers = len(self.adapter.decoder_blocks(model))
        layers = self.settings.layers or default_layers(self.num_layers)
        self.layers = check_layers(tuple(layers), self.num_layers, self.settings.name)
        self.image_token_id = self.adapter.image_token_id(model)
        self.capture = PrefillCapture(self.adapter.decoder_blocks(model), self.layers, self.adapter.projector(model))
        self.progress = progress

    # -- what the file records about this run ----------------------------------------------------
    def vector_dims(self) -> dict[str, int]:
        model = self.loaded.model
        dims = {VISION_ONLY: self.adapter.vision_hidden_size(model)}
        representations = LAYERED_REPRESENTATIONS if self.settings.multimodal_representation else LAYERED_REPRESENTATIONS[:2]
        for representation in representations:
            for k in self.layers:
                dims[layer_key(representation, k)] = self.adapter.hidden_size(model)
        return dims

    def attributes(self) -> dict:
        import transformers

        s = self.settings
        return {
            "model": s.model,
            "revision": s.revision or "",
            "family": self.adapter.family,
            "layers": list(self.layers),
            "num_decoder_layers": self.num_layers,
            "hidden_size": self.adapter.hidden_size(self.loaded.model),
            "vision_hidden_size": self.adapter.vision_hidden_size(self.loaded.model),
            "image_token_id": self.image_token_id,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "max_new_tokens": s.max_new_tokens,
            "prompt_template": s.prompt,
            "multimodal_representation": s.multimodal_representation,
            "trust_remote_code": s.trust_remote_code,
            "device": str(self.loaded.device),
            "attn_implementation": self.loaded.attn_implementation,
            "transformers_version": transformers.__version__,
            "torch_version": str(torch.__version__),
            "python_version": platform.python_version(),
            "package_version": __version__,
            "config_hash": s.config_hash(),
        }

    # -- extraction ------------------------------------------------------------------------------
    def extract(
        self,
        questions: Sequence[Question],
        images_dir: Path,
        finished: dict[str, SampleResult] | None = None,
        on_batch: Callable[[list[SampleResult]], None] | None = None,
    ) -> list[SampleResult]:
        """Results in the order of `questions`.

        Batches are formed the same way whether or not a run resumes, so a resumed shard equals an
        uninterrupted one: a batch whose samples are all in `finished` is taken from there, the others
        are computed and handed to `on_batch` (which saves progress).
        """
        finished = finished or {}
        results: list[SampleResult | None] = [None] * len(questions)
        bar = tqdm(total=len(questions), unit="sample", file=sys.stderr, disable=not self.progress, mininterval=5)
        computed = 0
        with self.capture, torch.inference_mode():
            for indices, images in self._batches(questions, images_dir):
                done = [finished.get(questions[i].question_id) for i in indices]
                if all(done):
                    batch_results = done
                else:
                    batch_results = self._run_isolating_failures([questions[i] for i in indices], images)
                    computed += 1
                    if on_batch:
                        on_batch(batch_results)
                    failpoint(f"batch:{computed}")
                for i, result in zip(indices, batch_results):
                    results[i] = result
                bar.update(len(indices))
        bar.close()
        return results

    def _batches(self, questions, images_dir) -> Iterator[tuple[list[int], list]]:
        """Batches of samples of one adapter group each, in order of their first sample."""
        pending: dict[object, tuple[list[int], list]] = {}
        for i, q in enumerate(questions):
            try:
                image = load_image(resolve_image_path(images_dir, q.image_id))
            except (ImageLoadError, ValueError, OSError) as error:
                yield [i], [error]  # recorded as failed by _run_isolating_failures, never batched
                continue
            group = self.adapter.batch_group(self.loaded, image)
            indices, images = pending.setdefault(group, ([], []))
            indices.append(i)
            images.append(image)
            if len(indices) == self.batch_size:
                yield pending.pop(group)
        yield from pending.values()

    def _run_isolating_failures(self, questions: list[Question], images: list) -> list[SampleResult]:
        """Run a batch; if it raises, split it until the failing sample stands alone and record it."""
        if isinstance(images[0], Exception):
            q = questions[0]
            return [SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, f"image: {images[0]}")]
        try:
            return self._run_batch(questions, images)
        except Exception as error:  # any per-sample fault: out of memory, processor, model
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(questions) == 1:
                q = questions[0]
                return [SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, f"{type(error).__name__}: {error}")]
            half = len(questions) // 2
            return self._run_isolating_failures(questions[:half], images[:half]) + self._run_isolating_failures(
                questions[half:], images[half:]
            )

    def _run_batch(self, questions: list[Question], images: list) -> list[SampleResult]:
        texts = [self.settings.format_prompt(q.question) for q in questions]
        batch = self.adapter.build_batch(self.loaded, texts, images)
        positions = self.adapter.find_positions(self.loaded, batch)
        limit = self.adapter.max_prompt_tokens(self.loaded.model)
        too_long = [n for n in positions.num_prompt_tokens if limit and n > limit]
        if too_long:
            raise ValueError(f"prompt of {too_long[0]} tokens exceeds the model's {limit}")
        self.capture.arm(
            positions.vision_padded,
            positions.query_padded,
            batch.attention_mask,
            self.settings.multimodal_representation,
            lambda projector_input: self.adapter.pool_projector_input(projector_input, batch),
        )
        answers = self.adapter.generate(self.loaded, batch, self.settings.max_new_tokens)
        vectors = self.capture.collect()
        return [
            SampleResult(
                question_id=q.question_id,
                image_id=q.image_id,
                question=q.question,
                ground_truth_answer=q.answer,
                answer=answers[row],
                vision_token_position=positions.vision[row],
                query_token_position=positions.query[row],
                num_prompt_tokens=positions.num_prompt_tokens[row],
                num_image_tokens=positions.num_image_tokens[row],
                vectors={key: value[row].numpy() for key, value in vectors.items()},
            )
            for row, q in enumerate(questions)
        ]
