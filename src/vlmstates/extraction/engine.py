"""The extraction engine: one batched generate() per batch captures the vectors and produces the answers.

Batches are planned by vlmstates.extraction.batching (by estimated prompt length, before any pixel is decoded).
While the model runs one batch, worker processes (or one background thread) decode the images of the next
ones and run the processor on them (vlmstates.extraction.preparing).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from vlmstates import __version__, store
from vlmstates.dataset import Question
from vlmstates.errors import DeviceFailed, OutOfDeviceMemory, VlmstatesError
from vlmstates.extraction import batching
from vlmstates.extraction.adapters import adapter_for_family, family_of_model_type
from vlmstates.extraction.adapters.base import Batch, LoadedModel, check_decoding
from vlmstates.extraction.attention import attention_implementations, choose_attention
from vlmstates.extraction.batch_size_record import BatchSizeRecord
from vlmstates.extraction.capture import PrefillCapture, PrefillDone
from vlmstates.extraction.hooks import forward_hooks
from vlmstates.extraction.image_budget import check_image_budget, effective_image_budget
from vlmstates.extraction.paper_positions import check_paper_positions, in_padded_batch
from vlmstates.extraction.preparing import (
    Fetched,
    Prepared,
    PreprocessWorkers,
    fetch_batch,
    prepare_batch,
    start_server,
)
from vlmstates.failpoints import failpoint, oom_above_rows
from vlmstates.settings import AUTO_BATCH_SIZE, ModelSettings, check_generation_fields, model_type_of, recorded_layers
from vlmstates.store import (
    MULTIMODAL,
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


#: The CUDA caching allocator's setting when the user chose none: segments that grow in place instead of a
#: new block for each new tensor size. Batches of varying prompt length and answers of varying length
#: otherwise leave reserved-but-unusable gaps, and a batch size the search found to fit runs out of memory
#: later in the shard (PyTorch's own out-of-memory message suggests this setting).
EXPANDABLE_SEGMENTS = "expandable_segments:True"
#: Where torch reads the allocator's settings; the first is read by every torch this project supports.
ALLOCATOR_SETTINGS_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def configure_cuda_allocator(environ: MutableMapping[str, str] = os.environ) -> str:
    """Give the CUDA allocator expandable segments unless the user set its settings; returns what holds.

    torch reads the variable once, when CUDA is first initialised: a process that already used CUDA keeps
    what it had (a warning says how to set it). ROCm's allocator is left alone."""
    for name in ALLOCATOR_SETTINGS_VARIABLES:
        if environ.get(name):
            return f"{name}={environ[name]} (from the environment)"
    if torch.version.hip is not None:
        return "torch's default (ROCm)"
    if torch.cuda.is_initialized():
        log.warning(
            "CUDA was initialised before the model load, so its allocator keeps torch's default; set "
            "%s=%s before starting Python to avoid fragmentation",
            ALLOCATOR_SETTINGS_VARIABLES[0],
            EXPANDABLE_SEGMENTS,
        )
        return "torch's default (CUDA already initialised)"
    environ[ALLOCATOR_SETTINGS_VARIABLES[0]] = EXPANDABLE_SEGMENTS
    return f"{ALLOCATOR_SETTINGS_VARIABLES[0]}={EXPANDABLE_SEGMENTS} (set by vlmstates)"


def select_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]


def machine_attributes(device: torch.device) -> dict[str, str]:
    """The device's name and torch's CUDA and cuDNN versions ("" where there is no CUDA)."""
    on_cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if on_cuda and torch.backends.cudnn.is_available() else None
    return {
        store.DEVICE_NAME_ATTR: torch.cuda.get_device_name(device)
        if on_cuda
        else f"{device.type} ({platform.machine()})",
        store.CUDA_VERSION_ATTR: (torch.version.cuda or "") if on_cuda else "",
        store.CUDNN_VERSION_ATTR: str(cudnn or ""),
    }


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
    adapter = adapter_for_family(family)
    check_decoding(adapter, settings)
    if device.type == "cuda":  # before the weights arrive: torch reads the allocator's settings once
        log.info("CUDA allocator: %s", configure_cuda_allocator())
    log.info("loading model %s (%s) onto %s", settings.model, family, device)
    started = time.monotonic()
    loaded = adapter.load(settings, device, dtype, attention)
    log.info("model %s loaded in %.1f s", settings.model, time.monotonic() - started)
    return loaded


# -- preparing batches on the host, ahead of the model ----------------------------------------------
#: What `Extractor(stage_timer=...)` calls around each stage of a batch: `stage_timer(stage, prepared)`
#: returns a context manager held for the stage's duration, left without an exception when the stage
#: completes. "prepare": a batch's images loaded and preprocessed (in the prefetch thread when prefetching; not
#: timed when worker processes prepare batches);
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
    """Loads a batch's images and runs the processor on them, on the host, ahead of the model: in `workers`
    worker processes (vlmstates.extraction.preparing), else `prefetch` batches ahead in a background thread
    (0: in line). Batches are pinned here, in the job's process. The engine copies them to the device itself."""

    def __init__(self, loaded: LoadedModel, prefetch: int, stage_timer: StageTimer, workers: int = 0):
        self.loaded, self.adapter, self.settings = loaded, loaded.adapter, loaded.settings
        self.prefetch, self.workers, self.timed = prefetch, workers, stage_timer
        self.prompt_limit = self.adapter.max_prompt_tokens(loaded.model)
        # The prefetch thread has its own processor: a fast tokenizer is not safe to share between threads
        # (its __call__ reconfigures padding in place; the main thread decodes the answers meanwhile).
        self.host = replace(loaded, device=torch.device("cpu"))
        if workers > 0:
            start_server(loaded)  # its imports overlap the batch planning
        threaded = prefetch > 0 and workers <= 0
        self._prefetch_host = replace(self.host, processor=copy.deepcopy(loaded.processor)) if threaded else None
        self._pin = loaded.device.type == "cuda"

    def ahead(self, batches: list[list[int]], questions, images_dir: Path) -> Iterator[tuple[list[int], Fetched]]:
        """The batches with their images loaded and preprocessed, in order."""
        if self.workers > 0:
            yield from self._from_workers(batches, questions, images_dir)
            return

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

    def _from_workers(
        self, batches: list[list[int]], questions, images_dir: Path
    ) -> Iterator[tuple[list[int], Fetched]]:
        """The worker processes' batches, in order; each worker has a batch in hand, at least `prefetch` are
        ahead (the "prepare" stage runs in the workers, untimed here; "wait" is the model waiting)."""
        if not batches:
            return
        workers = PreprocessWorkers(self.loaded, self.workers, self.prompt_limit)
        in_flight = max(self.workers, self.prefetch)
        try:
            queue: deque[tuple[list[int], Future]] = deque()
            for indices in batches:
                queue.append((indices, workers.submit([questions[i] for i in indices], images_dir)))
                if len(queue) > in_flight:
                    yield self._next_from(workers, queue)
            while queue:
                yield self._next_from(workers, queue)
        finally:
            workers.close()

    def _next_from(self, workers: PreprocessWorkers, queue: deque) -> tuple[list[int], Fetched]:
        indices, future = queue.popleft()
        with self.timed("wait", None):
            fetched = workers.result(future)
            fetched.prepared = self._pinned(fetched.prepared)
        return indices, fetched

    def fetch(self, questions: list[Question], images_dir: Path, host: LoadedModel) -> Fetched:
        """`host`: the model on the CPU, with a processor the calling thread may use."""
        with self.timed("prepare", None):
            fetched = fetch_batch(host, questions, images_dir, self.prompt_limit)
            fetched.prepared = self._pinned(fetched.prepared)
        return fetched

    def prepare(self, questions: list[Question], images: list, host: LoadedModel) -> Prepared:
        return self._pinned(prepare_batch(host, questions, images, self.prompt_limit))

    def _pinned(self, prepared: Prepared | None) -> Prepared | None:
        if prepared is None or not self._pin:
            return prepared
        # page-locked, so that the copy to the GPU is asynchronous
        return replace(prepared, batch=_map_tensors(prepared.batch, torch.Tensor.pin_memory))


# -- failed attempts -------------------------------------------------------------------------------
#: What made an attempt at a batch fail: a sample's own fault (split the batch to find it), running out of
#: device memory, a CUDA error after which every CUDA call of the process fails (device-side assert,
#: illegal memory access), or torch.compile failing on the decoding step (`decoding: static_compiled`). The
#: middle two are nobody's fault and end the job (errors.RestartJob); the last fails every batch alike and
#: ends it as a refusal (CompileFailed).
SAMPLE_FAULT, OUT_OF_MEMORY, DEVICE_ERROR, COMPILE_ERROR = "sample", "out of memory", "device", "compile"


class CompileFailed(VlmstatesError, RuntimeError):
    """torch.compile of the decoding step failed: every batch would fail the same way, and a retry too."""

    def __init__(self, model: str, error: str):
        super().__init__(
            f"models.{model}.decoding: static_compiled: torch.compile failed ({error}); the samples done so far "
            f"are saved. Set decoding to static or dynamic (on the CPU, compiling needs a C compiler)"
        )


@dataclass(frozen=True)
class AttemptFailed:
    """Why an attempt at a batch failed, as text. The exception itself is not kept: its traceback holds the
    attempt's frames, and with them its device tensors (inputs, activations, the KV cache)."""

    error: str
    kind: str = SAMPLE_FAULT


def failure_kind(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8 raises CUDA errors as this
    if isinstance(error, accelerator_error) or (isinstance(error, RuntimeError) and "CUDA error" in str(error)):
        return DEVICE_ERROR
    if isinstance(error, torch._dynamo.exc.TorchDynamoException):  # also inductor's (InductorError)
        return COMPILE_ERROR
    return SAMPLE_FAULT


def free_device_memory() -> None:
    """Return a failed attempt's memory: collect what only reference cycles still hold, then hand the
    allocator's cached blocks back, so that the retry starts from an unfragmented pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_failpoint(blocks: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager[None]:
    """`VLMSTATES_FAILPOINT=oom_above:<n>`: the first decoder block raises torch.OutOfMemoryError after its
    forward whenever the batch has more than n rows (its activations then exist, as in a real one)."""
    rows = oom_above_rows()
    if rows is None:
        return contextlib.nullcontext()

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] > rows:
            raise torch.OutOfMemoryError(f"failpoint oom_above:{rows}: a forward of {hidden.shape[0]} rows")

    return forward_hooks(after=[(blocks[0], hook)])


# -- the engine ---------------------------------------------------------------------------------------
class Extractor:
    """A loaded model with its hooks; turns questions into `SampleResult`s in the order given.

    `batch_size` overrides the settings' (an int or "auto"); `preprocess_workers` worker processes decode
    and preprocess batches ahead (`prefetch` or more); without workers, `prefetch` batches are prepared
    ahead in a background thread (0: in line); `min_new_tokens` fixes the answer length
    (benchmarks); `stage_timer` is called around each stage of a batch (`StageTimer`, benchmarks).
    `batch_size_record`: the file of the batch sizes found (vlmstates.extraction.batch_size_record), read and
    written where the settings say `batch_size: auto` and the device is searched (CUDA): a size recorded for
    this GPU and settings is used without searching, a size found is recorded, and a batch that runs out of
    memory lowers the record (also when a retry runs at a size set from an earlier attempt's).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        progress: bool = True,
        batch_size: int | str | None = None,
        prefetch: int = PREFETCH_BATCHES,
        min_new_tokens: int = 0,
        stage_timer: StageTimer = untimed,
        preprocess_workers: int = 0,
        batch_size_record: Path | None = None,
    ):
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.settings = loaded.settings
        self.batch_size_setting = self._capped(batch_size or loaded.settings.batch_size)
        self.batch_size = self.batch_size_setting  # the size the last extract() ran at (auto before the first)
        self.batch_size_record = self._batch_size_record(batch_size_record)
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
        self.preparer = BatchPreparer(loaded, prefetch, stage_timer, preprocess_workers)

    def _capped(self, batch_size: int | str) -> int | str:
        cap = self.adapter.max_batch_size
        if cap is not None and (batch_size == AUTO_BATCH_SIZE or batch_size > cap):
            log.info("batch size %s capped at %d, the %s family's max_batch_size", batch_size, cap, self.adapter.family)
            return cap
        return batch_size

    def _batch_size_record(self, path: Path | None) -> BatchSizeRecord | None:
        """The record's entry for this model and GPU, where `auto` is configured and searched; a configured
        integer (or the family's cap) never reads or writes it."""
        searched = self.settings.batch_size == AUTO_BATCH_SIZE and self.adapter.max_batch_size is None
        if path is None or not searched or not batching.searches_batch_size(self.loaded.device):
            return None
        return BatchSizeRecord(path, self.loaded.device, self.settings)

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

    def _generation(self, full_length: bool = False) -> dict:
        """The generation arguments of each batch's generate() call (max_new_tokens, min_new_tokens,
        use_cache); `full_length`: every answer decoded to max_new_tokens (the batch-size search's probe).
        Prefill-only: at most one new token, so that generate() runs its prefill forward (the same one, with
        the same inputs, as when it answers), which the last recorded block's hook then ends; a bare forward
        would not build the inputs the way generate() does (e.g. the position ids of left-padded rows). It
        runs without a KV cache: nothing would read it."""
        if not self.settings.answers:
            return dict(max_new_tokens=1, min_new_tokens=0, use_cache=False)
        max_new = self.settings.max_new_tokens
        return dict(max_new_tokens=max_new, min_new_tokens=max_new if full_length else self.min_new_tokens)

    def _generate(self, batch: Batch, full_length: bool = False) -> list[str]:
        """The batch's answers from one generate() call whose prefill the hooks capture. Prefill-only: the
        same call, without a KV cache, ended by the last recorded block's hook (PrefillDone), so blocks past
        it, the LM head and the discarded token are never computed; the answers are empty."""
        if self.settings.answers:
            return self.adapter.generate(self.loaded, batch, **self._generation(full_length))
        with contextlib.suppress(PrefillDone):
            self.adapter.generate(self.loaded, batch, **self._generation())
        return [""] * batch.input_ids.shape[0]

    def _effective_generation(self) -> dict:
        """What each batch's generate() runs with, as _generate calls it (prefill-only: use_cache false)."""
        return self.adapter.effective_generation(self.loaded, **self._generation())

    def _image_budget(self) -> dict | None:
        return effective_image_budget(self.loaded.processor, self.adapter.family)

    def attributes(self) -> dict:
        import transformers

        s = self.settings
        return {
            store.MODEL_ATTR: s.model,
            store.REVISION_ATTR: s.revision or "",
            store.FAMILY_ATTR: self.adapter.family,
            store.SEMANTICS_ATTR: file_semantics(
                self.adapter.semantics, answered=s.answers, paper_positions=s.paper_positions
            ),
            store.LAYERS_ATTR: list(self.layers),
            store.NUM_DECODER_LAYERS_ATTR: self.num_layers,
            store.HIDDEN_SIZE_ATTR: self.adapter.hidden_size(self.loaded.model),
            store.VISION_HIDDEN_SIZE_ATTR: self.adapter.vision_hidden_size(self.loaded.model),
            store.IMAGE_TOKEN_ID_ATTR: self.image_token_id,
            store.DTYPE_ATTR: str(self.loaded.dtype).removeprefix("torch."),
            store.ANSWERS_ATTR: s.answers,
            store.MAX_NEW_TOKENS_ATTR: s.max_new_tokens if s.answers else 0,
            # what each batch's generate() runs with: the checkpoint's generation_config.json, the
            # config's `generation` over it, the engine's fixed fields
            store.GENERATION_CONFIG_ATTR: self._effective_generation(),
            store.PROMPT_TEMPLATE_ATTR: s.prompt,
            store.MULTIMODAL_ATTR: s.multimodal_representation,
            # only when on, so that the files of every other run keep exactly the attributes they had
            **({store.PAPER_POSITIONS_ATTR: True} if s.paper_positions else {}),
            # only for a family with a pixel budget: the processor's effective bounds
            **({store.IMAGE_BUDGET_ATTR: budget} if (budget := self._image_budget()) is not None else {}),
            store.TRUST_REMOTE_CODE_ATTR: s.trust_remote_code,
            store.DEVICE_ATTR: str(self.loaded.device),
            store.ATTN_IMPLEMENTATION_ATTR: self.loaded.attn_implementation,
            store.ATTENTION_IMPLEMENTATIONS_ATTR: attention_implementations(self.loaded.model),
            **machine_attributes(self.loaded.device),
            store.TRANSFORMERS_VERSION_ATTR: transformers.__version__,
            store.TORCH_VERSION_ATTR: str(torch.__version__),
            store.PYTHON_VERSION_ATTR: platform.python_version(),
            store.PACKAGE_VERSION_ATTR: __version__,
            store.CONFIG_HASH_ATTR: s.config_hash(),
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

        def probe(indices: list[int]) -> list[SampleResult] | None:
            """Run a batch as the batch-size search's memory probe: every answer decoded to max_new_tokens.
            A batch with a faulty sample is not run (None; the search stops at its size)."""
            batch_questions = [questions[i] for i in indices]
            fetched = self.preparer.fetch(batch_questions, images_dir, self.preparer.host)
            if fetched.prepared is None or any(fetched.image_errors):
                return None
            try:
                return self._execute(batch_questions, fetched.prepared, full_length=True)
            except Exception:
                self.capture.disarm()  # what a failed probe captured; the search drops the error itself
                raise

        blocks = self.adapter.decoder_blocks(self.loaded.model)
        with self.capture.installed(), oom_failpoint(blocks), torch.inference_mode():
            keys = batching.sort_keys(self.loaded, questions, images_dir)
            start = batching.auto_batch_start(sum(p.numel() for p in self.loaded.model.parameters()))
            # a later call (the job's next shard) keeps the size found; with a record it reads the record,
            # which checks the new questions' prompts against those the size was found for
            setting = self.batch_size_setting if self.batch_size_record is not None else self.batch_size
            plan = batching.plan(setting, self.loaded.device, keys, unfinished, probe, start, self.batch_size_record)
            self.batch_size = plan.batch_size
            # Prefill-only, the probe ran its batch as a normal run does (no answer to decode to full
            # length): its results are kept, not computed again. With answers they are full-length ones.
            kept = plan.probed if plan.probed is not None and not self.settings.answers else None
            todo = []
            for indices in plan.batches:
                done = [finished.get(questions[i].question_id) for i in indices]
                if all(done):
                    place(indices, done)
                elif kept is not None and indices == kept[0]:
                    record(indices, kept[1])
                else:
                    todo.append(indices)
            try:
                for indices, fetched in self.preparer.ahead(todo, questions, images_dir):
                    record(indices, self._compute([questions[i] for i in indices], fetched))
            except OutOfDeviceMemory as error:
                if self.batch_size_record is not None:  # so that the next job does not run out at it too
                    self.batch_size_record.ran_out_of_memory(error.batch_size, batching.longest_prompt(keys))
                raise
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
            error = None if fetched.error is None else f"{type(fetched.error).__name__}: {fetched.error}"
            ran = self._run_isolating_failures(
                [questions[k] for k in usable], [fetched.images[k] for k in usable], fetched.prepared, error
            )
            for k, result in zip(usable, ran):
                results[k] = result
        return results

    def _run_isolating_failures(
        self, questions: list[Question], images: list, prepared: Prepared | None = None, error: str | None = None
    ) -> list[SampleResult]:
        """Run a batch (`prepared`, else prepared here; `error`: why preparing it failed); if a sample is
        faulty, split the batch until it stands alone and record it failed.

        Out of device memory is no sample's fault and never a failed row: a lone sample is retried once
        after the failed attempt's memory is freed; a batch of several rows, or a lone sample that still
        does not fit, ends the job (OutOfDeviceMemory) for a retry with half the batch size, in a fresh
        process whose memory is not fragmented and whose every batch is planned at the smaller size. A CUDA
        error that poisons the process ends it too (DeviceFailed), and so does a failed torch.compile of the
        decoding step (CompileFailed), instead of failing every later sample."""
        outcome = AttemptFailed(error) if error is not None else self._attempt(questions, images, prepared)
        if isinstance(outcome, AttemptFailed) and outcome.kind == OUT_OF_MEMORY and len(questions) == 1:
            free_device_memory()
            log.warning("%s: out of device memory alone; retrying once after freeing", questions[0].question_id)
            outcome = self._attempt(questions, images, prepared)
        if not isinstance(outcome, AttemptFailed):
            return outcome
        if outcome.kind == OUT_OF_MEMORY:
            free_device_memory()
            raise OutOfDeviceMemory(len(questions), outcome.error)
        if outcome.kind == DEVICE_ERROR:
            raise DeviceFailed(outcome.error)
        if outcome.kind == COMPILE_ERROR:
            raise CompileFailed(self.settings.name, outcome.error)
        if len(questions) == 1:
            q = questions[0]
            return [SampleResult.failed(q.question_id, q.image_id, q.question, q.answer, outcome.error)]
        half = len(questions) // 2
        return self._run_isolating_failures(questions[:half], images[:half]) + self._run_isolating_failures(
            questions[half:], images[half:]
        )

    def _attempt(
        self, questions: list[Question], images: list, prepared: Prepared | None
    ) -> list[SampleResult] | AttemptFailed:
        """A batch's results, or why it failed. Only the error's text leaves here: once this returns, nothing
        refers to the failed attempt's frames, so its device tensors can be freed before any retry."""
        try:
            if prepared is None:
                prepared = self.preparer.prepare(questions, images, self.preparer.host)
            return self._execute(questions, prepared)
        except Exception as raised:  # any fault: a sample's, out of memory, the device's
            self.capture.disarm()  # what the failed prefill captured
            return AttemptFailed(f"{type(raised).__name__}: {raised}", failure_kind(raised))

    def _execute(self, questions: list[Question], prepared: Prepared, full_length: bool = False) -> list[SampleResult]:
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
                stop_after_last_layer=not self.settings.answers,
            )
            answers = self._generate(batch, full_length)
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
                paper_vision_token_position=paper[row] if paper is not None else None,
                batch_size=len(questions),
                vectors={key: value[row].numpy() for key, value in vectors.items()},
            )
            for row, q in enumerate(questions)
        ]
