"""Tiny, randomly initialised checkpoints of real vision-language architectures.

``build_tiny_checkpoint(family, out_dir)`` writes a folder that loads exactly
like a Hugging Face hub checkpoint of that family::

    processor = transformers.AutoProcessor.from_pretrained(out_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out_dir)

The models use the real transformers classes, with a few dozen kilobytes of
fp32 weights, a locally trained byte-level BPE tokenizer carrying the model's
real special tokens, and a chat template modelled on the real one.  They are
meant for tests and for dry runs of the workflow: the outputs are meaningless,
but every shape, module path, special token and processor step is the real one.

Each family lives in a module exposing ``build(out_dir: Path, seed: int) -> Path`` (or another builder
function of that signature, named after a colon); the modules are imported only when used.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "TINY_FAMILIES",
    "tiny_builder",
    "build_tiny_checkpoint",
    "atomic_output_dir",
    "seeded_model",
    "generation_config",
    "save_checkpoint",
]

#: family name -> module (relative to this package) exposing ``build(out_dir, seed)``, or "module:function".
#: Add a family by adding a builder and an entry here.
_FAMILY_MODULES: dict[str, str] = {
    "qwen2_5_vl": ".qwen2_5_vl",
    "gemma3": ".gemma3",
    "phi4_multimodal": ".phi4_multimodal",
    "llava_next": ".llava:build_llava_next",
    "llava": ".llava:build_llava",
    "smolvlm": ".smolvlm",
    "qwen2_vl": ".qwen2_vl",
    "llava_onevision": ".llava_onevision",
    "aya_vision": ".aya_vision",
    "internvl": ".internvl",
    "qwen3_vl": ".qwen3_vl",
    "glm4v": ".glm4v",
    "mistral3": ".mistral3",
    "molmo2": ".molmo2",
    "mllama": ".mllama",
    "fast_vlm": ".fast_vlm",
    "gemma3n": ".gemma3n",
    "idefics3": ".idefics3",
    "paligemma": ".paligemma",
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILY_MODULES)


def tiny_builder(family: str) -> Callable[[Path, int], Path]:
    """The function that builds ``family``'s tiny checkpoint, as its row above names it (module imported now)."""
    module_name = _FAMILY_MODULES.get(family)
    if module_name is None:
        raise ValueError(f"unknown tiny checkpoint family {family!r}; known families: {', '.join(TINY_FAMILIES)}")
    module_name, _, function = module_name.partition(":")
    return getattr(importlib.import_module(module_name, __name__), function or "build")


def build_tiny_checkpoint(family: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build the tiny checkpoint of ``family`` into ``out_dir`` and return its path.

    An existing ``out_dir`` is replaced.  The same ``family`` and ``seed`` give
    the same weights and the same tokenizer.
    """
    return tiny_builder(family)(Path(out_dir), int(seed))


def seeded_model(model_class, config, seed: int):
    """``model_class(config)`` in fp32 eval mode, initialised from ``seed`` without touching the global RNG."""
    import torch

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return model_class(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(generator_state)


def generation_config(bos_token_id: int, pad_token_id: int, eos_token_ids: list[int], **settings):
    """The generation_config.json of a real checkpoint: its special token ids, and ``settings``, the other
    fields its authors set (e.g. Qwen2.5-VL's repetition_penalty)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=bos_token_id, pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids), **settings
    )


def save_checkpoint(model, processor, out_dir: Path, extra=None) -> Path:
    """Save model and processor into ``out_dir`` atomically; ``extra(folder)`` writes more files last."""
    with atomic_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir``; on success move it into place.

    Writers fill the yielded folder; when the block exits without an error the
    folder is renamed to ``out_dir`` (an existing ``out_dir`` is replaced).  If
    the block raises, or the process is killed, ``out_dir`` is never left half
    written: at worst a hidden ``.<name>.tmp-*`` sibling remains.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _apply_umask_permissions(tmp)  # mkdtemp and some writers create 0700/0600 entries
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions of a plain mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
