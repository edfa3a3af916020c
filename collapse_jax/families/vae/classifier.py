"""A small CNN digit classifier, trained once on the real training images and cached on disk,
used to label generated digits (class distribution and class entropy per generation).

Architecture: Conv(16, 3x3, stride 2) + ReLU -> Conv(32, 3x3, stride 2) + ReLU -> Dense(64) +
ReLU -> Dense(10); cross-entropy, Adam 1e-3, batch 128, trained by the core engine
(:func:`collapse_jax.core.training.fit_epochs`). Two epochs on MNIST reach about 98% test
accuracy in well under a minute on two CPU cores. The cache file name is a hash of the
architecture, the training settings and the training images, so a different data set or setting
never reuses a stale classifier; an unreadable cache file is retrained and replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from collapse_jax.core.host_loop import Progress
from collapse_jax.core.runs import atomic_path
from collapse_jax.core.training import (
    FitState,
    fit_epochs,
    init_train_state,
    make_train_step,
    start_fit,
)
from collapse_jax.families.vae.data import ImageData, to_unit
from collapse_jax.families.vae.model import padded_chunks, torch_style_init

CACHE_ENV = "COLLAPSE_JAX_CACHE_DIR"
_VERSION = 2  # bump when the architecture or training recipe changes


class DigitCNN(nn.Module):
    @nn.compact
    def __call__(self, x: Float[Array, "b 28 28 1"]) -> Float[Array, "b 10"]:
        h = nn.relu(nn.Conv(16, (3, 3), (2, 2), padding="SAME")(x))
        h = nn.relu(nn.Conv(32, (3, 3), (2, 2), padding="SAME")(h))
        h = nn.relu(nn.Dense(64)(h.reshape(h.shape[0], -1)))
        return nn.Dense(10)(h)


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
    epochs: int = 2  # passes over the training images
    batch_size: int = 128  # minibatch size
    learning_rate: float = 1e-3  # Adam learning rate
    seed: int = 0  # initialisation and shuffling seed
    max_train: int = 0  # use at most this many training images (0 = all)


class Classifier(NamedTuple):
    params: Any
    test_accuracy: float  # accuracy on the real test split
    path: Path | None  # cache file, if cached
    cached: bool  # True when loaded from the cache


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$COLLAPSE_JAX_CACHE_DIR``, else ``~/.cache/collapse_jax``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collapse_jax"


def _fingerprint(data: ImageData, settings: ClassifierSettings) -> str:
    h = hashlib.sha256()
    h.update(repr((_VERSION, dataclasses.astuple(settings))).encode())
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


_MODEL = DigitCNN()


@jax.jit
def _logits(params, x):
    return _MODEL.apply({"params": params}, x)


def _init(key: jax.Array) -> Any:
    shapes = jax.eval_shape(_MODEL.init, key, jnp.zeros((1, 28, 28, 1)))["params"]
    return torch_style_init(shapes, key, lambda layer: False)


@jax.jit
def _classes(params, x):
    return jnp.argmax(_logits(params, x), -1)


def predict(params: Any, x: Float[np.ndarray, "n 28 28 1"], chunk: int = 1024) -> np.ndarray:
    """Predicted classes (int32) of images in [0, 1] (fixed-size chunks: one compilation)."""
    x = np.asarray(x, np.float32)
    out = [np.asarray(_classes(params, part))[:valid] for _, part, valid in padded_chunks(x, chunk)]
    return np.concatenate(out).astype(np.int32)


def logits(params: Any, x: Float[np.ndarray, "n 28 28 1"], chunk: int = 1024) -> np.ndarray:
    """Class logits (n, 10) of images in [0, 1] (fixed-size chunks: one compilation)."""
    x = np.asarray(x, np.float32)
    out = [np.asarray(_logits(params, part))[:valid] for _, part, valid in padded_chunks(x, chunk)]
    return np.concatenate(out).astype(np.float64)


def _loss_sums(params, batch, key):
    """Summed cross-entropy of a batch ``(images, labels)`` and its size (``key`` unused)."""
    x, y = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(_logits(params, x), y)
    return ce.sum(), jnp.float32(x.shape[0])


@functools.lru_cache(maxsize=4)
def _train_step(learning_rate: float):
    """Adam and its jitted cross-entropy step on the core engine, built once per learning rate
    (one compilation)."""
    opt = optax.adam(learning_rate)
    return opt, make_train_step(_loss_sums, opt)


def train(
    data: ImageData, settings: ClassifierSettings, progress: bool = False
) -> tuple[Any, float]:
    """Train on ``data.x_train`` with the core epoch loop; return ``(params, test accuracy)``."""
    x = to_unit(data.x_train)
    y = data.y_train
    if settings.max_train:
        x, y = x[: settings.max_train], y[: settings.max_train]
    opt, step = _train_step(settings.learning_rate)
    state = init_train_state(_init(jax.random.key(settings.seed)), opt)
    bs = min(settings.batch_size, len(x))
    key = jax.random.key(settings.seed)  # the loss draws no random numbers

    def batches(epoch: int):
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(x))
        for i in range(len(x) // bs):
            idx = order[i * bs : (i + 1) * bs]
            yield x[idx], y[idx]

    bar = Progress(progress, "classifier")

    def on_epoch(fit: FitState) -> None:
        bar.note(f"epoch {fit.epochs_done}/{settings.epochs} loss {fit.train_loss[-1]:.4f}")

    fit = fit_epochs(
        step,
        start_fit(state),
        epochs=settings.epochs,
        batches=batches,
        step_key=lambda epoch, i: key,
        on_epoch=on_epoch,
    )
    params = fit.train.params
    accuracy = float(np.mean(predict(params, to_unit(data.x_test)) == data.y_test))
    return params, accuracy


def load_or_train(
    data: ImageData,
    settings: ClassifierSettings = ClassifierSettings(),
    directory: str | os.PathLike | None = None,
    progress: bool = False,
) -> Classifier:
    """The classifier for ``data``: from the cache when present, else trained and cached."""
    path = cache_dir(directory) / f"classifier-{_fingerprint(data, settings)}.msgpack"
    template = _init(jax.random.key(0))
    if path.is_file():
        try:
            raw = flax.serialization.msgpack_restore(path.read_bytes())
            params = flax.serialization.from_state_dict(template, raw["params"])
            shapes_ok = jax.tree.all(
                jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), params, template)
            )
            if not shapes_ok:
                raise ValueError("parameter shapes differ")
            return Classifier(params, float(raw["test_accuracy"]), path, True)
        except Exception as e:
            warnings.warn(f"unreadable classifier cache {path} ({e}); retraining", stacklevel=2)
    params, accuracy = train(data, settings, progress)
    payload = {
        "params": flax.serialization.to_state_dict(jax.device_get(params)),
        "test_accuracy": np.float64(accuracy),
    }
    with atomic_path(path) as tmp:
        tmp.write_bytes(flax.serialization.msgpack_serialize(payload))
    return Classifier(params, accuracy, path, False)
