"""Preparing batches on the host: a batch's images decoded and the processor run on them, on the CPU.

The engine (vlmstates.extraction.engine.BatchPreparer) runs this in line, in one background thread, or in
worker processes (`PreprocessWorkers`), each with its own copy of the processor, so that preprocessing
scales with the job's cores. The job's process has CUDA initialised, after which a forked child is unsafe,
so workers are forked by a 'forkserver' (a fresh process that has imported this module and never touched
CUDA; later pools of the same job start at once), or started with 'spawn' where there is no forkserver.
What crosses to a worker once is a `WorkerSetup` (the processor, the model's config and the adapter's
state, pickled: no weights, and the job's environment); per batch, the questions go there and a `Fetched`
comes back, its tensors through shared memory (torch's pickling of tensors).
"""

from __future__ import annotations

import copyreg
import multiprocessing
import os
import pickle
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmstates.dataset import Question
from vlmstates.errors import VlmstatesError
from vlmstates.extraction.adapters import adapter_for_family
from vlmstates.extraction.adapters.base import Batch, LoadedModel
from vlmstates.extraction.paper_positions import paper_vision_positions
from vlmstates.extraction.positions import Positions
from vlmstates.failpoints import failpoint
from vlmstates.images import ImageLoadError, load_image, resolve_image_path
from vlmstates.settings import ConfigError


class PreprocessWorkerError(VlmstatesError, RuntimeError):
    """A preprocessing worker process could not start or ended unexpectedly (e.g. killed for memory)."""


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


# -- one batch, on the CPU ------------------------------------------------------------------------------
def fetch_batch(host: LoadedModel, questions: list[Question], images_dir: Path, prompt_limit: int | None) -> Fetched:
    """Load the batch's images and prepare the loaded ones; a failure is recorded, not raised."""
    loads = [_load(q, images_dir) for q in questions]
    fetched = Fetched([image for image, _ in loads], [error for _, error in loads])
    usable = [(q, image) for q, (image, _) in zip(questions, loads) if image is not None]
    if usable:
        try:
            fetched.prepared = prepare_batch(host, [q for q, _ in usable], [image for _, image in usable], prompt_limit)
        except Exception as error:  # recorded by the engine, which splits the batch to find the culprit
            fetched.error = error
    return fetched


def _load(question: Question, images_dir: Path) -> tuple[Image.Image | None, Exception | None]:
    try:
        return load_image(resolve_image_path(images_dir, question.image_id)), None
    except (ImageLoadError, ValueError, OSError) as error:
        return None, error


def prepare_batch(host: LoadedModel, questions: list[Question], images: list, prompt_limit: int | None) -> Prepared:
    """The batch on the CPU (not pinned); `prompt_limit`: the model's longest prompt (None: no limit)."""
    adapter, settings = host.adapter, host.settings
    if len(questions) > 1 and len({adapter.batch_group(host, *image.size) for image in images}) > 1:
        # the plan grouped by file headers; should decoding disagree, the split runs them apart
        raise ValueError("the batch's decoded images fall into different batch groups")
    texts = [settings.format_prompt(q.question) for q in questions]
    batch = adapter.build_batch(host, texts, images)
    positions = adapter.find_positions(host, batch)
    too_long = [n for n in positions.num_prompt_tokens if prompt_limit and n > prompt_limit]
    if too_long:
        raise ValueError(f"prompt of {too_long[0]} tokens exceeds the model's {prompt_limit}")
    paper = paper_vision_positions(adapter.family, positions, batch.inputs) if settings.paper_positions else None
    return Prepared(batch, positions, paper)


# -- worker processes -----------------------------------------------------------------------------------
@dataclass
class ConfigOnly:
    """The model as a worker process holds it: its config, without weights. Preparing a batch reads
    nothing else of the model (image token ids, the vision config's geometry)."""

    config: object


@dataclass(frozen=True)
class WorkerSetup:
    """What each worker process is started with (pickled once per worker)."""

    family: str
    settings: object  # ModelSettings
    dtype: torch.dtype
    attn_implementation: str
    prompt_limit: int | None
    #: pickle of (processor, model config, adapter state); a trust_remote_code processor's class is imported
    #: from transformers' remote-code modules, on the sys.path that a worker gets from the job's process
    payload: bytes
    #: the job's environment as the pool starts (a forkserver keeps the one it started with)
    environment: dict


#: the worker process's model stand-in and prompt limit, set once by `_start_worker`
_worker: tuple[LoadedModel, int | None] | None = None


def _start_worker(setup: WorkerSetup) -> None:
    global _worker
    # Ctrl-C and SIGTERM (SLURM's scancel) reach the job's whole process group; the job's process handles
    # them (saves its progress) and then stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(setup.environment)
    torch.set_num_threads(1)  # one core per worker: the job's cores are shared out as processes
    processor, config, adapter_state = pickle.loads(setup.payload)
    adapter = adapter_for_family(setup.family)
    adapter.__dict__.update(adapter_state)  # e.g. Molmo's token ids read off the processor at load
    host = LoadedModel(
        ConfigOnly(config),
        processor,
        adapter,
        setup.settings,
        torch.device("cpu"),
        setup.dtype,
        setup.attn_implementation,
    )
    _worker = (host, setup.prompt_limit)


def _fetch_in_worker(questions: list[Question], images_dir: Path) -> Fetched:
    failpoint("preprocess-worker")
    host, prompt_limit = _worker
    fetched = fetch_batch(host, questions, images_dir, prompt_limit)
    fetched.error = _picklable(fetched.error)
    fetched.image_errors = [_picklable(error) for error in fetched.image_errors]
    return fetched


def _picklable(error: Exception | None) -> Exception | None:
    """`error` as it can cross back to the job's process: with its type and message, which the engine records.
    An error whose __init__ takes other arguments than its message (e.g. vlmstates.images' errors) is rebuilt
    from its args; one that still cannot cross becomes a RuntimeError naming its type."""
    if error is None or _crosses(error):
        return error
    copyreg.pickle(type(error), _reduce_error)
    if _crosses(error):
        return error
    return RuntimeError(f"{type(error).__name__}: {error}")


def _crosses(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


def _reduce_error(error: Exception):
    return _rebuild_error, (type(error), error.args, dict(vars(error)))


def _rebuild_error(cls: type, args: tuple, state: dict) -> Exception:
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    return error


def start_server(loaded: LoadedModel) -> None:
    """Start the forkserver now (it imports torch and the processor's code in the background), so that the
    workers, started once the batches are planned, fork from it at once."""
    context = _context(_modules_of(loaded.processor, loaded.model.config))
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _context(modules: list[str]) -> multiprocessing.context.BaseContext:
    """The forkserver, which imports this module and `modules` once (when it starts: the job's first pool),
    so that a worker starts without importing torch and the processor's code again; else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *modules])  # one the server cannot import is left to the workers
    return context


def _modules_of(processor, config) -> list[str]:
    """The modules of a processor and its parts (image processor, tokenizer, ...) and of the model's config."""
    parts = [processor, config, *(value for value in vars(processor).values() if hasattr(value, "__module__"))]
    return sorted({type(part).__module__ for part in parts} - {"builtins"})


class PreprocessWorkers:
    """`count` worker processes preparing batches; `submit` returns a future, `result` its Fetched."""

    def __init__(self, loaded: LoadedModel, count: int, prompt_limit: int | None):
        try:
            payload = pickle.dumps((loaded.processor, loaded.model.config, dict(loaded.adapter.__dict__)))
        except Exception as error:
            raise ConfigError(  # the same on a retry
                f"models.{loaded.settings.name}: the processor cannot be sent to preprocessing worker processes "
                f"({type(error).__name__}: {error}); set extraction.preprocess_workers: 0 to prepare batches in "
                "the job's own process"
            ) from error
        setup = WorkerSetup(
            loaded.adapter.family,
            loaded.settings,
            loaded.dtype,
            loaded.attn_implementation,
            prompt_limit,
            payload,
            dict(os.environ),
        )
        self.count = count
        self._pool = ProcessPoolExecutor(
            count,
            mp_context=_context(_modules_of(loaded.processor, loaded.model.config)),
            initializer=_start_worker,
            initargs=(setup,),
        )

    def submit(self, questions: list[Question], images_dir: Path) -> Future:
        return self._pool.submit(_fetch_in_worker, questions, images_dir)

    def result(self, future: Future) -> Fetched:
        try:
            return future.result()
        except BrokenProcessPool as error:
            raise PreprocessWorkerError(
                "a preprocessing worker process ended unexpectedly (killed, e.g. for host memory, or it failed "
                "to start: see its traceback above in the log); the job stops. Fewer workers "
                "(extraction.preprocess_workers) need less host memory; 0 prepares batches in the job's process"
            ) from error

    def close(self) -> None:
        """Stop the workers; batches not yet started are dropped (an interrupted or failed job)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
