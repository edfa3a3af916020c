"""The attention core ``softmax(q kᵀ, masked) v`` of the OPT port, in three implementations.

- ``"xla"``: plain einsums and ``jax.nn.softmax``, differentiated by JAX. Its backward pass keeps
  the float32 softmax output ``[B, H, T, S]`` and the compute-dtype probabilities.
- ``"saved_probs"``: the same forward arithmetic with a hand-written backward
  (:func:`attention_saved_probs`) that keeps only the compute-dtype probabilities. In float32
  it is the same math as ``"xla"``; in bfloat16 the softmax derivative reads the rounded
  probabilities. Half the residual memory of the largest tensor of the layer, which is what a
  ``lax.scan`` over layers pays for most on GPU (each residual is written into a stacked buffer
  and copied back out).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused
  flash-attention kernel of cuDNN (NVIDIA GPUs, float16/bfloat16 only), the mask passed as a
  bias.

``"auto"`` (the model's default) picks cuDNN where it runs and ``"saved_probs"`` elsewhere.
Queries arrive already scaled (OPT scales them after the projection), so no scale is applied
here. Dropout on the probabilities is not part of the core: the model uses ``"xla"`` when it
applies attention dropout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "saved_probs", "cudnn")


def auto_implementation(dtype, head_dim: int, *, cached: bool) -> str:
    """What ``"auto"`` runs: cuDNN's kernel on an NVIDIA GPU for float16/bfloat16 without a KV
    cache (training and scoring; head size a multiple of 8 up to 128, which it supports), else
    ``"saved_probs"``. On an H100 in bfloat16 the OPT-125m train step runs 1.18x faster with
    cuDNN than with ``"xla"`` (BENCHMARKS.md, "Scanned decoder layers")."""
    fused = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    gpu = jax.default_backend() == "gpu"
    if gpu and fused and not cached and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "saved_probs"


def probabilities(q, k, mask, precision):
    """Softmax over key slots of the (pre-scaled) scores, float32 inside, compute dtype out."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k, precision=precision).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(q.dtype)


def weighted_values(probs, v, precision):
    return jnp.einsum("bhts,bshd->bthd", probs, v, precision=precision)


def attention_xla(q, k, v, mask, precision=None):
    """``q`` [B, T, H, hd] (scaled), ``k``, ``v`` [B, S, H, hd], ``mask`` bool broadcastable to
    [B, H, T, S]; returns [B, T, H, hd]."""
    return weighted_values(probabilities(q, k, mask, precision), v, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_saved_probs(q, k, v, mask, precision=None):
    """:func:`attention_xla` with a backward pass that keeps only the probabilities (see the
    module docstring)."""
    return attention_xla(q, k, v, mask, precision)


def _saved_probs_fwd(q, k, v, mask, precision):
    probs = probabilities(q, k, mask, precision)
    return weighted_values(probs, v, precision), (q, k, v, mask, probs)


def _saved_probs_bwd(precision, residuals, g):
    q, k, v, mask, probs = residuals
    d_probs = jnp.einsum("bthd,bshd->bhts", g, v, precision=precision)
    dv = jnp.einsum("bhts,bthd->bshd", probs, g, precision=precision)
    # Softmax derivative y ⊙ (dy − Σ dy ⊙ y) in float32, as jax.nn.softmax's own rule; masked
    # slots get no gradient (jnp.where's transpose), which matters for fully masked rows.
    p = probs.astype(jnp.float32)
    dp = d_probs.astype(jnp.float32)
    d_scores = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    d_scores = jnp.where(mask, d_scores, 0.0).astype(q.dtype)
    dq = jnp.einsum("bhts,bshd->bthd", d_scores, k, precision=precision)
    dk = jnp.einsum("bhts,bthd->bshd", d_scores, q, precision=precision)
    return dq, dk, dv, None


attention_saved_probs.defvjp(_saved_probs_fwd, _saved_probs_bwd)


def attention_cudnn(q, k, v, mask, precision=None):
    """cuDNN's fused attention (GPU, float16/bfloat16); ``precision`` does not apply."""
    del precision
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")


def attention(implementation: str, q, k, v, mask, precision=None, *, cached: bool = False):
    """Dispatch on ``implementation`` (one of :data:`IMPLEMENTATIONS`; ``cached``: keys and
    values come from a KV cache, which ``"auto"`` leaves to XLA)."""
    if implementation == "auto":
        implementation = auto_implementation(q.dtype, q.shape[-1], cached=cached)
    if implementation == "xla":
        return attention_xla(q, k, v, mask, precision)
    if implementation == "saved_probs":
        return attention_saved_probs(q, k, v, mask, precision)
    if implementation == "cudnn":
        return attention_cudnn(q, k, v, mask, precision)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
