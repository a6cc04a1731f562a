"""The extraction engine: one batched generate() per batch captures the vectors and produces the answers.

Batches are planned before any pixel is decoded: every sample's prompt length is estimated from its
question's tokens and its image's size (read off the file header), and samples of similar length are
batched together, longest first, so that little of a batch is padding and the first batch is the largest
(which `batch_size: auto` probes). The plan is a deterministic function of the shard's questions, their
image headers and the batch size, so a resumed shard forms the same batches. While the model runs one
batch, a background thread decodes the images of the next ones and runs the processor on them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import ExifTags, Image
from tqdm import tqdm

from . import __version__
from .adapters import adapter_for_family, family_of_model_type
from .adapters.base import Batch, LoadedModel
from .capture import PrefillCapture
from .images import ImageLoadError, load_image, resolve_image_path
from .failpoints import failpoint
from .positions import Positions
from .settings import AUTO_BATCH_SIZE, ModelSettings, check_generation_fields, check_layers, default_layers, model_type_of
from .store import GENERATION_CONFIG_ATTR, LAYERED_REPRESENTATIONS, VISION_ONLY, SampleResult, layer_key

log = logging.getLogger(__name__)

#: `batch_size: auto` on CUDA: the first size tried on the first (longest) batch, halved on out-of-memory.
AUTO_BATCH_START = 64
#: `batch_size: auto` elsewhere: there is no device memory to probe, so a fixed size.
AUTO_BATCH_FIXED = 8
#: Batches decoded and preprocessed ahead of the one the model runs.
PREFETCH_BATCHES = 2


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
    check_generation_fields(settings)  # before the weights load: a typo fails in seconds
    return adapter_for_family(family).load(settings, device, dtype, attn)


def probes_memory(device: torch.device) -> bool:
    """Whether `batch_size: auto` searches the batch size by trying it (only CUDA reports out-of-memory)."""
    return device.type == "cuda"


# -- batch planning ----------------------------------------------------------------------------------
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def read_image_size(images_dir: Path, image_id: str) -> tuple[int, int] | None:
    """A question's image (width, height) as it will be decoded, read off the file's header without
    decoding the pixels; None if it cannot be read (its load then records the error)."""
    try:
        with Image.open(resolve_image_path(images_dir, image_id)) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # any unreadable file: load_image reports it properly when the sample runs
        return None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


@dataclass(frozen=True)
class SortKey:
    group: object  # the adapter's batch group: only samples of one group share a batch
    length: int  # estimated prompt tokens


def plan_batches(keys: Sequence[SortKey | None], batch_size: int) -> list[list[int]]:
    """Batches of sample indices: within each group by estimated length (longest first, ties in dataset
    order), cut into batches of `batch_size`; batches ordered longest first; unreadable samples (None)
    last, one per batch."""
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key.group, []).append(i)
    batches = []
    for members in groups.values():
        members.sort(key=lambda i: (-keys[i].length, i))
        batches += [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
    batches.sort(key=lambda batch: (-keys[batch[0]].length, batch[0]))
    return batches + [[i] for i, key in enumerate(keys) if key is None]


# -- timing (for benchmarks) -------------------------------------------------------------------------
@dataclass
class StageTimes:
    """Seconds per stage, summed over batches. `prepare` runs in the prefetch thread, overlapped with
    the model; `wait` is the time the model waited for it."""

    prepare: float = 0.0
    wait: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    batches: int = 0
    prompt_tokens: int = 0
    padded_tokens: int = 0  # batch rows x padded length: the tokens prefill actually processed


class PrefillClock:
    """Marks when the prefill of a generate() call ends: the model's first forward after `start()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.prefill_end: float | None = None
        self._handle = None

    def __enter__(self) -> "PrefillClock":
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def start(self) -> None:
        self.prefill_end = None

    def _hook(self, module, args, output) -> None:
        if self.prefill_end is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prefill_end = time.perf_counter()


# -- the engine ---------------------------------------------------------------------------------------
@dataclass
class _Ready:
    """A batch preprocessed on the host (pinned for CUDA), its positions read off input_ids."""

    batch: Batch
    positions: Positions


@dataclass
class _Fetched:
    """A planned batch's images (or their load errors) and its prepared batch (or the error preparing it)."""

    images: list
    ready: _Ready | Exception | None = None


@dataclass
class _Plan:
    batch_size: int
    batches: list[list[int]]
    probed: list[int] | None = None  # the batch `batch_size: auto` ran to probe memory, and its results
    probed_results: list[SampleResult] = field(default_factory=list)


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


class Extractor:
    """A loaded model with its hooks; turns questions into `SampleResult`s in the order given.

    `batch_size` overrides the settings' (an int or "auto"); `prefetch` batches are decoded and
    preprocessed ahead in a background thread (0: in line); `min_new_tokens` fixes the answer length
    (benchmarks); `timings` collects `StageTimes`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        progress: bool = True,
        batch_size: int | str | None = None,
        prefetch: int = PREFETCH_BATCHES,
        min_new_tokens: int = 0,
        timings: StageTimes | None = None,
    ):
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.settings = loaded.settings
        self.batch_size = self._capped(batch_size or loaded.settings.batch_size)
        self.prefetch = prefetch
        self.min_new_tokens = min_new_tokens
        self.timings = timings
        model = loaded.model
        self.num_layers = len(self.adapter.decoder_blocks(model))
        layers = self.settings.layers or default_layers(self.num_layers)
        self.layers = check_layers(tuple(layers), self.num_layers, self.settings.name)
        self.image_token_id = self.adapter.image_token_id(model)
        self.capture = PrefillCapture(self.adapter.decoder_blocks(model), self.layers, self.adapter.projector(model))
        self.progress = progress
        # The processor builds batches on the host; the engine copies them to the device itself. The
        # prefetch thread has its own processor: a fast tokenizer is not safe to share between threads
        # (its __call__ reconfigures padding in place; the main thread decodes the answers meanwhile).
        self._host = replace(loaded, device=torch.device("cpu"))
        self._prefetch_host = replace(self._host, processor=copy.deepcopy(loaded.processor)) if prefetch > 0 else None
        self._pin = loaded.device.type == "cuda"
        self._prefill_clock = PrefillClock(model, loaded.device) if timings is not None else None

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
            # what the answer's generate() runs with: the checkpoint's generation_config.json, the
            # config's `generation` over it, the engine's fixed fields (GENERATION_CONFIG_ATTR)
            GENERATION_CONFIG_ATTR: self.adapter.effective_generation(self.loaded, s.max_new_tokens, self.min_new_tokens),
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

        with self.capture, torch.inference_mode(), self._prefill_clock or contextlib.nullcontext():
            keys = self._sort_keys(questions, images_dir)
            plan = self._plan(questions, images_dir, keys, finished)
            todo = []
            for indices in plan.batches:
                done = [finished.get(questions[i].question_id) for i in indices]
                if all(done):
                    place(indices, done)
                elif indices == plan.probed:
                    record(indices, plan.probed_results)
                else:
                    todo.append(indices)
            for indices, fetched in self._fetched(todo, questions, images_dir):
                record(indices, self._compute([questions[i] for i in indices], fetched))
        bar.close()
        return results

    def _sort_keys(self, questions: Sequence[Question], images_dir: Path) -> list[SortKey | None]:
        """Each sample's batch group and estimated prompt length: question tokens plus image tokens."""
        if not questions:
            return []
        texts = [self.settings.format_prompt(q.question) for q in questions]
        encoded = self.loaded.processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        keys: list[SortKey | None] = []
        for q, ids in zip(questions, encoded):
            size = read_image_size(images_dir, q.image_id)
            if size is None:
                keys.append(None)
                continue
            image_tokens = self.adapter.image_token_estimate(self.loaded, *size)
            keys.append(SortKey(self.adapter.batch_group(self.loaded, *size), len(ids) + image_tokens))
        return keys

    def _plan(self, questions, images_dir, keys, finished) -> _Plan:
        """The plan for the configured batch size or, with `auto`, for the one found by `_probe`."""
        if self.batch_size != AUTO_BATCH_SIZE:
            return _Plan(self.batch_size, plan_batches(keys, self.batch_size))
        if not probes_memory(self.loaded.device):
            self.batch_size = AUTO_BATCH_FIXED
            log.info("batch size auto on %s: %d (no device memory to probe)", self.loaded.device, self.batch_size)
            return _Plan(self.batch_size, plan_batches(keys, self.batch_size))
        plan = self._probe(questions, images_dir, keys, finished)
        self.batch_size = plan.batch_size
        log.info("batch size auto: %d", self.batch_size)
        return plan

    def _probe(self, questions, images_dir, keys, finished) -> _Plan:
        """Halve from AUTO_BATCH_START until the first unfinished batch runs without running out of
        memory; it holds the longest prompts, so the later batches fit too. Its results are kept."""
        size = max(1, min(AUTO_BATCH_START, len(questions)))
        while True:
            batches = plan_batches(keys, size)
            first = next((b for b in batches if not all(questions[i].question_id in finished for i in b)), None)
            if first is None or size == 1:
                return _Plan(size, batches)
            fetched = self._fetch([questions[i] for i in first], images_dir, self._host)
            if not isinstance(fetched.ready, _Ready) or any(isinstance(image, Exception) for image in fetched.images):
                return _Plan(size, batches)  # a faulty sample, not memory: the normal path records it
            try:
                return _Plan(size, batches, first, self._execute([questions[i] for i in first], fetched.ready))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.info("batch size auto: %d does not fit, trying %d", size, size // 2)
                size //= 2
            except Exception:  # not a memory question either
                return _Plan(size, batches)

    # -- loading and preprocessing, ahead of the model --------------------------------------------
    def _fetched(self, batches: list[list[int]], questions, images_dir) -> Iterator[tuple[list[int], _Fetched]]:
        """The batches with their images loaded and preprocessed, in order; `prefetch` batches ahead."""

        def fetch(indices, host):
            return self._fetch([questions[i] for i in indices], images_dir, host)

        if self.prefetch <= 0:
            for indices in batches:
                yield indices, self._waited(fetch, indices, self._host)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmstates-prefetch") as pool:
            queue: deque[tuple[list[int], Future]] = deque()
            for indices in batches:
                queue.append((indices, pool.submit(fetch, indices, self._prefetch_host)))
                if len(queue) > self.prefetch:
                    yield self._next(queue)
            while queue:
                yield self._next(queue)

    def _next(self, queue: deque) -> tuple[list[int], _Fetched]:
        indices, future = queue.popleft()
        return indices, self._waited(future.result)

    def _waited(self, get, *args):
        start = time.perf_counter()
        value = get(*args)
        if self.timings is not None:
            self.timings.wait += time.perf_counter() - start
        return value

    def _fetch(self, questions: list[Question], images_dir: Path, host: LoadedModel) -> _Fetched:
        start = time.perf_counter()
        images = [self._load(q, images_dir) for q in questions]
        usable = [(q, image) for q, image in zip(questions, images) if not isinstance(image, Exception)]
        fetched = _Fetched(images)
        if usable:
            try:
                fetched.ready = self._prepare([q for q, _ in usable], [image for _, image in usable], host)
            except Exception as error:  # recorded by _compute, which splits the batch to find the culprit
                fetched.ready = error
        if self.timings is not None:
            self.timings.prepare += time.perf_counter() - start
        return fetched

    @staticmethod
    def _load(question: Question, images_dir: Path):
        try:
            return load_image(resolve_image_path(images_dir, question.image_id))
        except (ImageLoadError, ValueError, OSError) as error:
            return error

    def _prepare(self, questions: list[Question], images: list, host: LoadedModel) -> _Ready:
        """The batch built by `host` (the model on the CPU, with a processor this thread may use)."""
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
        if self._pin:  # page-locked, so that the copy to the GPU is asynchronous
            batch = _map_tensors(batch, torch.Tensor.pin_memory)
        return _Ready(batch, positions)

    # -- running the model ------------------------------------------------------------------------
    def _compute(self, questions: list[Question], fetched: _Fetched) -> list[SampleResult]:
        """A planned batch's results: samples whose image failed to load are recorded failed, the rest run."""
        results: list[SampleResult | None] = [None] * len(questions)
        usable = []
        for k, (q, image) in enumerate(zip(questions, fetched.images)):
            if isinstance(image, Exception):
                results[k] = SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, f"image: {image}")
            else:
                usable.append(k)
        if usable:
            ran = self._run_isolating_failures(
                [questions[k] for k in usable], [fetched.images[k] for k in usable], fetched.ready
            )
            for k, result in zip(usable, ran):
                results[k] = result
        return results

    def _run_isolating_failures(self, questions: list[Question], images: list, ready=None) -> list[SampleResult]:
        """Run a batch; if it raises, split it until the failing sample stands alone and record it."""
        try:
            if ready is None:
                ready = self._prepare(questions, images, self._host)
            if isinstance(ready, Exception):
                raise ready
            return self._execute(questions, ready)
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

    def _execute(self, questions: list[Question], ready: _Ready) -> list[SampleResult]:
        start = time.perf_counter()
        device = self.loaded.device
        batch = _map_tensors(ready.batch, lambda t: t.to(device, non_blocking=t.is_pinned()))
        positions = ready.positions
        self.capture.arm(
            positions.vision_padded,
            positions.query_padded,
            batch.attention_mask,
            self.settings.multimodal_representation,
            lambda projector_input: self.adapter.pool_projector_input(projector_input, batch),
        )
        if self._prefill_clock:
            self._prefill_clock.start()
        answers = self.adapter.generate(self.loaded, batch, self.settings.max_new_tokens, self.min_new_tokens)
        vectors = self.capture.collect()
        if self.timings is not None:
            self._count(start, positions, batch)
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

    def _count(self, start: float, positions: Positions, batch: Batch) -> None:
        end = time.perf_counter()
        prefill_end = self._prefill_clock.prefill_end or end
        t = self.timings
        t.prefill += prefill_end - start
        t.decode += end - prefill_end
        t.batches += 1
        t.prompt_tokens += sum(positions.num_prompt_tokens)
        t.padded_tokens += batch.input_ids.numel()
