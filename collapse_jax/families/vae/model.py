"""The convolutional VAE of the paper's MNIST experiment (Flax), its loss and optimizer, its step
on the core training engine (:mod:`collapse_jax.core.training`), sampling and evaluation.

Architecture (defaults = the paper's, 647,081 parameters):

* encoder: Conv(1->64, 4x4, stride 2, pad 1) + ReLU -> Conv(64->128, 4x4, stride 2, pad 1) + ReLU
  -> flatten (7*7*128) -> two linear heads, mean and log-variance of q(z|x), latent size 20;
* decoder (mirrored): Linear(20 -> 7*7*128) + ReLU -> ConvTranspose(128->64, 4x4, stride 2,
  pad 1) + ReLU -> ConvTranspose(64->1, 4x4, stride 2, pad 1) -> Bernoulli logits (sigmoid
  gives the pixel means). The transposed convolutions are PyTorch's ``ConvTranspose2d(k=4,
  s=2, p=1)`` (kernel flipped), computed in sub-pixel form (:class:`SubPixelConvTranspose`).

Loss per image (the negative ELBO, Kingma & Welling 2014, eq. 10 with one sample):
``-ELBO(x) = sum_pixels BCE(x, sigmoid(logits(z))) + KL(N(mu, diag sigma^2) || N(0, I))`` with
``KL = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)`` and ``z = mu + sigma * eps``. The
training objective is its mean over the batch, computed by the core step as the sum over the
batch divided by the batch size (the PyTorch reference sums over the batch; Adam is invariant to
that constant factor up to its epsilon).

Optimizer: ``Adam(lr 1e-3)`` with L2 weight decay 1e-5 added to the gradient, i.e. PyTorch's
``torch.optim.Adam(weight_decay=1e-5)`` (``optax.adamw`` would be the decoupled variant).

Data parallelism: the core engine's ``(data, model=1)`` mesh over the local devices
(:func:`~collapse_jax.core.training.data_mesh`); the batch is split along its leading axis,
parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce. The reparameterisation noise is drawn for the whole batch from one key, so with
JAX's partitionable threefry the result does not depend on the number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float

from collapse_jax.core.errors import check_float, check_int
from collapse_jax.core.training import (
    StepInfo,
    TrainState,
    batch_sharding,
    new_train_state,
    train_state_sharding,
)
from collapse_jax.core.training import make_train_step as make_core_train_step
from collapse_jax.numerics.random import jax_bernoulli, jax_normal

IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and optimizer of the VAE; defaults are the paper's."""

    channels1: int = 64  # first encoder conv width (mirrored by the last decoder layer)
    channels2: int = 128  # second encoder conv width
    latent: int = 20  # latent dimension
    learning_rate: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-5  # L2 weight decay added to the gradient (PyTorch Adam semantics)

    def __post_init__(self):
        check_int("VAE channels1", self.channels1, 1)
        check_int("VAE channels2", self.channels2, 1)
        check_int("VAE latent", self.latent, 1)
        check_float("learning rate", self.learning_rate, 0.0, open_min=True)
        check_float("weight decay", self.weight_decay, 0.0)


# Padding of a transposed convolution that matches PyTorch's ConvTranspose2d(k=4, s=2, p=1):
# the stride-dilated input is padded by k - 1 - p = 2 on each side, doubling the spatial size.
TRANSPOSE_PADDING = ((2, 2), (2, 2))

# Which tap t of a 4-tap, stride-2 transposed convolution (padding as above) feeds output phase
# a in {0, 1} from window position u of a 3-tap, stride-1 convolution over the input padded by 1:
# y[2j] = k[0] x[j-1] + k[2] x[j] and y[2j+1] = k[1] x[j] + k[3] x[j+1].
_PHASE_TAPS = np.zeros((3, 2, 4), np.float32)
_PHASE_TAPS[0, 0, 0] = _PHASE_TAPS[1, 0, 2] = _PHASE_TAPS[1, 1, 1] = _PHASE_TAPS[2, 1, 3] = 1.0


class SubPixelConvTranspose(nn.Module):
    """``nn.ConvTranspose(features, (4, 4), (2, 2), padding=TRANSPOSE_PADDING)``, computed as a
    stride-1 3x3 convolution into 4 x ``features`` channels followed by depth-to-space.

    Same parameters (kernel (4, 4, in, out), bias) and the same result up to float rounding, but
    XLA on CPU runs a transposed convolution as a convolution over the zero-dilated input (3/4 of
    the multiply-adds hit zeros) and its gradient slowly; this form is several times faster there
    (``benchmarks/bench_vae.py``) and no slower on accelerators.
    """

    features: int

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b 2h 2w f"]:
        cin, f = x.shape[-1], self.features
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, cin, f))
        bias = self.param("bias", nn.initializers.zeros, (f,))
        taps = jnp.asarray(_PHASE_TAPS, x.dtype)
        k3 = jnp.einsum("uat,vbs,tsio->uvioab", taps, taps, kernel)  # (3, 3, in, out, 2, 2)
        k3 = k3.transpose(0, 1, 2, 4, 5, 3).reshape(3, 3, cin, 4 * f)  # channels (a, b, out)
        y = jax.lax.conv_general_dilated(
            x, k3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        b, h, w, _ = y.shape
        y = y.reshape(b, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f)
        return y + bias.reshape(1, 1, 1, f)


class Encoder(nn.Module):
    channels1: int
    channels2: int
    latent: int

    @nn.compact
    def __call__(self, x: Float[Array, "b 28 28 1"]) -> tuple[Array, Array]:
        h = nn.relu(nn.Conv(self.channels1, (4, 4), (2, 2), padding=((1, 1), (1, 1)))(x))
        h = nn.relu(nn.Conv(self.channels2, (4, 4), (2, 2), padding=((1, 1), (1, 1)))(h))
        h = h.reshape(h.shape[0], -1)
        return nn.Dense(self.latent, name="mean")(h), nn.Dense(self.latent, name="logvar")(h)


class Decoder(nn.Module):
    channels1: int
    channels2: int

    @nn.compact
    def __call__(self, z: Float[Array, "b latent"]) -> Float[Array, "b 28 28 1"]:
        h = nn.relu(nn.Dense(7 * 7 * self.channels2)(z))
        h = h.reshape(z.shape[0], 7, 7, self.channels2)
        h = nn.relu(SubPixelConvTranspose(self.channels1)(h))
        return SubPixelConvTranspose(1)(h)


class VAE(nn.Module):
    """Encoder + decoder; ``__call__`` returns (logits, mean, logvar) for one reparameterised z."""

    channels1: int = 64
    channels2: int = 128
    latent: int = 20

    def setup(self):
        self.encoder = Encoder(self.channels1, self.channels2, self.latent)
        self.decoder = Decoder(self.channels1, self.channels2)

    def __call__(self, x, eps):
        mean, logvar = self.encoder(x)
        z = mean + jnp.exp(0.5 * logvar) * eps
        return self.decoder(z), mean, logvar

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


def make_model(config: VAEConfig) -> VAE:
    return VAE(config.channels1, config.channels2, config.latent)


def torch_style_init(shapes: Any, key: jax.Array, transposed: Callable[[str], bool]) -> Any:
    """PyTorch's default initialisation of conv / linear layers, drawn on the host.

    Every kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``kaiming_uniform_(a=sqrt(5))``
    for weights, the same bound for biases), as in the paper's PyTorch model. ``fan_in`` is
    ``kh * kw * in`` for a conv, ``in`` for a dense layer and ``kh * kw * out`` for a transposed
    conv (PyTorch reads dimension 1 of its ``(in, out, kh, kw)`` weight). NumPy draws the values
    from a seed taken from ``key``: initialisation then needs no XLA compilation, which on a busy
    CPU costs seconds per initialiser.
    """
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    rng = np.random.default_rng([int(v) for v in seed])
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    out = {}
    for layer in sorted({k.rsplit("/", 1)[0] for k in flat}):
        kernel = flat[layer + "/kernel"].shape
        if len(kernel) == 4:
            fan_in = kernel[0] * kernel[1] * (kernel[3] if transposed(layer) else kernel[2])
        else:
            fan_in = kernel[0]
        bound = 1.0 / np.sqrt(fan_in)
        for name in ("kernel", "bias"):
            leaf = flat[f"{layer}/{name}"]
            out[f"{layer}/{name}"] = jnp.asarray(
                rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)
            )
    return flax.traverse_util.unflatten_dict(out, sep="/")


def param_shapes(model: VAE) -> Any:
    """Shapes and dtypes of the parameters for 28x28x1 inputs (nothing is computed)."""
    x = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
    eps = jnp.zeros((1, model.latent), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x, eps)["params"]


def init_params(model: VAE, key: jax.Array) -> Any:
    """Initialise parameters for 28x28x1 inputs (PyTorch-style, see :func:`torch_style_init`)."""
    return torch_style_init(param_shapes(model), key, lambda layer: "ConvTranspose" in layer)


def count_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def negative_elbo(
    model: VAE, params: Any, x: Float[Array, "b 28 28 1"], eps: Float[Array, "b latent"]
) -> Float[Array, " b"]:
    """Per-image negative ELBO (summed BCE + KL, module docstring) with noise ``eps``."""
    logits, mean, logvar = model.apply({"params": params}, x, eps)
    bce = optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=(1, 2, 3))
    kl = -0.5 * jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
    return bce + kl


def make_optimizer(config: VAEConfig) -> optax.GradientTransformation:
    """PyTorch ``Adam(lr, weight_decay)``: L2 decay added to the gradient, then Adam."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay), optax.adam(config.learning_rate)
    )


def init_state(model: VAE, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh host :class:`~collapse_jax.core.training.TrainState` (PyTorch-style init)."""
    return new_train_state(init_params(model, key), optimizer)


def make_train_step(
    model: VAE, optimizer: optax.GradientTransformation, mesh: Mesh
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepInfo]]:
    """The core jitted step ``step(state, batch, key) -> (state, info)`` sharded over ``mesh``
    (:func:`collapse_jax.core.training.make_train_step`); ``info.loss`` is the batch's mean
    negative ELBO.

    ``batch``: float32 images in [0, 1] of shape (b, 28, 28, 1), b divisible by the mesh's data
    axis. ``key`` draws the reparameterisation noise of the whole batch.
    """
    shard = batch_sharding(mesh)

    def loss_sums(params, batch, key):
        eps = jax_normal(key, (batch.shape[0], model.latent), batch.dtype)
        eps = jax.lax.with_sharding_constraint(eps, shard)
        return negative_elbo(model, params, batch, eps).sum(), jnp.float32(batch.shape[0])

    sharding = train_state_sharding(param_shapes(model), optimizer, mesh)
    return make_core_train_step(loss_sums, optimizer, mesh=mesh, state_sharding=sharding)


# --------------------------------------------------------------------------------------------
# Sampling and evaluation (jitted, batched on the host to bound memory)


def padded_chunks(x: np.ndarray, chunk: int):
    """Yield ``(index, padded_chunk, valid_rows)``: every chunk has exactly ``chunk`` rows (the
    last is zero-padded), so a jitted function compiles once whatever ``len(x)`` is."""
    for i, start in enumerate(range(0, len(x), chunk)):
        part = x[start : start + chunk]
        valid = len(part)
        if valid < chunk:
            part = np.concatenate([part, np.zeros((chunk - valid, *part.shape[1:]), part.dtype)])
        yield i, part, valid


@dataclasses.dataclass
class VAEFunctions:
    """Jitted pure functions of one architecture, built once and reused across generations.

    Every function works on fixed-size chunks of ``chunk`` images, so each compiles once.
    """

    model: VAE
    chunk: int = 1024

    def __post_init__(self):
        m, chunk = self.model, self.chunk

        @functools.partial(jax.jit, static_argnums=2)
        def sample_chunk(params, key, binarize: bool):
            kz, kb = jax.random.split(key)
            z = jax_normal(kz, (chunk, m.latent), jnp.float32)
            means = jax.nn.sigmoid(m.apply({"params": params}, z, method=VAE.decode))
            if binarize:
                return jax_bernoulli(kb, means).astype(jnp.float32)
            return means

        @jax.jit
        def encode(params, x):
            return m.apply({"params": params}, x, method=VAE.encode)

        @jax.jit
        def nelbo(params, x, key):
            eps = jax_normal(key, (x.shape[0], m.latent), x.dtype)
            return negative_elbo(m, params, x, eps)

        self._sample_chunk = sample_chunk
        self.encode = encode
        self.nelbo = nelbo

    def sample(
        self, params, key: jax.Array, n: int, binarize: bool
    ) -> Float[np.ndarray, "n 28 28 1"]:
        """``n`` images from the generative model: z ~ N(0, I), pixels = sigmoid(decoder(z)) (the
        Bernoulli means), or Bernoulli draws of them when ``binarize``. Chunk ``i`` uses
        ``fold_in(key, i)``, so the result depends only on (key, n, chunk)."""
        out = []
        for i, start in enumerate(range(0, n, self.chunk)):
            x = self._sample_chunk(params, jax.random.fold_in(key, i), bool(binarize))
            out.append(np.asarray(x)[: min(self.chunk, n - start)])
        return np.concatenate(out, 0)

    def encoder_means(self, params, x: np.ndarray) -> np.ndarray:
        """Means of q(z|x) for images ``x`` (n, 28, 28, 1) in [0, 1]."""
        out = [
            np.asarray(self.encode(params, part)[0])[:valid]
            for _, part, valid in padded_chunks(np.asarray(x, np.float32), self.chunk)
        ]
        return np.concatenate(out)

    def mean_nelbo(self, params, x: np.ndarray, key: jax.Array) -> float:
        """Mean one-sample negative ELBO (nats per image) of images ``x``; chunk ``i`` uses
        ``fold_in(key, i)``."""
        total = 0.0
        for i, part, valid in padded_chunks(np.asarray(x, np.float32), self.chunk):
            v = np.asarray(self.nelbo(params, part, jax.random.fold_in(key, i)))
            total += float(v[:valid].astype(np.float64).sum())
        return total / len(x)
