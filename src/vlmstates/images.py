"""Images of a VQA dataset: an ``image_id`` resolved to its file, and the file decoded to RGB.

Validation (:mod:`vlmstates.dataset`) checks every image with these; extraction and ``predict`` load
each sample's image with them at run time, so both read an image the same way.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps

from vlmstates.errors import VlmstatesError

#: Lower-case file extensions (with the dot, as ``Path.suffix`` gives them).
SUPPORTED_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)
#: PIL format names accepted for image content (MPO = multi-picture JPEG from cameras).
SUPPORTED_IMAGE_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF"})


class ImagePathError(VlmstatesError, ValueError):
    """An ``image_id`` does not name a usable image file; ``kind`` says why.

    Also a ``ValueError``, so callers catching ``(ImageLoadError, ValueError)`` per
    sample handle it too; validation reports it as a problem of the row (``kind``).
    """

    def __init__(self, message: str, *, kind: str, image_id: str = "", path: Path | None = None):
        super().__init__(message)
        self.kind = kind
        self.image_id = image_id
        self.path = path


class ImageLoadError(ValueError):
    """An image file exists but cannot be decoded into an RGB image."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image '{self.path}': {reason}")


def _split_parts(image_id: str) -> list[str]:
    return [p for p in image_id.replace("\\", "/").split("/")]


def _is_absolute_id(image_id: str) -> bool:
    return (
        PurePosixPath(image_id).is_absolute()
        or PureWindowsPath(image_id).is_absolute()
        or image_id.startswith(("/", "\\"))
        or bool(PureWindowsPath(image_id).drive)
    )


def resolve_image_path(images_dir: os.PathLike | str, image_id: str) -> Path:
    """Return the image file for ``image_id`` inside ``images_dir``.

    ``image_id`` is a path relative to ``images_dir`` (subfolders allowed).  When the
    path does not exist and has no supported extension, ``image_id + ext`` is tried for
    each supported extension (lower and upper case).  Raises :class:`ImagePathError`
    with ``kind`` one of ``empty_image_id``,
    ``path_traversal``, ``missing_image``, ``not_a_file``, ``ambiguous_image``,
    ``unsupported_format``.  The returned path is ``images_dir / image_id[+ext]``
    (symlinks not resolved); its real location is guaranteed to lie inside
    ``images_dir``.
    """
    images_dir = Path(images_dir)
    if not image_id or not image_id.strip():
        raise ImagePathError("image_id is empty", kind="empty_image_id", image_id=image_id)
    if _is_absolute_id(image_id):
        raise ImagePathError(
            f"image_id '{image_id}' is an absolute path; image ids must be relative to "
            f"the images folder '{images_dir}'",
            kind="path_traversal",
            image_id=image_id,
        )
    if ".." in _split_parts(image_id):
        raise ImagePathError(
            f"image_id '{image_id}' contains '..'; image ids must stay inside the images folder '{images_dir}'",
            kind="path_traversal",
            image_id=image_id,
        )

    candidate = images_dir / image_id
    if not candidate.exists() and candidate.suffix.lower() not in SUPPORTED_IMAGE_EXTENSIONS:
        found: list[Path] = []
        seen: set[tuple[int, int]] = set()
        for ext in SUPPORTED_IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = candidate.parent / (candidate.name + e)
                if p.is_file():
                    st = p.stat()
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        found.append(p)
        if len(found) > 1:
            raise ImagePathError(
                f"image_id '{image_id}' has no extension and matches several files in "
                f"'{images_dir}': " + ", ".join(p.name for p in found),
                kind="ambiguous_image",
                image_id=image_id,
            )
        if found:
            candidate = found[0]

    if not candidate.exists():
        if candidate.is_symlink():
            raise ImagePathError(
                f"image '{image_id}' is a broken symbolic link in '{images_dir}'",
                kind="missing_image",
                image_id=image_id,
                path=candidate,
            )
        raise ImagePathError(
            f"image '{image_id}' not found in images folder '{images_dir}'",
            kind="missing_image",
            image_id=image_id,
            path=candidate,
        )

    try:
        root = images_dir.resolve(strict=True)
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # symlink loop etc.
        raise ImagePathError(
            f"cannot resolve image '{image_id}': {exc}", kind="missing_image", image_id=image_id, path=candidate
        ) from None
    if not real.is_relative_to(root):
        raise ImagePathError(
            f"image_id '{image_id}' resolves to '{real}', outside the images folder '{root}' (symbolic link?)",
            kind="path_traversal",
            image_id=image_id,
            path=candidate,
        )
    if real.is_dir():
        raise ImagePathError(
            f"image_id '{image_id}' names a directory, not an image file",
            kind="not_a_file",
            image_id=image_id,
            path=candidate,
        )
    if not real.is_file():
        raise ImagePathError(
            f"image_id '{image_id}' is not a regular file", kind="not_a_file", image_id=image_id, path=candidate
        )
    if candidate.suffix.lower() not in SUPPORTED_IMAGE_EXTENSIONS:
        raise ImagePathError(
            f"image '{image_id}' has unsupported extension '{candidate.suffix or '(none)'}'; "
            f"supported: {', '.join(SUPPORTED_IMAGE_EXTENSIONS)}",
            kind="unsupported_format",
            image_id=image_id,
            path=candidate,
        )
    return candidate


def _sixteen_bit_to_8(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.int64)
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            lo, hi = float(arr.min()), float(arr.max())
            arr8 = np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        else:
            arr8 = _sixteen_bit_to_8(arr)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            arr8 = np.round(arr * 255.0)
        elif hi > lo:
            arr8 = np.round((arr - lo) * (255.0 / (hi - lo)))
        else:
            arr8 = np.zeros_like(arr)
        return Image.fromarray(arr8.astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def open_rgb(path: Path) -> tuple[Image.Image, str | None]:
    """The decoded RGB image (as `load_image`) and the file's PIL format, which validation checks."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except OSError as exc:
        raise ImageLoadError(path, f"cannot stat file: {exc}") from None
    if path.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file")
    if size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    try:
        with Image.open(path) as src:
            fmt = src.format
            if getattr(src, "n_frames", 1) > 1:
                src.seek(0)
            src.load()
            try:
                img = ImageOps.exif_transpose(src)
            except Exception:  # corrupt EXIF block: use the pixels as stored
                img = src.copy()
            rgb = _to_rgb(img)
            if rgb is src:
                rgb = src.copy()
            rgb.load()
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError(path, "out of memory while decoding") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = str(exc) or type(exc).__name__
        raise ImageLoadError(path, f"{type(exc).__name__}: {reason}") from exc
    if rgb.mode != "RGB":  # defensive; _to_rgb always converts
        raise ImageLoadError(path, f"could not convert mode {rgb.mode} to RGB")
    return rgb, fmt


def load_image(path: os.PathLike | str) -> Image.Image:
    """Open ``path`` as a fully loaded RGB image (independent of the file).

    EXIF orientation is applied; CMYK/YCbCr/grayscale are converted; 16-bit images are
    scaled to 8 bit (65535 -> 255); transparency (RGBA, LA, palette/tRNS) is composited
    onto white; animated images give their first frame.  Raises :class:`ImageLoadError`.
    """
    return open_rgb(Path(path))[0]
