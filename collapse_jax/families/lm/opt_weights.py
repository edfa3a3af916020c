"""Hugging Face OPT checkpoints in and out: explicit rename/transpose rules, shape-checked.

Reading: ``load_pretrained(path_or_hub_id)`` finds ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json``), ``flax_model.msgpack`` (transformers 4's Flax OPT) or
``pytorch_model.bin`` (sharded too; needs torch), reads the tensors into NumPy and hands them to
the pure converter :func:`hf_state_dict_to_params`. Writing: :func:`save_pretrained` writes
``model.safetensors`` + ``config.json`` that ``transformers.OPTForCausalLM.from_pretrained``
opens; save then load is bit-exact.

The rename rules (``N`` = layer index, PyTorch ``Linear.weight`` is ``[out, in]``, a Flax
``Dense`` kernel ``[in, out]``):

- ``embed_tokens.weight [V, E]`` -> ``embed_tokens [V, E]``
- ``embed_positions.weight [P + 2, D]`` -> ``embed_positions [P + 2, D]``
- ``project_in.weight [D, E]`` -> ``project_in/kernel [E, D]`` (transposed)
- ``project_out.weight [E, D]`` -> ``project_out/kernel [D, E]`` (transposed)
- ``layers.N.<linear>.weight [out, in]`` -> ``layers_N/<linear>/kernel [in, out]`` (transposed)
- ``layers.N.<linear>.bias`` -> ``layers_N/<linear>/bias``
- ``layers.N.<norm>.weight`` / ``.bias`` -> ``layers_N/<norm>/scale`` / ``bias``
- ``final_layer_norm.weight`` / ``.bias`` -> ``final_layer_norm/scale`` / ``bias``
- ``lm_head.weight [V, E]`` (no prefix) -> tied: checked and ignored; untied: ``lm_head [E, V]``

``<linear>`` is ``self_attn.{q,k,v,out}_proj``, ``fc1`` or ``fc2``; ``<norm>`` is
``self_attn_layer_norm`` or ``final_layer_norm``. Keys may carry ``model.decoder.`` (from
``OPTForCausalLM``), ``decoder.`` (``OPTModel``) or no prefix (``OPTDecoder``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core.errors import ConfigError
from collapse_jax.families.lm.opt import OPTConfig, param_shapes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
DECODER_PREFIX = "model.decoder."


# --------------------------------------------------------------------------------------------
# Pure conversion rules.
# --------------------------------------------------------------------------------------------


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF key (without ``model.decoder.``; ``lm_head.weight`` is top level) and whether our
    parameter is the transpose of the HF tensor."""
    if path == ("embed_tokens",) or path == ("embed_positions",):
        return f"{path[0]}.weight", False
    if path == ("lm_head",):
        return "lm_head.weight", True
    parts = []
    for p in path[:-1]:
        parts.append(p.replace("layers_", "layers.") if p.startswith("layers_") else p)
    leaf = path[-1]
    if leaf == "kernel":
        return ".".join([*parts, "weight"]), True
    if leaf == "scale":
        return ".".join([*parts, "weight"]), False
    if leaf == "bias":
        return ".".join([*parts, "bias"]), False
    raise AssertionError(f"no rename rule for parameter {'/'.join(path)}")


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _strip_prefix(key: str) -> str:
    """``model.decoder.x`` / ``decoder.x`` / ``model.x`` / ``x`` -> ``x``; ``lm_head`` kept."""
    for prefix in (DECODER_PREFIX, "decoder.", "model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def hf_state_dict_to_params(
    state_dict: Mapping[str, Any], config: OPTConfig, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Convert a Hugging Face OPT state dict (name -> array) into our parameter tree.

    Every parameter of ``OPTForCausalLM(config).init`` must be present with the right shape;
    a missing, unexpected or mis-shaped key raises :class:`ConfigError` naming it. A tied
    ``lm_head.weight`` is accepted (and ignored) when its shape matches the embedding.

    Args:
        state_dict: keys as saved by ``transformers`` (any of the prefixes above); values
            NumPy arrays (or anything ``np.asarray`` accepts).
        config: the model configuration the checkpoint is meant for.
        dtype: dtype of the returned parameters.

    Returns:
        The nested parameter dict of :class:`collapse_jax.families.lm.opt.OPTForCausalLM`, as NumPy
        arrays of ``dtype``.
    """
    stripped: dict[str, tuple[str, Any]] = {}
    for key, value in state_dict.items():
        name = _strip_prefix(key)
        if name in stripped:
            raise ConfigError(f"checkpoint holds {name!r} twice ({stripped[name][0]!r}, {key!r})")
        stripped[name] = (key, value)

    flat_shapes = _flatten(param_shapes(config))
    params: dict[tuple[str, ...], Any] = {}
    missing, wrong = [], []
    used = set()
    for path, leaf in flat_shapes.items():
        name, transpose = _hf_name(path)
        want = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)
        if name not in stripped:
            missing.append(name)
            continue
        key, value = stripped[name]
        used.add(name)
        arr = np.asarray(value)
        if tuple(arr.shape) != want:
            wrong.append(f"{key} has shape {tuple(arr.shape)}, expected {want}")
            continue
        arr = arr.T if transpose else arr
        params[path] = np.ascontiguousarray(arr).astype(jnp.dtype(dtype))
    if config.tie_word_embeddings and "lm_head.weight" in stripped:
        key, value = stripped["lm_head.weight"]
        used.add("lm_head.weight")
        want = (config.vocab_size, config.embed_dim)
        if tuple(np.shape(value)) != want:
            wrong.append(f"{key} has shape {tuple(np.shape(value))}, expected {want}")
    unexpected = sorted(stripped[n][0] for n in stripped if n not in used)
    problems = []
    if missing:
        problems.append("missing key(s) " + ", ".join(repr(DECODER_PREFIX + m) for m in missing))
    if unexpected:
        problems.append("unexpected key(s) " + ", ".join(repr(u) for u in unexpected))
    if wrong:
        problems.append("; ".join(wrong))
    if problems:
        raise ConfigError("OPT checkpoint does not match its config: " + "; ".join(problems))
    return _unflatten(params)


def params_to_hf_state_dict(params: Mapping[str, Any], config: OPTConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> ``transformers`` state dict (``model.decoder.*`` keys, NumPy).

    A tied LM head is not written (``transformers`` re-ties it on load), as its own
    ``save_pretrained`` does.
    """
    flat = _flatten(params)
    expected = _flatten(param_shapes(config))
    if set(flat) != set(expected):
        extra = sorted("/".join(p) for p in set(flat) - set(expected))
        lack = sorted("/".join(p) for p in set(expected) - set(flat))
        raise ConfigError(f"parameters do not match the config: missing {lack}, unexpected {extra}")
    out = {}
    for path, value in flat.items():
        name, transpose = _hf_name(path)
        arr = np.asarray(jax.device_get(value))
        if tuple(arr.shape) != tuple(expected[path].shape):
            raise ConfigError(
                f"parameter {'/'.join(path)} has shape {arr.shape}, expected {expected[path].shape}"
            )
        arr = arr.T if transpose else arr
        key = name if name == "lm_head.weight" else DECODER_PREFIX + name
        out[key] = np.ascontiguousarray(arr)
    return out


def flax_tree_to_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """transformers 4 ``FlaxOPTForCausalLM`` params -> PyTorch-style state dict.

    Flax names ``model/decoder/layers/N/fc1/kernel [in, out]``; this returns
    ``model.decoder.layers.N.fc1.weight [out, in]`` etc., so one set of rules handles both.
    """
    out = {}
    for path, value in _flatten(tree).items():
        if path and path[0] == "params":
            path = path[1:]
        *parents, leaf = path
        arr = np.asarray(value)
        if leaf == "kernel":
            arr, leaf = arr.T, "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join([*parents, leaf])] = arr
    return out


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key))
    except Exception as err:
        raise ConfigError(f"cannot read safetensors file {path}: {err}") from None
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f"{path} is a PyTorch checkpoint; install torch to read it, or convert it to "
            "safetensors"
        ) from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read PyTorch checkpoint {path}: {err}") from None
    out = {}
    for key, t in sd.items():
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[key] = t.detach().cpu().numpy()
    return out


def _read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise ConfigError(f"cannot read Flax checkpoint {path}: {err}") from None
    return flax_tree_to_state_dict(tree)


def _read_index(index_path: Path, reader) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read shard index {index_path}: {err}") from None
    out = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise ConfigError(f"shard {shard} listed in {index_path} is missing")
        out.update(reader(shard_path))
    return out


def read_state_dict(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the weights of a Hugging Face model directory into a NumPy state dict.

    Looks, in order, for ``model.safetensors``, ``model.safetensors.index.json``,
    ``flax_model.msgpack``, ``pytorch_model.bin`` and ``pytorch_model.bin.index.json``.
    """
    d = Path(directory)
    if (d / SAFETENSORS).is_file():
        return _read_safetensors(d / SAFETENSORS)
    if (d / SAFETENSORS_INDEX).is_file():
        return _read_index(d / SAFETENSORS_INDEX, _read_safetensors)
    if (d / FLAX_MSGPACK).is_file():
        return _read_flax_msgpack(d / FLAX_MSGPACK)
    if (d / PYTORCH_BIN).is_file():
        return _read_torch_bin(d / PYTORCH_BIN)
    if (d / PYTORCH_BIN_INDEX).is_file():
        return _read_index(d / PYTORCH_BIN_INDEX, _read_torch_bin)
    raise ConfigError(
        f"no OPT weights in {d}: expected one of {SAFETENSORS}, {SAFETENSORS_INDEX}, "
        f"{FLAX_MSGPACK}, {PYTORCH_BIN}, {PYTORCH_BIN_INDEX}"
    )


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception message on one line (the CLI prints errors as one line)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_model_dir(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise download the hub repo ``path_or_id`` (config,
    tokenizer and the first weight format found) with ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model {name!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        meta = ["*.json", "*.txt", "*.model", "merges.txt", "vocab.json"]
        for weights in (
            ["model.safetensors", "model-*.safetensors"],
            [FLAX_MSGPACK],
            ["pytorch_model.bin", "pytorch_model-*.bin"],
        ):
            local = Path(
                snapshot_download(name, revision=revision, allow_patterns=[*meta, *weights])
            )
            if any(local.glob(w) for w in weights):
                return local
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"model {name!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub: {type(err).__name__}: {_one_line(err)}"
        ) from None
    raise ConfigError(f"hub repo {name!r} has no OPT weights in a supported format")


def load_pretrained(
    path_or_id: str | os.PathLike, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[OPTConfig, dict[str, Any]]:
    """Load ``(config, params)`` from a local Hugging Face OPT directory or a hub id.

    ``params`` hold NumPy arrays of ``dtype``; put them on devices with ``jax.device_put``.
    """
    directory = resolve_model_dir(path_or_id, revision)
    config = OPTConfig.from_hf(directory)
    state_dict = read_state_dict(directory)
    return config, hf_state_dict_to_params(state_dict, config, dtype)


def save_pretrained(
    params: Mapping[str, Any],
    config: OPTConfig,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (and the tokenizer, if given).

    ``transformers.OPTForCausalLM.from_pretrained(directory)`` opens the result and
    :func:`load_pretrained` reads back exactly the same parameters.
    """
    from safetensors.numpy import save_file

    from collapse_jax.core.runs import atomic_path, write_json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state_dict = params_to_hf_state_dict(params, config)
    with atomic_path(d / SAFETENSORS) as tmp:
        save_file(state_dict, str(tmp), metadata={"format": "pt"})
    write_json(d / CONFIG, config.to_hf_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return d


def load_tokenizer(path_or_id: str | os.PathLike):
    """``transformers.AutoTokenizer.from_pretrained`` with errors as :class:`ConfigError`."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path_or_id))
    except Exception as err:
        raise ConfigError(
            f"cannot load a tokenizer from {str(path_or_id)!r}: {type(err).__name__}: "
            f"{_one_line(err)}"
        ) from None
