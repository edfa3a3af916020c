"""``collapse-jax lm``: score text and generate continuations with an OPT checkpoint.

``collapse-jax lm score --model M --text-file F`` writes one JSON line per input line:
``{"line", "n_tokens", "nll_sum", "nll", "perplexity"}`` where ``nll`` is the mean negative
log-likelihood (nats) per scored token. Each line is tokenized (the OPT tokenizer prepends
``</s>``); lines longer than ``--block-size`` tokens are cut into windows of ``block_size``
tokens overlapping by one, so every token after the first is scored exactly once, with the
context of its own window.

``collapse-jax lm generate --model M --prompt-file F --num-beams 5 --max-new-tokens 64
--min-new-tokens 64 --repetition-penalty R`` writes one JSON line per prompt:
``{"prompt_index", "prompt", "new_token_ids", "num_new_tokens", "text"}`` (+ ``score`` for beam
search), decoded by :func:`collapse_jax.families.lm.decoding.generate` with Hugging Face's semantics.

``M`` is a local Hugging Face-format directory or (online) a hub id such as
``facebook/opt-125m``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from collapse_jax.core.errors import (
    ConfigError,
    check_choice,
    check_float,
    check_int,
    check_memory,
)
from collapse_jax.core.flags import Parser
from collapse_jax.core.runs import atomic_path

# JAX, the model and the scorer are imported inside the commands that use them, so that
# `collapse-jax lm --help` and bad flags answer before any of them loads.

DTYPES = ("float32", "bfloat16")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF-format directory or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: M)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward batch")
    p.add_argument("--out", default=None, help="write the JSON lines here (default: stdout)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="collapse-jax lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="per-line perplexity of a text file")
    _add_model_args(score)
    score.add_argument("--text-file", required=True, help="one text per line")
    score.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per scoring window (default: the model's max_position_embeddings)",
    )

    gen = sub.add_parser("generate", help="continue each prompt of a file")
    _add_model_args(gen)
    gen.add_argument("--prompt-file", required=True, help="one prompt per line")
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--length-penalty", type=float, default=1.0)
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    return parser


def _read_lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {path}: {err}") from None
    return text.splitlines()


def _load(args) -> tuple[Any, Any, Any, Any]:
    """(config, params on device, tokenizer, dtype) for ``--model``/``--tokenizer``/``--dtype``."""
    import jax
    import jax.numpy as jnp

    from collapse_jax.families.lm.opt_weights import (
        load_pretrained,
        load_tokenizer,
        resolve_model_dir,
    )

    dtype_name = check_choice("dtype", args.dtype, DTYPES)
    check_int("batch-size", args.batch_size, 1)
    try:
        model_dir = resolve_model_dir(args.model)
        config, params = load_pretrained(model_dir)
    except ConfigError as err:
        if args.model in str(err) and "model" in str(err):
            raise
        raise ConfigError(f"model {args.model}: {err}") from None
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"tokenizer {args.tokenizer or args.model} has {len(tokenizer)} tokens but model "
            f"{args.model} has vocab_size {config.vocab_size}: token ids would reach beyond it"
        )
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    return config, jax.device_put(params), tokenizer, dtype


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def windows(ids: list[int], block_size: int) -> Iterator[list[int]]:
    """Windows of ``block_size`` tokens overlapping by one token, covering ``ids``.

    Window ``k`` starts at ``k · (block_size − 1)``; its targets are the tokens after its first,
    so each token but the very first is scored exactly once.
    """
    if len(ids) <= block_size:
        yield ids
        return
    step = block_size - 1
    for start in range(0, len(ids) - 1, step):
        yield ids[start : start + block_size]


def _check_memory(config, rows: int, what: str, positions: int) -> None:
    """Refuse a batch whose logits and key/value cache no machine holds, before compiling;
    ``what`` names the flags that make its ``rows`` sequences."""
    per_position = config.vocab_size + 2 * config.num_hidden_layers * config.hidden_size
    check_memory(
        4.0 * rows * positions * per_position,
        f"{what} ({rows} sequences) of {positions} positions with vocab_size {config.vocab_size}",
    )


def cmd_score(args, out: TextIO) -> int:
    from collapse_jax.families.lm.training import opt_apply_fn, score_sequences

    texts = _read_lines(args.text_file, "text file")
    if args.block_size is not None:
        check_int("block-size", args.block_size, 2)
    config, params, tokenizer, dtype = _load(args)
    block = config.max_position_embeddings if args.block_size is None else args.block_size
    block = check_int("block-size", block, 2, config.max_position_embeddings)
    _check_memory(config, args.batch_size, f"batch-size {args.batch_size}", block)
    pieces, owner = [], []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text)["input_ids"])
        for w in windows(ids, block):
            pieces.append(w)
            owner.append(i)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    scores = score_sequences(
        opt_apply_fn(config, dtype),
        params,
        pieces,
        batch_size=args.batch_size,
        max_length=block,
        pad_token_id=pad,
    )
    nll_sum = np.zeros(len(texts))
    n_tok = np.zeros(len(texts), np.int64)
    np.add.at(nll_sum, np.asarray(owner, np.int64), scores.nll_sum)
    np.add.at(n_tok, np.asarray(owner, np.int64), scores.n_tokens)
    for i in range(len(texts)):
        nll = nll_sum[i] / n_tok[i] if n_tok[i] else math.nan
        row = {
            "line": i,
            "n_tokens": int(n_tok[i]),
            "nll_sum": float(nll_sum[i]),
            "nll": _json_float(nll),
            "perplexity": _json_float(math.exp(nll)) if n_tok[i] else None,
        }
        out.write(json.dumps(row) + "\n")
    return 0


def _bucket(n: int) -> int:
    return max(8, 1 << math.ceil(math.log2(max(n, 1))))


def cmd_generate(args, out: TextIO) -> int:
    import jax

    from collapse_jax.families.lm import decoding
    from collapse_jax.families.lm.opt import OPTForCausalLM

    prompts = _read_lines(args.prompt_file, "prompt file")
    if not prompts:
        raise ConfigError(f"prompt file {args.prompt_file} holds no prompts")
    check_int("num-beams", args.num_beams, 1)
    check_int("max-new-tokens", args.max_new_tokens, 1)
    check_int("min-new-tokens", args.min_new_tokens, 0, args.max_new_tokens)
    check_float("repetition-penalty", args.repetition_penalty, 0.0, open_min=True)
    check_float("length-penalty", args.length_penalty)
    check_float("temperature", args.temperature, 0.0, open_min=True)
    check_int("top-k", args.top_k, 0)
    check_float("top-p", args.top_p, 0.0, 1.0)
    check_int("seed", args.seed, 0)
    config, params, tokenizer, dtype = _load(args)
    _check_memory(
        config,
        args.batch_size * args.num_beams,
        f"batch-size {args.batch_size} × num-beams {args.num_beams}",
        config.max_position_embeddings,
    )
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"prompt {i} encodes to no tokens")
    if not encoded:
        return 0
    longest = max(len(ids) for ids in encoded)
    width = min(_bucket(longest), config.max_position_embeddings - args.max_new_tokens)
    if longest + args.max_new_tokens > config.max_position_embeddings:
        raise ConfigError(
            f"longest prompt ({longest} tokens) + max-new-tokens ({args.max_new_tokens}) exceeds "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    model = OPTForCausalLM(config, dtype=dtype)
    fn = decoding.generate_fn(
        model,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty,
        eos_token_id=config.eos_token_id,
        pad_token_id=pad,
    )
    key = jax.random.key(args.seed)
    bs = args.batch_size
    for start in range(0, len(encoded), bs):
        chunk = encoded[start : start + bs]
        rows = chunk + [chunk[0]] * (bs - len(chunk))  # fixed shape: no recompiles
        ids = np.full((bs, width), pad, np.int32)
        mask = np.zeros((bs, width), np.int32)
        for r, p in enumerate(rows):
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = 1
        res = fn(params, ids, mask, jax.random.fold_in(key, start))
        new = np.asarray(res.new_tokens)
        count = np.asarray(res.num_new_tokens)
        scores = None if res.sequences_scores is None else np.asarray(res.sequences_scores)
        for r in range(len(chunk)):
            toks = [int(t) for t in new[r, : int(count[r])]]
            row = {
                "prompt_index": start + r,
                "prompt": prompts[start + r],
                "new_token_ids": toks,
                "num_new_tokens": len(toks),
                "text": tokenizer.decode(toks, skip_special_tokens=True),
            }
            if scores is not None:
                row["score"] = _json_float(float(scores[r]))
            out.write(json.dumps(row) + "\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``collapse-jax lm``; returns the exit status (2 on a ConfigError)."""
    args = build_parser().parse_args(argv)
    try:
        if args.out is None:
            return _dispatch(args, sys.stdout)
        _check_out(args.out)
        with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as out:
            return _dispatch(args, out)
    except ConfigError as err:
        print(f"collapse-jax lm: error: {err}", file=sys.stderr)
        return 2


def _check_out(path: str) -> None:
    """``--out`` must be a file path whose directory exists or can be made."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"out {path} is a directory; give a file path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"out {path}: {parent} is not a directory")
            break


def _dispatch(args, out: TextIO) -> int:
    if args.command == "score":
        return cmd_score(args, out)
    return cmd_generate(args, out)


if __name__ == "__main__":
    sys.exit(main())
