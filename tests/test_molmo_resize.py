"""Molmo's real preprocessing resizes every crop through tensorflow (`resize_and_pad` in the checkpoint's
preprocessing code: uint8 to float in [0, 1], antialiased bilinear resize, clip), and tensorflow-cpu is pinned
in envs/molmo.yaml beside numpy and h5py versions it must accept. This runs that recipe under those pins and
checks it against torch's antialiased bilinear resize, an independent implementation of the same filter.

tensorflow is in the Molmo environment only (.ci/molmo-env.sh runs this file there); the main environment
has no tensorflow, so there the module is skipped with that reason."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorflow's start-up banner, not an error
tf = pytest.importorskip("tensorflow", reason="tensorflow is in envs/molmo.yaml only (bash .ci/molmo-env.sh)")
torch = pytest.importorskip("torch")


def molmo_style_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The recipe of Molmo's resize step (its facts, not its code): float conversion, antialiased
    bilinear resize, clipping to [0, 1]."""
    as_float = tf.image.convert_image_dtype(tf.constant(image), dtype=tf.float32)
    resized = tf.image.resize(as_float, [height, width], method=tf.image.ResizeMethod.BILINEAR, antialias=True)
    return tf.clip_by_value(resized, 0.0, 1.0).numpy()


def torch_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    resized = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0).clamp(0, 1).numpy()


def test_the_pinned_tensorflow_loads_beside_the_pinned_numpy_and_h5py():
    import h5py

    pins = {}
    for line in open(os.path.join(os.path.dirname(__file__), "..", "envs", "molmo.yaml"), encoding="utf-8"):
        name, _, version = line.strip().removeprefix("- ").partition("==")
        if version:
            pins[name] = version
    assert (tf.__version__, np.__version__, h5py.__version__) == (pins["tensorflow-cpu"], pins["numpy"], pins["h5py"])


@pytest.mark.parametrize("size", [(48, 64), (30, 50), (336, 448)], ids=["halve", "uneven-down", "up"])
def test_molmo_resize_through_tensorflow_equals_an_independent_antialiased_bilinear(size):
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    ours = molmo_style_resize(image, *size)
    assert ours.shape == (*size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_resize(image, *size), atol=2e-5)
