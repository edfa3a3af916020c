"""OPT (Zhang et al. 2022) as a Flax linen module, numerically matching ``transformers``' OPT.

The port follows ``transformers.models.opt.modeling_opt.OPTForCausalLM`` (transformers 5) op by
op: token embedding (optionally ``project_in`` from ``word_embed_proj_dim`` to ``hidden_size``),
learned positional embedding with OPT's offset of 2, decoder layers with pre- or post-LayerNorm
per ``do_layer_norm_before``, ReLU (or the configured) MLP, dropout on the attention output,
attention probabilities and MLP output, a final LayerNorm (pre-LN models only), optional
``project_out`` and an LM head tied to the token embedding.

Interface (stable; :mod:`collapse_jax.families.lm.decoding` and :mod:`collapse_jax.core.training` build on it)
-------------------------------------------------------------------------------------------
``OPTConfig``
    Frozen dataclass with the Hugging Face field names. ``OPTConfig.from_hf(path_or_dict)`` reads
    a ``config.json`` (a directory, the file, or a dict) and raises ``ConfigError`` naming a bad
    field; ``config.to_hf_dict()`` writes one back.

``OPTForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.float32, precision=None,
remat=False, scan_layers=False, scan_unroll=1, attention="auto")``
    ``model.apply({"params": params}, input_ids, attention_mask, position_ids=None, cache=None,
    deterministic=True, rngs={"dropout": key}) -> (logits, cache)``. ``dtype`` is the compute
    dtype (``jnp.bfloat16`` for mixed precision: matmuls in bfloat16, softmax and LayerNorm
    statistics in float32); ``remat`` recomputes each layer in the backward pass;
    ``scan_layers`` runs the layers as one ``lax.scan``; ``attention`` picks the attention core
    (:mod:`collapse_jax.families.lm.attention`).

    * ``input_ids``: int ``[B, T]``.
    * ``attention_mask``: ``[B, S]`` with 1 for real tokens and 0 for padding. Without a cache
      ``S = T``. With a cache ``S = max_length`` of the cache and the mask covers *every* cache
      slot (slots not yet written may hold anything: the causal rule hides them).
    * ``position_ids``: int ``[B, T]`` or ``None``. ``None`` applies Hugging Face's rule
      ``cumsum(mask) * mask - 1`` over the full mask, sliced at the cache's write index, so left
      padding works; the embedding row used is ``position + 2``.
    * ``cache``: a :class:`KVCache` from :func:`init_cache` or ``None``. The ``T`` new keys and
      values are written at slots ``cache.index .. cache.index + T - 1``; query ``t`` attends
      to slots ``s <= cache.index + t`` with ``attention_mask[b, s] = 1``. The returned cache has
      ``index + T``. Cached decoding equals the full forward pass.
    * ``logits``: float32 ``[B, T, vocab_size]`` whatever the compute dtype.

``init_cache(config, batch, max_length, dtype=jnp.float32) -> KVCache``
    ``KVCache(keys, values, index)`` with keys/values ``[num_hidden_layers, B, max_length,
    num_attention_heads, head_dim]`` and ``index`` an int32 scalar (slots filled so far, shared
    by the batch). Beam search reorders a cache with ``reorder_cache(cache, beam_indices)``.

``model_logits(config, params, input_ids, attention_mask, dtype=jnp.float32)``
    Jitted full forward pass for scoring; returns float32 logits ``[B, T, V]``.

Parameters are a nested dict mirroring the Hugging Face module names (``embed_tokens``,
``embed_positions``, ``project_in``, ``project_out``, ``layers_{i}/self_attn/{q,k,v,out}_proj``,
``layers_{i}/{self_attn_layer_norm,fc1,fc2,final_layer_norm}``, ``final_layer_norm`` and, only
when ``tie_word_embeddings`` is false, ``lm_head``); Dense kernels are ``[in, out]`` (the
transpose of PyTorch's ``weight``). :mod:`collapse_jax.families.lm.opt_weights` converts both ways.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm import attention as attn
from collapse_jax.families.lm.stacking import STACKED, stack_layers, unstack_layers  # noqa: F401 (re-exported)

# Activation functions of ``transformers.activations.ACT2FN`` that OPT checkpoints use.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# OPT's learned positional embedding reserves rows 0 and 1 (fairseq's padding convention).
POSITION_OFFSET = 2
# ``torch.nn.LayerNorm``'s default epsilon, which OPT uses everywhere.
LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """OPT hyper-parameters, with the field names of ``transformers.OPTConfig``.

    Defaults are OPT-125m's.
    """

    vocab_size: int = 50272  # size of the token vocabulary (rows of the embedding)
    hidden_size: int = 768  # width of the residual stream
    num_hidden_layers: int = 12  # number of decoder layers
    ffn_dim: int = 3072  # width of the MLP's hidden layer
    num_attention_heads: int = 12  # attention heads; hidden_size must be divisible by it
    max_position_embeddings: int = 2048  # longest sequence (positional embedding rows minus 2)
    do_layer_norm_before: bool = True  # pre-LayerNorm (125m, 1.3b, ...) or post (350m)
    word_embed_proj_dim: int | None = None  # token-embedding width; None means hidden_size
    dropout: float = 0.1  # dropout on attention output and MLP output (training only)
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    activation_dropout: float = 0.0  # kept for round trips; transformers' OPT does not use it
    activation_function: str = "relu"  # MLP nonlinearity, a key of ACTIVATIONS
    layerdrop: float = 0.0  # kept for round trips; must be 0 (LayerDrop is not implemented)
    init_std: float = 0.02  # standard deviation of the normal initialisation
    enable_bias: bool = True  # biases in the attention and MLP projections
    layer_norm_elementwise_affine: bool = True  # LayerNorms have scale and bias
    remove_final_layer_norm: bool = False  # HF's ``_remove_final_layer_norm`` (old checkpoints)
    tie_word_embeddings: bool = True  # LM head shares the token embedding
    pad_token_id: int | None = 1  # padding token (its embedding row initialises to zero)
    bos_token_id: int | None = 2  # beginning-of-sequence token
    eos_token_id: int | None = 2  # end-of-sequence token

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "ffn_dim",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.word_embed_proj_dim is not None:
            _check_positive_int("word_embed_proj_dim", self.word_embed_proj_dim)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        for name in (
            "do_layer_norm_before",
            "enable_bias",
            "layer_norm_elementwise_affine",
            "remove_final_layer_norm",
            "tie_word_embeddings",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not (0.0 <= value < 1.0) and name != "init_std":
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.layerdrop != 0.0:
            raise ConfigError(f"layerdrop {self.layerdrop} is not supported; set it to 0")
        if not (self.init_std > 0 and math.isfinite(self.init_std)):
            raise ConfigError(f"init_std must be positive, got {self.init_std}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation_function {self.activation_function!r}; choose one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer or null, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{name} {value} is outside the vocabulary [0, {self.vocab_size})"
                )

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (``word_embed_proj_dim`` or ``hidden_size``)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        """Whether ``project_in``/``project_out`` exist (OPT-350m)."""
        return self.embed_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        """Whether the decoder ends with a LayerNorm (pre-LN models)."""
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> OPTConfig:
        """Read a Hugging Face ``config.json`` (a directory holding one, the file, or a dict).

        Fields this port does not need (``architectures``, ``torch_dtype``, ...) are ignored;
        a wrong ``model_type`` or a bad value raises :class:`ConfigError` naming the field.
        """
        if isinstance(source, Mapping):
            raw, where = dict(source), "config"
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no OPT config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"cannot read {path}: {err}") from None
            where = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must hold a JSON object")
        model_type = raw.get("model_type", "opt")
        if model_type != "opt":
            raise ConfigError(f"{where}: model_type is {model_type!r}, expected 'opt'")
        kwargs = {}
        for field in dataclasses.fields(cls):
            key = (
                "_remove_final_layer_norm"
                if field.name == "remove_final_layer_norm"
                else field.name
            )
            if key in raw:
                kwargs[field.name] = raw[key]
        if isinstance(kwargs.get("eos_token_id"), list):
            eos = kwargs["eos_token_id"]
            if len(eos) != 1:
                raise ConfigError(f"{where}: eos_token_id {eos} must be a single token id")
            kwargs["eos_token_id"] = eos[0]
        for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "init_std"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs.get(key), bool):
                kwargs[key] = float(kwargs[key])
        if kwargs.get("word_embed_proj_dim") == kwargs.get("hidden_size", cls.hidden_size):
            kwargs["word_embed_proj_dim"] = None
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` contents ``transformers.OPTConfig`` reads."""
        out: dict[str, Any] = {"architectures": ["OPTForCausalLM"], "model_type": "opt"}
        for field in dataclasses.fields(self):
            key = (
                "_remove_final_layer_norm"
                if field.name == "remove_final_layer_norm"
                else field.name
            )
            out[key] = getattr(self, field.name)
        out["word_embed_proj_dim"] = self.embed_dim
        out["dtype"] = "float32"
        out["use_cache"] = True
        return out


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class KVCache(NamedTuple):
    """Key/value cache of every layer, written at ``index`` (shared by the batch)."""

    keys: Float[Array, "layer batch max_len head head_dim"]
    values: Float[Array, "layer batch max_len head head_dim"]
    index: Int[Array, ""]


def init_cache(config: OPTConfig, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_length`` tokens (prompt + new)."""
    if max_length > config.max_position_embeddings:
        raise ConfigError(
            f"max_length {max_length} exceeds max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    shape = (
        config.num_hidden_layers,
        batch,
        max_length,
        config.num_attention_heads,
        config.head_dim,
    )
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def reorder_cache(cache: KVCache, indices: Int[Array, " batch"]) -> KVCache:
    """Gather batch rows of the cache (beam search: ``indices`` are the surviving beams' rows)."""
    return KVCache(
        jnp.take(cache.keys, indices, axis=1), jnp.take(cache.values, indices, axis=1), cache.index
    )


def position_ids_from_mask(attention_mask: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Hugging Face's OPT positions ``cumsum(mask) * mask - 1``: 0, 1, ... over real tokens.

    Padding gets -1 (embedding row 1 after the offset of 2), so left-padded prompts start at 0.
    """
    mask = attention_mask.astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask - 1


def _dense(
    features: int, config: OPTConfig, name: str, *, bias: bool, dtype, param_dtype, precision
):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.initializers.normal(config.init_std),
        name=name,
    )


def _layer_norm(config: OPTConfig, name: str, dtype, param_dtype):
    affine = config.layer_norm_elementwise_affine
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        use_bias=affine,
        use_scale=affine,
        use_fast_variance=False,  # two-pass variance, as torch.nn.LayerNorm
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class OPTAttention(nn.Module):
    """Multi-head self-attention; queries are scaled by ``head_dim ** -0.5`` after projection."""

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    layer_index: int = 0  # which slice of the stacked KV cache this layer owns
    attention: str = "auto"  # the core's implementation (collapse_jax.families.lm.attention)

    @nn.compact
    def __call__(self, h, mask, layer_cache, deterministic: bool):
        """``h`` [B, T, D]; ``mask`` bool [B, 1, T, S]; ``layer_cache`` (keys, values, index)
        with the stacked cache arrays of all layers, or None. Returns (output [B, T, D], new stacked keys,
        new stacked values)."""
        cfg = self.config
        b, t, _ = h.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim
        kw = dict(bias=cfg.enable_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        kw["precision"] = self.precision
        q = _dense(cfg.hidden_size, cfg, "q_proj", **kw)(h) * (hd**-0.5)
        k = _dense(cfg.hidden_size, cfg, "k_proj", **kw)(h)
        v = _dense(cfg.hidden_size, cfg, "v_proj", **kw)(h)
        q = q.reshape(b, t, heads, hd)
        k = k.reshape(b, t, heads, hd)
        v = v.reshape(b, t, heads, hd)
        new_keys = new_values = None
        if layer_cache is not None:
            all_keys, all_values, index = layer_cache
            layer = self.layer_index
            start = (layer, 0, index, 0, 0)
            new_keys = jax.lax.dynamic_update_slice(all_keys, k[None].astype(all_keys.dtype), start)
            new_values = jax.lax.dynamic_update_slice(
                all_values, v[None].astype(all_values.dtype), start
            )
            k = new_keys[layer].astype(self.dtype)
            v = new_values[layer].astype(self.dtype)
        if cfg.attention_dropout > 0 and not deterministic:  # dropout inside: plain XLA core
            probs = attn.probabilities(q, k, mask, self.precision)
            probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=False)
            out = attn.weighted_values(probs, v, self.precision)
        else:
            cached = layer_cache is not None
            out = attn.attention(self.attention, q, k, v, mask, self.precision, cached=cached)
        out = out.reshape(b, t, cfg.hidden_size)
        out = _dense(cfg.hidden_size, cfg, "out_proj", **kw)(out)
        return out, new_keys, new_values


class OPTDecoderLayer(nn.Module):
    """One decoder layer: attention and MLP blocks with residuals, LayerNorm pre or post."""

    config: OPTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    layer_index: int = 0  # which slice of the stacked KV cache this layer owns
    attention: str = "auto"  # the attention core's implementation

    @nn.compact
    def __call__(self, h, mask, layer_cache, deterministic: bool):
        cfg = self.config
        dt, pdt = self.dtype, self.param_dtype
        attn_norm = _layer_norm(cfg, "self_attn_layer_norm", dt, pdt)
        mlp_norm = _layer_norm(cfg, "final_layer_norm", dt, pdt)
        dropout = nn.Dropout(cfg.dropout)

        residual = h
        if cfg.do_layer_norm_before:
            h = attn_norm(h)
        attention = OPTAttention(
            cfg, dt, pdt, self.precision, self.layer_index, self.attention, name="self_attn"
        )
        h, new_keys, new_values = attention(h, mask, layer_cache, deterministic)
        h = dropout(h, deterministic=deterministic)
        h = residual + h
        if not cfg.do_layer_norm_before:
            h = attn_norm(h)

        residual = h
        if cfg.do_layer_norm_before:
            h = mlp_norm(h)
        kw = dict(bias=cfg.enable_bias, dtype=dt, param_dtype=pdt, precision=self.precision)
        h = _dense(cfg.ffn_dim, cfg, "fc1", **kw)(h)
        h = ACTIVATIONS[cfg.activation_function](h)
        h = _dense(cfg.hidden_size, cfg, "fc2", **kw)(h)
        h = dropout(h, deterministic=deterministic)
        h = residual + h
        if not cfg.do_layer_norm_before:
            h = mlp_norm(h)
        return h, new_keys, new_values


def _embedding_init(std: float, pad_token_id: int | None):
    """Normal(0, std) rows with the padding row zeroed, as ``nn.Embedding(padding_idx=...)``."""

    def init(key, shape, dtype=jnp.float32):
        table = std * jax.random.normal(key, shape, dtype)
        if pad_token_id is not None:
            table = table.at[pad_token_id].set(0)
        return table

    return init


class OPTForCausalLM(nn.Module):
    """OPT decoder with the tied LM head; see the module docstring for the call signature."""

    config: OPTConfig
    dtype: Any = jnp.float32  # compute dtype (activations, matmuls); logits are always float32
    param_dtype: Any = jnp.float32  # parameter storage dtype
    precision: Any = None  # jax.lax.Precision of matmuls (None: backend default)
    # Recompute each layer's activations in the backward pass (saves memory): True recomputes
    # all of them; the name of a jax.checkpoint_policies policy (e.g.
    # "dots_with_no_batch_dims_saveable") saves what it names and recomputes the rest.
    remat: bool | str = False
    # Run the decoder layers as one lax.scan: XLA compiles one layer, not L. Give it parameters
    # stored stacked (stack_layers): with the per-layer tree it stacks them on every call, which
    # costs throughput and most of the compile gain (BENCHMARKS.md, "Scanned decoder layers").
    scan_layers: bool = False
    scan_unroll: int = 1  # layers per scan iteration (compile time against throughput)
    # The attention core: "auto", "xla", "saved_probs" or "cudnn" (families.lm.attention).
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch kv_len"],
        position_ids: Int[Array, "batch seq"] | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
    ) -> tuple[Float[Array, "batch seq vocab"], KVCache | None]:
        cfg = self.config
        dt, pdt = self.dtype, self.param_dtype
        if self.attention not in attn.IMPLEMENTATIONS:
            raise ConfigError(f"attention={self.attention!r} is not one of {attn.IMPLEMENTATIONS}")
        t = input_ids.shape[1]
        s = attention_mask.shape[1]
        if cache is None and s != t:
            raise ValueError(f"without a cache attention_mask must be [B, {t}], got {s} columns")
        if cache is not None and s != cache.keys.shape[2]:
            raise ValueError(
                f"with a cache attention_mask must cover its {cache.keys.shape[2]} slots, got {s}"
            )
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index

        if position_ids is None:
            position_ids = jax.lax.dynamic_slice_in_dim(
                position_ids_from_mask(attention_mask), index, t, axis=1
            )

        tokens = self.param(
            "embed_tokens",
            _embedding_init(cfg.init_std, cfg.pad_token_id),
            (cfg.vocab_size, cfg.embed_dim),
            pdt,
        )
        positions = self.param(
            "embed_positions",
            nn.initializers.normal(cfg.init_std),
            (cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size),
            pdt,
        )
        h = jnp.take(tokens, input_ids, axis=0).astype(dt)
        if cfg.has_projections:
            h = nn.Dense(
                cfg.hidden_size,
                use_bias=False,
                dtype=dt,
                param_dtype=pdt,
                precision=self.precision,
                kernel_init=nn.initializers.normal(cfg.init_std),
                name="project_in",
            )(h)
        h = h + jnp.take(positions, position_ids + POSITION_OFFSET, axis=0).astype(dt)

        # Query t (absolute slot index + t) sees key slot j iff j <= index + t and mask[b, j].
        query_slot = index + jnp.arange(t)[:, None]
        causal = jnp.arange(s)[None, :] <= query_slot  # [T, S]
        mask = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # [B, 1, T, S]

        keys = values = None
        if cache is not None:
            keys, values = cache.keys, cache.values
        if self.scan_layers and not self.is_initializing():
            h, keys, values = self._scanned_layers(h, mask, keys, values, index, deterministic)
        else:
            # Rematerialisation (activation checkpointing) of each layer in training trades
            # compute for memory; ``deterministic`` (argument 4, counting self) must stay a bool.
            layer_cls = OPTDecoderLayer
            if self.remat:
                layer_cls = nn.remat(layer_cls, static_argnums=(4,), policy=self._remat_policy())
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if cache is None else (keys, values, index)
                layer = layer_cls(
                    cfg, dt, pdt, self.precision, i, self.attention, name=f"layers_{i}"
                )
                h, keys, values = layer(h, mask, layer_cache, deterministic)
        if cfg.has_final_layer_norm:
            h = _layer_norm(cfg, "final_layer_norm", dt, pdt)(h)
        if cfg.has_projections:
            h = nn.Dense(
                cfg.embed_dim,
                use_bias=False,
                dtype=dt,
                param_dtype=pdt,
                precision=self.precision,
                kernel_init=nn.initializers.normal(cfg.init_std),
                name="project_out",
            )(h)
        if cfg.tie_word_embeddings:
            head = tokens.T
        else:
            head = self.param(
                "lm_head",
                nn.initializers.normal(cfg.init_std),
                (cfg.embed_dim, cfg.vocab_size),
                pdt,
            )
        logits = jnp.einsum(
            "btd,dv->btv",
            h,
            head.astype(dt),
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        new_cache = None if cache is None else KVCache(keys, values, index + t)
        return logits, new_cache

    def _remat_policy(self):
        """The ``jax.checkpoint`` policy that ``remat`` names (None: recompute everything)."""
        if self.remat is True:
            return None
        policy = getattr(jax.checkpoint_policies, str(self.remat), None)
        if policy is None:
            raise ConfigError(f"remat={self.remat!r} names no jax.checkpoint_policies policy")
        return policy

    def _scanned_layers(self, h, mask, keys, values, index, deterministic: bool):
        """The decoder layers as one ``lax.scan`` over their stacked parameters (the parameter
        tree keeps its ``layers_{i}`` layout, so weights and checkpoints are unchanged): XLA
        compiles one layer instead of ``num_hidden_layers`` copies. Layer i's dropout key is
        ``fold_in(dropout_key, i)``; with a cache, layer i reads and writes its own slice."""
        cfg = self.config
        n = cfg.num_hidden_layers
        params = self.variables["params"]
        # Stored stacked: no per-call copy; the per-layer tree is stacked on each call.
        stacked = (params if STACKED in params else stack_layers(params))[STACKED]
        layer = OPTDecoderLayer(
            cfg, self.dtype, self.param_dtype, self.precision, 0, self.attention
        )
        rng = None if deterministic else self.make_rng("dropout")
        has_cache = keys is not None

        def body(h, xs):
            p, i, kv = xs
            rngs = {} if rng is None else {"dropout": jax.random.fold_in(rng, i)}
            layer_cache = (kv[0][None], kv[1][None], index) if has_cache else None
            h, k, v = layer.apply({"params": p}, h, mask, layer_cache, deterministic, rngs=rngs)
            return h, ((k[0], v[0]) if has_cache else None)

        if self.remat:
            body = jax.checkpoint(body, policy=self._remat_policy())
        xs = (stacked, jnp.arange(n), (keys, values) if has_cache else None)
        h, new_kv = jax.lax.scan(body, h, xs, unroll=self.scan_unroll)
        if has_cache:
            return h, new_kv[0], new_kv[1]
        return h, None, None


def init_params(
    config: OPTConfig, key: jax.Array, param_dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Randomly initialised parameters (normal(init_std) weights, zero biases, unit scales)."""
    model = OPTForCausalLM(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(key, ids, jnp.ones((1, 1), jnp.int32))["params"]


def param_shapes(config: OPTConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating it."""
    return jax.eval_shape(
        functools.partial(init_params, config, param_dtype=param_dtype), jax.random.key(0)
    )


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def model_logits(
    config: OPTConfig,
    params: dict[str, Any],
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
    dtype: Any = jnp.float32,
) -> Float[Array, "batch seq vocab"]:
    """Full forward pass (no cache, no dropout): float32 logits ``[B, T, V]``."""
    logits, _ = OPTForCausalLM(config, dtype=dtype).apply(
        {"params": params}, input_ids, attention_mask
    )
    return logits


def num_params(params: Any) -> int:
    """Number of scalar parameters in a tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
