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
  bias; opt-in (see :func:`attention_cudnn`).

``"auto"`` (the model's default) runs ``"saved_probs"``. cuDNN's kernel is faster on an NVIDIA
GPU (1.18x for the OPT-125m train step on an H100 in bfloat16, BENCHMARKS.md) but stays opt-in:
its gradients were measured NaN for queries that see no key, and the guard against that in
:func:`attention_cudnn` has not yet run on a GPU.
Queries arrive already scaled (OPT scales them after the projection), so no scale is applied
here. Dropout on the probabilities is not part of the core: the model uses ``"xla"`` when it
applies attention dropout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "saved_probs", "cudnn")


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
    """cuDNN's fused attention (NVIDIA GPU, float16/bfloat16; no KV cache: query t is key slot
    t). ``precision`` does not apply. The kernel takes the mask as a large negative bias, and
    on an H100 it returned NaN gradients for a query that sees no key (a padded position),
    even with a zero cotangent there, which would poison a whole update. So a query that sees
    no key sees its own slot here instead: only such queries change, and their output is read
    by nothing (a padded position: no loss weight, no query sees its key)."""
    del precision
    t, s = q.shape[1], k.shape[1]
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, t, s))
    blind = ~jnp.any(mask, axis=-1, keepdims=True)  # [B, 1, T, 1]
    mask = mask | (blind & jnp.eye(t, s, dtype=bool)[None, None])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")


def attention(implementation: str, q, k, v, mask, precision=None, *, cached: bool = False):
    """Dispatch on ``implementation`` (one of :data:`IMPLEMENTATIONS`; ``cached``: keys and
    values come from a KV cache, where ``"cudnn"`` runs ``"saved_probs"``)."""
    if implementation == "auto" or (implementation == "cudnn" and cached):
        implementation = "saved_probs"
    if implementation == "xla":
        return attention_xla(q, k, v, mask, precision)
    if implementation == "saved_probs":
        return attention_saved_probs(q, k, v, mask, precision)
    if implementation == "cudnn":
        return attention_cudnn(q, k, v, mask, precision)
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
