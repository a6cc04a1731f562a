"""The extraction engine: one batched generate() per batch captures the vectors and produces the answers.

Batches are planned by vlmstates.extraction.batching (by estimated prompt length, before any pixel is decoded).
While the model runs one batch, a background thread decodes the images of the next ones and runs the
processor on them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vlmstates import __version__
from vlmstates.dataset import Question
from vlmstates.extraction import batching
from vlmstates.extraction.adapters import adapter_for_family, family_of_model_type
from vlmstates.extraction.adapters.base import Batch, LoadedModel
from vlmstates.extraction.attention import choose_attention
from vlmstates.extraction.capture import PrefillCapture
from vlmstates.extraction.image_budget import check_image_budget, effective_image_budget
from vlmstates.extraction.paper_positions import check_paper_positions, in_padded_batch, paper_vision_positions
from vlmstates.extraction.positions import Positions
from vlmstates.failpoints import failpoint
from vlmstates.images import ImageLoadError, load_image, resolve_image_path
from vlmstates.settings import AUTO_BATCH_SIZE, ModelSettings, check_generation_fields, model_type_of, recorded_layers
from vlmstates.store import (
    ANSWERS_ATTR,
    GENERATION_CONFIG_ATTR,
    IMAGE_BUDGET_ATTR,
    MULTIMODAL,
    PAPER_POSITIONS_ATTR,
    PAPER_VISION_TOKEN,
    QUERY_TOKEN,
    VISION_ONLY,
    VISION_TOKEN,
    SampleResult,
    file_semantics,
    layer_key,
)

log = logging.getLogger(__name__)

#: Batches decoded and preprocessed ahead of the one the model runs.
PREFETCH_BATCHES = 2


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


def load_model(settings: ModelSettings) -> LoadedModel:
    family = family_of_model_type(model_type_of(settings.model, settings.revision), f"models.{settings.name}")
    device = select_device(settings.device)
    dtype = select_dtype(settings.dtype, device)
    attention = choose_attention(
        family, settings.attn_implementation, device.type, f"models.{settings.name}.attn_implementation"
    )
    check_generation_fields(settings)  # before the weights load: a typo fails in seconds
    check_image_budget(family, settings)
    check_paper_positions(settings, family)
    return adapter_for_family(family).load(settings, device, dtype, attention)


# -- preparing batches on the host, ahead of the model ----------------------------------------------
@dataclass
class Prepared:
    """A batch preprocessed on the host (pinned for CUDA), its positions read off input_ids, and the
    paper code's vision positions (own prompt) when the model entry records them."""

    batch: Batch
    positions: Positions
    paper_vision: list[int] | None = None


@dataclass
class Fetched:
    """A planned batch: each sample's decoded image or why it could not be loaded, and the batch prepared
    from the loaded ones or why preparing it failed (the engine then splits it to find the culprit)."""

    images: list[Image.Image | None]
    image_errors: list[Exception | None]
    prepared: Prepared | None = None
    error: Exception | None = None


#: What `Extractor(stage_timer=...)` calls around each stage of a batch: `stage_timer(stage, prepared)`
#: returns a context manager held for the stage's duration, left without an exception when the stage
#: completes. "prepare": a batch's images loaded and preprocessed (in the prefetch thread when prefetching);
#: "wait": the model waiting for a prepared batch; "model": the model on `prepared` (its prefill, then the
#: answer's decoding unless prefill-only).
StageTimer = Callable[[str, "Prepared | None"], contextlib.AbstractContextManager[None]]


def untimed(stage: str, prepared: Prepared | None = None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """Apply `fn` once to every distinct tensor of a batch (input_ids is usually also in inputs)."""
    done: dict[int, torch.Tensor] = {}

    def once(t):
        if not torch.is_tensor(t):
            return t
        if id(t) not in done:
            done[id(t)] = fn(t)
        return done[id(t)]

    inputs = {k: once(v) for k, v in batch.inputs.items()}
    # replace(), not Batch(): an adapter's Batch subclass keeps its own fields (e.g. the projector's row counts)
    return replace(batch, inputs=inputs, input_ids=once(batch.input_ids), attention_mask=once(batch.attention_mask))


class BatchPreparer:
    """Loads a batch's images and runs the processor on them, on the host; `prefetch` batches ahead in a
    background thread (0: in line). The engine copies prepared batches to the device itself."""

    def __init__(self, loaded: LoadedModel, prefetch: int, stage_timer: StageTimer):
        self.loaded, self.adapter, self.settings = loaded, loaded.adapter, loaded.settings
        self.prefetch, self.timed = prefetch, stage_timer
        # The prefetch thread has its own processor: a fast tokenizer is not safe to share between threads
        # (its __call__ reconfigures padding in place; the main thread decodes the answers meanwhile).
        self.host = replace(loaded, device=torch.device("cpu"))
        self._prefetch_host = replace(self.host, processor=copy.deepcopy(loaded.processor)) if prefetch > 0 else None
        self._pin = loaded.device.type == "cuda"

    def ahead(self, batches: list[list[int]], questions, images_dir: Path) -> Iterator[tuple[list[int], Fetched]]:
        """The batches with their images loaded and preprocessed, in order; `prefetch` batches ahead."""

        def fetch(indices, host):
            return self.fetch([questions[i] for i in indices], images_dir, host)

        if self.prefetch <= 0:
            for indices in batches:
                with self.timed("wait", None):
                    fetched = fetch(indices, self.host)
                yield indices, fetched
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmstates-prefetch") as pool:
            queue: deque[tuple[list[int], Future]] = deque()
            for indices in batches:
                queue.append((indices, pool.submit(fetch, indices, self._prefetch_host)))
                if len(queue) > self.prefetch:
                    yield self._next(queue)
            while queue:
                yield self._next(queue)

    def _next(self, queue: deque) -> tuple[list[int], Fetched]:
        indices, future = queue.popleft()
        with self.timed("wait", None):
            fetched = future.result()
        return indices, fetched

    def fetch(self, questions: list[Question], images_dir: Path, host: LoadedModel) -> Fetched:
        """`host`: the model on the CPU, with a processor the calling thread may use."""
        with self.timed("prepare", None):
            loads = [self._load(q, images_dir) for q in questions]
            fetched = Fetched([image for image, _ in loads], [error for _, error in loads])
            usable = [(q, image) for q, (image, _) in zip(questions, loads) if image is not None]
            if usable:
                try:
                    fetched.prepared = self.prepare([q for q, _ in usable], [image for _, image in usable], host)
                except Exception as error:  # recorded by the engine, which splits the batch to find the culprit
                    fetched.error = error
        return fetched

    @staticmethod
    def _load(question: Question, images_dir: Path) -> tuple[Image.Image | None, Exception | None]:
        try:
            return load_image(resolve_image_path(images_dir, question.image_id)), None
        except (ImageLoadError, ValueError, OSError) as error:
            return None, error

    def prepare(self, questions: list[Question], images: list, host: LoadedModel) -> Prepared:
        if len(questions) > 1 and len({self.adapter.batch_group(host, *image.size) for image in images}) > 1:
            # the plan grouped by file headers; should decoding disagree, the split runs them apart
            raise ValueError("the batch's decoded images fall into different batch groups")
        texts = [self.settings.format_prompt(q.question) for q in questions]
        batch = self.adapter.build_batch(host, texts, images)
        positions = self.adapter.find_positions(host, batch)
        limit = self.adapter.max_prompt_tokens(self.loaded.model)
        too_long = [n for n in positions.num_prompt_tokens if limit and n > limit]
        if too_long:
            raise ValueError(f"prompt of {too_long[0]} tokens exceeds the model's {limit}")
        paper = (
            paper_vision_positions(self.adapter.family, positions, batch.inputs)
            if self.settings.paper_positions
            else None
        )
        if self._pin:  # page-locked, so that the copy to the GPU is asynchronous
            batch = _map_tensors(batch, torch.Tensor.pin_memory)
        return Prepared(batch, positions, paper)


# -- the engine ---------------------------------------------------------------------------------------
class Extractor:
    """A loaded model with its hooks; turns questions into `SampleResult`s in the order given.

    `batch_size` overrides the settings' (an int or "auto"); `prefetch` batches are decoded and
    preprocessed ahead in a background thread (0: in line); `min_new_tokens` fixes the answer length
    (benchmarks); `stage_timer` is called around each stage of a batch (`StageTimer`, benchmarks).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        progress: bool = True,
        batch_size: int | str | None = None,
        prefetch: int = PREFETCH_BATCHES,
        min_new_tokens: int = 0,
        stage_timer: StageTimer = untimed,
    ):
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.settings = loaded.settings
        self.batch_size = self._capped(batch_size or loaded.settings.batch_size)
        self.min_new_tokens = min_new_tokens
        self.timed = stage_timer
        model = loaded.model
        self.num_layers = len(self.adapter.decoder_blocks(model))
        self.layers = recorded_layers(self.settings, self.num_layers)
        self.image_token_id = self.adapter.image_token_id(model)
        self.capture = PrefillCapture(
            self.adapter.decoder_blocks(model),
            self.layers,
            self.adapter.projector(model),
            self.adapter.block_hidden_states,
        )
        self.progress = progress
        self.preparer = BatchPreparer(loaded, prefetch, stage_timer)

    def _capped(self, batch_size: int | str) -> int | str:
        cap = self.adapter.max_batch_size
        if cap is not None and (batch_size == AUTO_BATCH_SIZE or batch_size > cap):
            log.info("batch size %s capped at %d, the %s family's max_batch_size", batch_size, cap, self.adapter.family)
            return cap
        return batch_size

    # -- what the file records about this run ----------------------------------------------------
    def vector_dims(self) -> dict[str, int]:
        model = self.loaded.model
        dims = {VISION_ONLY: self.adapter.vision_hidden_size(model)}
        representations = [VISION_TOKEN, QUERY_TOKEN]
        representations += [MULTIMODAL] if self.settings.multimodal_representation else []
        representations += [PAPER_VISION_TOKEN] if self.settings.paper_positions else []
        for representation in representations:
            for k in self.layers:
                dims[layer_key(representation, k)] = self.adapter.hidden_size(model)
        return dims

    def _generation(self) -> tuple[int, int]:
        """(max_new_tokens, min_new_tokens) of each batch's generate() call. Prefill-only: one new token,
        discarded, so that generate() runs its prefill forward (the same one, with the same inputs, as
        when it answers) and stops; a bare forward would not build the inputs the way generate() does
        (e.g. the position ids of left-padded rows)."""
        return (self.settings.max_new_tokens, self.min_new_tokens) if self.settings.answers else (1, 0)

    def _image_budget(self) -> dict | None:
        return effective_image_budget(self.loaded.processor, self.adapter.family)

    def attributes(self) -> dict:
        import transformers

        s = self.settings
        return {
            "model": s.model,
            "revision": s.revision or "",
            "family": self.adapter.family,
            "semantics": file_semantics(self.adapter.semantics, answered=s.answers, paper_positions=s.paper_positions),
            "layers": list(self.layers),
            "num_decoder_layers": self.num_layers,
            "hidden_size": self.adapter.hidden_size(self.loaded.model),
            "vision_hidden_size": self.adapter.vision_hidden_size(self.loaded.model),
            "image_token_id": self.image_token_id,
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            ANSWERS_ATTR: s.answers,
            "max_new_tokens": s.max_new_tokens if s.answers else 0,
            # what each batch's generate() runs with: the checkpoint's generation_config.json, the
            # config's `generation` over it, the engine's fixed fields (GENERATION_CONFIG_ATTR)
            GENERATION_CONFIG_ATTR: self.adapter.effective_generation(self.loaded, *self._generation()),
            "prompt_template": s.prompt,
            "multimodal_representation": s.multimodal_representation,
            # only when on, so that the files of every other run keep exactly the attributes they had
            **({PAPER_POSITIONS_ATTR: True} if s.paper_positions else {}),
            # only for a family with a pixel budget: the processor's effective bounds
            **({IMAGE_BUDGET_ATTR: budget} if (budget := self._image_budget()) is not None else {}),
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

        Batches are planned the same way whether or not a run resumes, so a resumed shard equals an
        uninterrupted one: a batch whose samples are all in `finished` is taken from there, the others
        are computed and handed to `on_batch` (which saves progress).
        """
        finished = finished or {}
        images_dir = Path(images_dir)
        results: list[SampleResult | None] = [None] * len(questions)
        bar = tqdm(total=len(questions), unit="sample", file=sys.stderr, disable=not self.progress, mininterval=5)
        computed = 0

        def record(indices: list[int], batch_results: list[SampleResult]) -> None:
            nonlocal computed
            computed += 1
            if on_batch:
                on_batch(batch_results)
            failpoint(f"batch:{computed}")
            place(indices, batch_results)

        def place(indices: list[int], batch_results: list[SampleResult]) -> None:
            for i, result in zip(indices, batch_results):
                results[i] = result
            bar.update(len(indices))

        def unfinished(indices: list[int]) -> bool:
            return not all(questions[i].question_id in finished for i in indices)

        def try_batch(indices: list[int]) -> list[SampleResult] | None:
            """A batch's results, or None if a sample is faulty (for the batch-size search)."""
            batch_questions = [questions[i] for i in indices]
            fetched = self.preparer.fetch(batch_questions, images_dir, self.preparer.host)
            if fetched.prepared is None or any(fetched.image_errors):
                return None
            return self._execute(batch_questions, fetched.prepared)

        with self.capture.installed(), torch.inference_mode():
            keys = batching.sort_keys(self.loaded, questions, images_dir)
            plan = batching.plan(self.batch_size, self.loaded.device, keys, unfinished, try_batch)
            self.batch_size = plan.batch_size
            todo = []
            for indices in plan.batches:
                done = [finished.get(questions[i].question_id) for i in indices]
                if all(done):
                    place(indices, done)
                elif indices == plan.tried:
                    record(indices, plan.tried_results)
                else:
                    todo.append(indices)
            for indices, fetched in self.preparer.ahead(todo, questions, images_dir):
                record(indices, self._compute([questions[i] for i in indices], fetched))
        bar.close()
        return results

    # -- running the model ------------------------------------------------------------------------
    def _compute(self, questions: list[Question], fetched: Fetched) -> list[SampleResult]:
        """A planned batch's results: samples whose image failed to load are recorded failed, the rest run."""
        results: list[SampleResult | None] = [None] * len(questions)
        usable = []
        for k, (q, error) in enumerate(zip(questions, fetched.image_errors)):
            if error is not None:
                results[k] = SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, f"image: {error}")
            else:
                usable.append(k)
        if usable:
            ran = self._run_isolating_failures(
                [questions[k] for k in usable], [fetched.images[k] for k in usable], fetched.prepared, fetched.error
            )
            for k, result in zip(usable, ran):
                results[k] = result
        return results

    def _run_isolating_failures(
        self, questions: list[Question], images: list, prepared: Prepared | None = None, error: Exception | None = None
    ) -> list[SampleResult]:
        """Run a batch (`prepared`, else prepared here; `error`: why preparing it failed); if it fails,
        split it until the failing sample stands alone and record it."""
        if error is None:
            try:
                if prepared is None:
                    prepared = self.preparer.prepare(questions, images, self.preparer.host)
                return self._execute(questions, prepared)
            except Exception as raised:  # any per-sample fault: out of memory, processor, model
                error = raised
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(questions) == 1:
            q = questions[0]
            return [
                SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, f"{type(error).__name__}: {error}")
            ]
        half = len(questions) // 2
        return self._run_isolating_failures(questions[:half], images[:half]) + self._run_isolating_failures(
            questions[half:], images[half:]
        )

    def _execute(self, questions: list[Question], prepared: Prepared) -> list[SampleResult]:
        with self.timed("model", prepared):
            device = self.loaded.device
            batch = _map_tensors(prepared.batch, lambda t: t.to(device, non_blocking=t.is_pinned()))
            positions, paper = prepared.positions, prepared.paper_vision
            self.capture.arm(
                positions.vision_padded,
                positions.query_padded,
                batch.attention_mask,
                self.settings.multimodal_representation,
                lambda projector_input: self.adapter.pool_projector_input(projector_input, batch),
                torch.tensor(in_padded_batch(paper, positions)) if paper is not None else None,
            )
            answers = self.adapter.generate(self.loaded, batch, *self._generation())
            vectors = self.capture.collect()
        return [
            SampleResult(
                question_id=q.question_id,
                image_id=q.image_id,
                question=q.question,
                ground_truth_answer=q.answer,
                answer=answers[row] if self.settings.answers else "",
                vision_token_position=positions.vision[row],
                query_token_position=positions.query[row],
                num_prompt_tokens=positions.num_prompt_tokens[row],
                num_image_tokens=positions.num_image_tokens[row],
                paper_vision_token_position=paper[row] if paper is not None else None,
                vectors={key: value[row].numpy() for key, value in vectors.items()},
            )
            for row, q in enumerate(questions)
        ]
