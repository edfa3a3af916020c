"""The language-model study: generations of OPT fine-tuned on their own beam-search text
(Shumailov et al. 2024, Fig. 1b,c and Example 1).

Generation 0 is the base model fine-tuned on the real training blocks (64 tokens each). Every
model then continues each 64-token block of the *original* training set with 64 new tokens
(5-way beam search by default); the continuations form an artificial data set of the same size,
which the shared :func:`~collapse_jax.core.loop.mix_training_data` mixes with fresh original
blocks (``fresh_fractions``, e.g. the paper's 10%) or accumulates, and generation ``g + 1`` is
fine-tuned on the result, starting from the base model (the paper) or from generation ``g``.
Each fine-tune keeps the epoch with the lowest loss on the original validation set.

Without network access there are no pre-trained weights: a built-in model name (``tiny``,
``small``, ``base``) makes the study pre-train a small OPT-architecture model from scratch on a
part of the training text that the regime never uses, and that model plays the "pre-trained
base". With the ``synthetic`` corpus the text comes from a known hidden-Markov source, so the
true log-likelihood of generated text and the true probability mass of the tails it lost are
measured exactly (:mod:`collapse_jax.families.lm.synthetic_language`).

Long runs are safe to interrupt: training writes an Orbax checkpoint after every epoch, each
finished generation leaves its selected weights (Hugging Face safetensors, openable by
``transformers``), its evaluation and its generated data (token ``.npy`` files; generation in
progress is saved in chunks), and ``resume = true`` continues from the last completed step with
the same result as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core import report as rep
from collapse_jax.core.errors import ConfigError, check_choice, check_float, check_int
from collapse_jax.core.flags import flag_updates
from collapse_jax.core.host_loop import Progress, check_resume, generation_key
from collapse_jax.core.policies import Policy, mix_training_data
from collapse_jax.core.runs import RunDir, read_json, series, write_arrays, write_json
from collapse_jax.core.training import maybe_initialize_distributed
from collapse_jax.families.lm import corpora
from collapse_jax.families.lm import text_metrics as tm
from collapse_jax.families.lm import training as lt

NAME = "lm"
DESCRIPTION = "OPT fine-tuned generation after generation on its own beam-search text"

#: Built-in OPT-architecture sizes for offline runs (pre-trained from scratch as the base).
BUILTIN_MODELS = {
    "micro": dict(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=2),
    "small": dict(hidden_size=128, num_hidden_layers=2, ffn_dim=512, num_attention_heads=4),
    "base": dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4),
}
DECODINGS = ("beam", "sample", "greedy")
START_FROM = ("base", "previous")
DISTINCT_N = (1, 2, 3, 4)
REPEAT_N = 4


@dataclasses.dataclass(frozen=True)
class Config:
    """The language-model regime. Defaults: the offline CPU form (synthetic source, tiny OPT)."""

    model: str = "tiny"  # micro | tiny | small | base (offline, pre-trained here) | HF dir | hub id
    tokenizer: str = ""  # tokenizer dir or hub id; "" = the model's, OPT's, or the synthetic one
    corpus: str = "synthetic"  # synthetic | wikitext | directory with train/valid/test.txt
    block_size: int = 64  # tokens per training block and per generated continuation
    train_blocks: int = 128  # real training blocks of the regime (0 = all available)
    eval_blocks: int = 256  # validation and test blocks used (0 = all)
    pretrain_blocks: int = 4096  # built-in models: blocks to pre-train the base on (disjoint)
    pretrain_epochs: int = 3  # built-in models: epochs of base pre-training
    pretrain_learning_rate: float = 3e-3  # built-in models: peak learning rate of pre-training
    generations: int = 5  # generations trained on generated data (after generation 0)
    epochs: int = 5  # fine-tuning epochs per generation
    learning_rate: float = 3e-4  # peak AdamW learning rate of every fine-tune (cosine decay)
    warmup_steps: int = 0  # linear warm-up updates of every fine-tune
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    batch_size: int = 16  # training batch (blocks per update, over all devices)
    grad_accum_steps: int = 1  # micro-batches per update
    seeds: int = 3  # independent repetitions (fine-tune order, dropout, sampling)
    seed: int = 0  # first seed; seeds are seed, seed + 1, ...
    policy: str = "replace"  # replace | accumulate | accumulate-subsample
    fresh_fractions: tuple[float, ...] = (0.0, 0.1)  # one arm per value: original data kept
    start_from: str = "base"  # base (the paper) | previous generation's weights
    select_by_validation: bool = True  # keep the epoch with the lowest validation loss
    decoding: str = "beam"  # beam | sample | greedy
    num_beams: int = 5  # beams of beam search
    repetition_penalty: float = 1.0  # HF repetition penalty (the paper's ablation: 2.0)
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sampling top-k (0 = off)
    top_p: float = 1.0  # sampling nucleus (1 = off)
    generate_batch_size: int = 64  # prompts per decoding call
    eval_batch_size: int = 64  # blocks per scoring call
    n_prompts: int = 3  # fixed test prompts whose continuations are shown per generation
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    synthetic_vocab: int = 128  # synthetic corpus: word tokens V
    synthetic_states: int = 16  # synthetic corpus: hidden states S
    synthetic_seed: int = 0  # synthetic corpus: seed of the source's parameters
    synthetic_blocks: int = (
        8192  # synthetic corpus: training-text blocks sampled (incl. pre-training)
    )
    tail_mass: float = 0.1  # synthetic corpus: the source's tail = rarest words with this mass
    keep_models: bool = False  # keep every generation's weights (else generation 0 and latest)
    resume: bool = False  # continue an interrupted run in the same directory


# --------------------------------------------------------------------------------------------
# Validation and command-line flags


def validate(config: Config) -> Config:
    """Check every field (cheap checks; corpus/model checks happen in :func:`prepare`)."""
    fr = config.fresh_fractions
    if isinstance(fr, int | float):
        fr = (fr,)
    if isinstance(fr, str):
        fr = tuple(float(v) for v in fr.split(",") if v.strip())
    fr = tuple(check_float("fresh fraction (keep-fraction)", v, 0.0, 1.0) for v in fr)
    if not fr:
        raise ConfigError("fresh_fractions needs at least one value")
    config = dataclasses.replace(config, fresh_fractions=fr)
    for v in fr:
        Policy.parse(config.policy, v)
    if config.policy not in ("replace", "accumulate", "accumulate-subsample"):
        raise ConfigError(
            f"lm policy {config.policy!r} is not supported; choose replace, accumulate or "
            "accumulate-subsample (keep original data with fresh_fractions)"
        )
    check_int("block_size", config.block_size, 2)
    check_int("train_blocks", config.train_blocks, 0)
    check_int("eval_blocks", config.eval_blocks, 0)
    check_int("pretrain_blocks", config.pretrain_blocks, 0)
    check_int("pretrain_epochs", config.pretrain_epochs, 0)
    check_float("pretrain_learning_rate", config.pretrain_learning_rate, 0.0, open_min=True)
    check_int("generations", config.generations, 0)
    check_int("epochs", config.epochs, 1)
    check_float("learning_rate", config.learning_rate, 0.0, open_min=True)
    check_int("warmup_steps", config.warmup_steps, 0)
    check_float("weight_decay", config.weight_decay, 0.0)
    check_int("batch_size", config.batch_size, 1)
    check_int("grad_accum_steps", config.grad_accum_steps, 1)
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
            f"{config.grad_accum_steps}"
        )
    check_int("seeds", config.seeds, 1)
    check_int("seed", config.seed, 0)
    check_choice("start_from", config.start_from, START_FROM)
    check_choice("decoding", config.decoding, DECODINGS)
    check_int("num_beams", config.num_beams, 1)
    check_float("repetition_penalty", config.repetition_penalty, 0.0, open_min=True)
    check_float("temperature", config.temperature, 0.0, open_min=True)
    check_int("top_k", config.top_k, 0)
    check_float("top_p", config.top_p, 0.0, 1.0, open_min=True)
    check_int("generate_batch_size", config.generate_batch_size, 1)
    check_int("eval_batch_size", config.eval_batch_size, 1)
    check_int("n_prompts", config.n_prompts, 0)
    check_choice("dtype", config.dtype, ("float32", "bfloat16"))
    check_int("synthetic_vocab", config.synthetic_vocab, 2)
    check_int("synthetic_states", config.synthetic_states, 1)
    check_int("synthetic_seed", config.synthetic_seed, 0)
    check_int("synthetic_blocks", config.synthetic_blocks, 2)
    check_float("tail_mass", config.tail_mass, 0.0, 1.0)
    if not config.model:
        raise ConfigError("model must be a built-in size, a directory or a hub id")
    if config.model in BUILTIN_MODELS and config.pretrain_epochs > 0:
        check_int("pretrain_blocks (built-in model)", config.pretrain_blocks, 1)
    return config


def demo_config() -> Config:
    """A short run for `collapse-jax demo` (about a minute on 2 CPU cores)."""
    return Config(
        train_blocks=32,
        eval_blocks=64,
        pretrain_blocks=512,
        pretrain_epochs=1,
        generations=2,
        epochs=2,
        seeds=2,
        synthetic_blocks=1024,
        n_prompts=2,
    )


_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "micro | tiny | small | base (offline) | Hugging Face directory | hub id"),
    "tokenizer": (str, "tokenizer directory or hub id (default: the model's)"),
    "corpus": (str, "synthetic | wikitext | directory with train/valid/test.txt"),
    "block_size": (int, "tokens per block and per generated continuation (64)"),
    "train_blocks": (int, "real training blocks used by the regime (0 = all)"),
    "eval_blocks": (int, "validation/test blocks used (0 = all)"),
    "pretrain_blocks": (int, "built-in models: blocks used to pre-train the base"),
    "pretrain_epochs": (int, "built-in models: epochs of base pre-training"),
    "pretrain_learning_rate": (float, "built-in models: peak learning rate of pre-training"),
    "generations": (int, "generations trained on generated data"),
    "epochs": (int, "fine-tuning epochs per generation"),
    "learning_rate": (float, "peak learning rate of each fine-tune"),
    "warmup_steps": (int, "warm-up updates of each fine-tune"),
    "weight_decay": (float, "AdamW weight decay"),
    "batch_size": (int, "blocks per update (all devices)"),
    "grad_accum_steps": (int, "micro-batches per update"),
    "seeds": (int, "independent repetitions"),
    "seed": (int, "first seed"),
    "policy": (str, "replace | accumulate | accumulate-subsample"),
    "start_from": (str, "base | previous"),
    "decoding": (str, "beam | sample | greedy"),
    "num_beams": (int, "beams of beam search"),
    "repetition_penalty": (float, "repetition penalty (1 = off)"),
    "temperature": (float, "sampling temperature"),
    "top_k": (int, "sampling top-k (0 = off)"),
    "top_p": (float, "sampling nucleus (1 = off)"),
    "generate_batch_size": (int, "prompts per decoding call"),
    "eval_batch_size": (int, "blocks per scoring call"),
    "n_prompts": (int, "fixed prompts shown across generations"),
    "dtype": (str, "float32 | bfloat16"),
    "synthetic_vocab": (int, "synthetic corpus: word tokens"),
    "synthetic_states": (int, "synthetic corpus: hidden states"),
    "synthetic_seed": (int, "synthetic corpus: seed of the source"),
    "synthetic_blocks": (int, "synthetic corpus: training-text blocks"),
    "tail_mass": (float, "synthetic corpus: mass of the source's tail"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags; unset flags leave the config (default or file) unchanged."""
    for name, (typ, help_) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    parser.add_argument(
        "--fresh-fractions",
        "--keep-fraction",
        dest="fresh_fractions",
        default=None,
        help="comma-separated fractions of original data kept each generation, one arm each "
        "(e.g. 0,0.1)",
    )
    for name, help_ in (
        ("select_by_validation", "keep the epoch with the lowest validation loss"),
        ("keep_models", "keep every generation's weights"),
        ("resume", "continue an interrupted run in --out"),
    ):
        flag = name.replace("_", "-")
        parser.add_argument(
            f"--{flag}", dest=name, action="store_const", const=True, default=None, help=help_
        )
        if name != "resume":
            parser.add_argument(f"--no-{flag}", dest=name, action="store_const", const=False)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    updates = flag_updates(args, Config)
    if isinstance(updates.get("fresh_fractions"), str):
        try:
            updates["fresh_fractions"] = tuple(
                float(v) for v in updates["fresh_fractions"].split(",") if v.strip()
            )
        except ValueError:
            raise ConfigError(
                f"--fresh-fractions {args.fresh_fractions!r} must be comma-separated numbers"
            ) from None
    return validate(dataclasses.replace(base, **updates))


# --------------------------------------------------------------------------------------------
# Set-up: corpus, tokenizer, model; every check before any training


class Setup(NamedTuple):
    """Everything fixed before training starts."""

    model_config: Any  # OPTConfig
    base_dir: Path | None  # Hugging Face directory of the base model (None: pre-train it)
    tokenizer: Any
    train: np.ndarray  # (N, block) real training blocks of the regime
    pretrain: np.ndarray  # (P, block) blocks for base pre-training (built-in models)
    validation: np.ndarray
    test: np.ndarray
    prompts: np.ndarray  # (n_prompts, block) fixed Example-1 prompts (test blocks)
    source: Any  # HMMSource for the synthetic corpus, else None
    corpus_source: str


def _cap(blocks: np.ndarray, n: int) -> np.ndarray:
    return blocks if n == 0 else blocks[:n]


def prepare(config: Config) -> Setup:
    """Load the model configuration, tokenizer and corpus and check that they fit together.

    Raises :class:`ConfigError` (before anything is trained) for a block size above the model's
    positions, a tokenizer/model vocabulary mismatch, or an empty or too small corpus. The model
    and tokenizer are checked first, so those errors come before the corpus is even read.
    """
    from collapse_jax.families.lm.opt import OPTConfig
    from collapse_jax.families.lm.opt_weights import resolve_model_dir

    block = config.block_size
    builtin = config.model in BUILTIN_MODELS
    synthetic = config.corpus == "synthetic"
    base_dir = None if builtin else resolve_model_dir(config.model)
    if synthetic:
        from collapse_jax.families.lm import synthetic_language as sl

        if config.tokenizer:
            raise ConfigError("the synthetic corpus has its own tokenizer; leave tokenizer empty")
        tokenizer = sl.make_tokenizer(config.synthetic_vocab)
    else:
        tokenizer = corpora.load_tokenizer(config.tokenizer or (None if builtin else base_dir))

    if builtin:
        model_config = OPTConfig(
            vocab_size=-(-corpora.tokenizer_vocab_size(tokenizer) // 8) * 8,
            max_position_embeddings=max(2 * block, 128),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **BUILTIN_MODELS[config.model],
        )
    else:
        model_config = OPTConfig.from_hf(base_dir)
    corpora.check_vocab(tokenizer, model_config.vocab_size)
    if 2 * block > model_config.max_position_embeddings:
        raise ConfigError(
            f"block_size {block} is too long for the model: a block plus its {block}-token "
            f"continuation needs {2 * block} positions, the model has "
            f"max_position_embeddings {model_config.max_position_embeddings}"
        )
    n_pre = config.pretrain_blocks if builtin and config.pretrain_epochs > 0 else 0
    if synthetic and n_pre >= config.synthetic_blocks:
        raise ConfigError(
            f"pretrain_blocks {n_pre} leaves no training blocks for the regime: "
            f"synthetic_blocks is {config.synthetic_blocks}"
        )

    source = None
    if synthetic:
        scfg = sl.SourceConfig(
            vocab_size=config.synthetic_vocab,
            n_states=config.synthetic_states,
            seed=config.synthetic_seed,
        )
        n_eval = config.eval_blocks or 1024
        corpus = sl.make_corpus(
            jax.random.key(config.synthetic_seed + 1),
            scfg,
            block,
            config.synthetic_blocks,
            n_eval,
            n_eval,
        )
        text_train, validation, test = corpus.train, corpus.validation, corpus.test
        source = corpus.source
        corpus_source = (
            f"synthetic hidden-Markov source (V={scfg.vocab_size}, S={scfg.n_states}, "
            f"seed {scfg.seed})"
        )
    else:
        splits = corpora.load_text_splits(config.corpus)
        tc = corpora.build_token_corpus(splits, tokenizer, block)
        text_train, validation, test = tc.train, tc.validation, tc.test
        corpus_source = tc.source

    validation = _cap(validation, config.eval_blocks)
    test = _cap(test, config.eval_blocks)
    # Built-in models are pre-trained on the first blocks; the regime uses the next ones.
    if n_pre >= len(text_train):
        raise ConfigError(
            f"pretrain_blocks {n_pre} leaves no training blocks for the regime: the corpus has "
            f"{len(text_train)} training blocks of {block} tokens"
        )
    pretrain, train = text_train[:n_pre], text_train[n_pre:]
    train = _cap(train, config.train_blocks)
    if config.train_blocks and len(train) < config.train_blocks:
        raise ConfigError(
            f"train_blocks {config.train_blocks} exceeds the {len(train)} training blocks left "
            f"after pre-training"
        )
    if len(train) < config.batch_size:
        raise ConfigError(
            f"empty corpus for batch_size {config.batch_size}: only {len(train)} training blocks"
        )
    n_dev = jax.device_count()
    if n_dev > 1 and config.batch_size % n_dev:
        raise ConfigError(
            f"batch_size {config.batch_size} must be divisible by the {n_dev} devices"
        )
    for name, arr in (("train", train), ("validation", validation), ("test", test)):
        corpora.check_blocks(name, arr, model_config.vocab_size)
    prompts = test[: min(config.n_prompts, len(test))]
    return Setup(
        model_config,
        base_dir,
        tokenizer,
        train,
        pretrain,
        validation,
        test,
        prompts,
        source,
        corpus_source,
    )


def _dtype(config: Config):
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


# --------------------------------------------------------------------------------------------
# Generation with chunked saves


def make_decode_fn(model_config, config: Config, tokenizer) -> Callable:
    """The jitted decoder ``fn(params, prompts, key) -> new tokens [n, block]`` for the config."""
    from collapse_jax.families.lm import decoding as dec
    from collapse_jax.families.lm.opt import OPTForCausalLM

    module = OPTForCausalLM(model_config, dtype=_dtype(config))
    block = config.block_size
    fn = dec.generate_fn(
        module,
        max_new_tokens=block,
        min_new_tokens=block,
        num_beams=config.num_beams if config.decoding == "beam" else 1,
        do_sample=config.decoding == "sample",
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def decode(params, prompts, key):
        # One host: prompts split over the devices. Several hosts: every process decodes the
        # whole batch (the decoder validates its prompts on the host, which needs them whole).
        rows = lt.put_rows(prompts) if jax.process_count() == 1 else prompts
        out = fn(params, rows, None, key)
        return lt.gather(out.new_tokens)

    return decode


def generate_batch(decode: Callable, params, prompts: np.ndarray, key) -> np.ndarray:
    """One decoding call (a module-level function so that tests can count calls)."""
    return np.asarray(decode(params, prompts, key), np.int32)


def generate_all(
    decode: Callable,
    params,
    prompts: np.ndarray,
    *,
    batch_size: int,
    key,
    out_path: Path,
    progress: Progress,
    label: str,
) -> np.ndarray:
    """Continue every prompt; save the finished rows after every batch so that an interrupted
    generation resumes where it stopped. The result is written to ``out_path`` (``.npy``).

    Batch ``i`` uses key ``fold_in(key, i)`` and the last batch is padded with copies of its
    first prompt, so the result does not depend on where a run was interrupted.
    """
    if out_path.exists():
        return np.load(out_path)
    partial = out_path.with_suffix(".partial.npz")
    n, t = prompts.shape
    done = np.zeros((0, t), np.int32)
    if partial.exists():
        with np.load(partial) as z:
            done = z["tokens"]
    n_batches = -(-n // batch_size)
    first = len(done) // batch_size
    progress.start(n_batches - first, label)
    chunks = [done]
    for i in range(first, n_batches):
        rows = prompts[i * batch_size : (i + 1) * batch_size]
        k = len(rows)
        if k < batch_size:
            rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - k, 0)])
        new = generate_batch(decode, params, rows, jax.random.fold_in(key, i))[:k]
        chunks.append(new)
        if lt.is_main() and i < n_batches - 1:
            write_arrays(partial, tokens=np.concatenate(chunks))
        progress.advance()
    progress.finish()
    tokens = np.concatenate(chunks).astype(np.int32)
    if lt.is_main():
        _save_npy(out_path, tokens)
        partial.unlink(missing_ok=True)
    return tokens


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from collapse_jax.core.runs import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


# --------------------------------------------------------------------------------------------
# Models on disk


def _model_done(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _save_model(params, model_config, d: Path, tokenizer) -> None:
    from collapse_jax.families.lm.opt_weights import save_pretrained

    tmp = d.with_name(d.name + ".tmp")
    if lt.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if lt.is_main():
        save_pretrained(jax.device_get(params), model_config, tmp, tokenizer=tokenizer)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    lt.sync(f"saved {d}")


def _load_model(d: Path):
    from collapse_jax.families.lm.opt_weights import load_pretrained

    _, params = load_pretrained(d)
    return params


# --------------------------------------------------------------------------------------------
# The regime


PRETRAIN = 999_999  # arm code of the base model's pre-training keys


def _arm_code(arm: int | None) -> int:
    """0 for the shared generation 0, ``arm + 1`` for an arm's generations."""
    return 0 if arm is None else arm + 1


class Regime:
    """One run of the study: owns the work directory and every stage's cached result."""

    def __init__(self, config: Config, setup: Setup, work: Path, progress: bool | None):
        self.config, self.setup, self.work = config, setup, work
        self.progress = Progress(progress, "lm")
        self.decode = make_decode_fn(setup.model_config, config, setup.tokenizer)
        self.dtype = _dtype(config)
        self.base_params = None

    def key(self, seed: int, arm: int | None, g: int, part: int) -> jax.Array:
        """The key of a stage of generation ``g`` of chain ``(seed, arm)``: the host loop's
        :func:`~collapse_jax.core.host_loop.generation_key` with the arm folded in before the
        generation (the streams of earlier versions of this study); ``part`` 0 trains,
        1 generates the next data set, 2 continues the fixed prompts."""
        return generation_key(seed, _arm_code(arm), g, part)

    def label(self, seed: int, arm: int | None, g: int) -> str:
        return f"seed {seed} arm {arm if arm is not None else '-'} gen {g}"

    # -- the base model
    def base(self):
        if self.base_params is not None:
            return self.base_params
        s, c = self.setup, self.config
        if s.base_dir is not None:
            self.base_params = _load_model(s.base_dir)
            return self.base_params
        d = self.work / "base" / "model"
        if not _model_done(d):
            params = jax.device_get(lt.init_model_params(s.model_config, c.seed))
            if c.pretrain_epochs > 0:
                res = lt.train_model(
                    s.model_config,
                    params,
                    s.pretrain,
                    s.validation,
                    epochs=c.pretrain_epochs,
                    learning_rate=c.pretrain_learning_rate,
                    config=c,
                    key=generation_key(c.seed, PRETRAIN, 0),
                    order_seed=(c.seed, PRETRAIN, 0),
                    ckpt_dir=self.work / "base" / "ckpt",
                    progress=self.progress.named("pre-train base"),
                )
                params = res.params
                write_arrays(
                    self.work / "base" / "train.npz",
                    train_loss=res.train_loss,
                    val_loss=res.val_loss,
                    best_epoch=res.best_epoch,
                )
            _save_model(params, s.model_config, d, s.tokenizer)
            shutil.rmtree(self.work / "base" / "ckpt", ignore_errors=True)
        self.base_params = _load_model(d)
        return self.base_params

    # -- one generation's model
    def gen_dir(self, seed: int, arm: int | None, g: int) -> Path:
        if g == 0:
            return self.work / f"seed{seed}" / "gen00"
        return self.work / f"seed{seed}" / f"arm{arm}" / f"gen{g:02d}"

    def train_generation(self, seed: int, arm: int | None, g: int, data: np.ndarray):
        """Fine-tune, evaluate and save generation ``g``; a no-op when already done."""
        s, c = self.setup, self.config
        d = self.gen_dir(seed, arm, g)
        if _model_done(d / "model") and (d / "eval.npz").is_file():
            return
        if c.start_from == "previous" and g > 0:
            init = _load_model(self.gen_dir(seed, arm, g - 1) / "model")
        else:
            init = self.base()
        res = lt.train_model(
            s.model_config,
            init,
            data,
            s.validation,
            epochs=c.epochs,
            learning_rate=c.learning_rate,
            config=c,
            key=self.key(seed, arm, g, 0),
            order_seed=(seed, _arm_code(arm), g),
            ckpt_dir=d / "ckpt",
            progress=self.progress.named(f"{self.label(seed, arm, g)}: train"),
        )
        nll, cnt = lt.score_blocks(
            s.model_config, lt.device_params(res.params), s.test, c.eval_batch_size, self.dtype
        )
        _save_model(res.params, s.model_config, d / "model", s.tokenizer)
        if lt.is_main():
            write_arrays(
                d / "eval.npz",
                test_nll_sum=nll,
                test_count=cnt,
                train_loss=res.train_loss,
                val_loss=res.val_loss,
                best_epoch=res.best_epoch,
            )
            shutil.rmtree(d / "ckpt", ignore_errors=True)
        lt.sync(f"evaluated {d}")

    def generated(self, seed: int, arm: int | None, g: int) -> np.ndarray:
        """Continuations by generation ``g`` of every original training block (cached)."""
        d = self.gen_dir(seed, arm, g)
        params = None
        path = d / "generated.npy"
        if not path.exists():
            params = lt.device_params(_load_model(d / "model"))
        key = self.key(seed, arm, g, 1)
        return generate_all(
            self.decode,
            params,
            self.setup.train,
            batch_size=self.config.generate_batch_size,
            key=key,
            out_path=path,
            progress=self.progress,
            label=f"{self.label(seed, arm, g)}: generate",
        )

    def continuations(self, seed: int, arm: int | None, g: int) -> np.ndarray:
        """Continuations of the fixed prompts (Example 1) by generation ``g``."""
        d = self.gen_dir(seed, arm, g)
        path = d / "prompts_generated.npy"
        if len(self.setup.prompts) == 0:
            return np.zeros((0, self.config.block_size), np.int32)
        if path.exists():
            return np.load(path)
        params = lt.device_params(_load_model(d / "model"))
        rows = self.setup.prompts
        n_dev = jax.device_count()
        pad = -(-len(rows) // n_dev) * n_dev - len(rows)  # one small shape for all generations
        padded = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
        key = self.key(seed, arm, g, 2)
        out = generate_batch(self.decode, params, padded, key)[: len(rows)]
        if lt.is_main():
            _save_npy(path, out)
        return out

    def training_data(self, seed: int, arm: int, g: int, previous, pool):
        """The training set of generation ``g >= 1`` for an arm (cached as ``train.npy``)."""
        d = self.gen_dir(seed, arm, g)
        path = d / "train.npy"
        if path.exists():
            data = np.load(path)
            pool_path = d / "pool.npy"
            return data, (np.load(pool_path) if pool_path.exists() else None)
        c = self.config
        policy = Policy.parse(c.policy, c.fresh_fractions[arm])
        src_arm = None if g == 1 else arm
        generated = self.generated(seed, src_arm, g - 1)
        rng = np.random.default_rng((seed, arm, g, 7))

        def sample_model(n: int) -> np.ndarray:
            if n == len(generated):
                return generated
            return generated[np.sort(rng.choice(len(generated), n, replace=False))]

        data, pool = mix_training_data(
            rng, policy, len(self.setup.train), sample_model, previous, self.setup.train, pool
        )
        if lt.is_main():
            d.mkdir(parents=True, exist_ok=True)
            _save_npy(path, data.astype(np.int32))
            if pool is not None and pool is not data:
                _save_npy(d / "pool.npy", pool.astype(np.int32))
        return data, pool

    def cleanup(self, seed: int, arm: int, g: int) -> None:
        """Drop weights no longer needed (all but generation 0 and the latest)."""
        if self.config.keep_models or g < 2 or not lt.is_main():
            return
        old = self.gen_dir(seed, arm, g - 1)
        shown = (old / "prompts_generated.npy").exists() or not self.shows_prompts(seed)
        if (old / "generated.npy").exists() and shown:
            shutil.rmtree(old / "model", ignore_errors=True)

    def shows_prompts(self, seed: int) -> bool:
        """Continuations of the fixed prompts are made by the first seed's models only."""
        return len(self.setup.prompts) > 0 and seed == self.config.seed


# --------------------------------------------------------------------------------------------
# Running


def run(config: Config, out_dir, *, progress: bool | None = None) -> dict:
    """Run the regime (see the module docstring) and write arrays, figures and the report."""
    config = validate(config)
    maybe_initialize_distributed()  # a no-op unless the environment describes several hosts
    rd = RunDir(out_dir)
    work = rd.file("work")
    check_resume(config, rd, started=work.exists() and any(work.iterdir()))
    setup = prepare(config)  # all corpus/model checks before any training
    if lt.is_main():
        rd.write_config(config, NAME)
    regime = Regime(config, setup, work, progress)
    t0 = time.perf_counter()
    G, arms = config.generations, len(config.fresh_fractions)
    seeds = [config.seed + i for i in range(config.seeds)]
    for seed in seeds:
        regime.train_generation(seed, None, 0, setup.train)
        if regime.shows_prompts(seed):
            regime.continuations(seed, None, 0)
        for arm in range(arms):
            previous, pool = setup.train, None
            for g in range(1, G + 1):
                data, pool = regime.training_data(seed, arm, g, previous, pool)
                regime.train_generation(seed, arm, g, data)
                if regime.shows_prompts(seed):
                    regime.continuations(seed, arm, g)
                if g < G:
                    regime.generated(seed, arm, g)
                regime.cleanup(seed, arm, g)
                previous = data
    arrays = collect(regime, seeds)
    # Wall time summed over every invocation (an interrupted run resumed counts all its parts).
    elapsed_path = work / "elapsed.json"
    before = read_json(elapsed_path) if elapsed_path.exists() else {"seconds": 0.0, "runs": 0}
    seconds = float(before["seconds"]) + time.perf_counter() - t0
    if lt.is_main():
        write_json(elapsed_path, {"seconds": seconds, "runs": int(before["runs"]) + 1})
    arrays["seconds"] = np.float64(seconds)
    if not lt.is_main():
        return {}
    rd.write_metrics(**arrays)
    summary = summarize(config, setup, arrays)
    rd.write_summary(summary)
    write_report(rd, config, setup, summary)
    return summary


# --------------------------------------------------------------------------------------------
# Metrics assembled from the work directory


def collect(regime: Regime, seeds: list[int]) -> dict[str, np.ndarray]:
    """All per-generation metrics as arrays (arms × seeds × generations, and histograms)."""
    lt.sync("collect")
    c, s = regime.config, regime.setup
    G, A, S = c.generations, len(c.fresh_fractions), len(seeds)
    test_ppl = np.zeros((A, S, G + 1))
    val_loss = np.zeros((A, S, G + 1))
    best_epoch = np.zeros((A, S, G + 1), np.int64)
    rep_frac = np.full((A, S, G + 1), np.nan)
    distinct = np.full((A, S, G + 1, len(DISTINCT_N)), np.nan)
    gen_nll = [[[] for _ in range(G)] for _ in range(A)]  # model g's data scored by gen 0
    test_nll_seq = np.zeros((A, S, G + 1, len(s.test)))
    cont = np.zeros((A, G + 1, len(s.prompts), c.block_size), np.int32)
    real_scored = []
    synth = s.source is not None
    if synth:
        from collapse_jax.families.lm import synthetic_language as sl

        true_nll = np.full((A, S, G + 1), np.nan)
        true_cond = np.full((A, S, G + 1), np.nan)
        uni_lost = np.full((A, S, G + 1), np.nan)
        bi_lost = np.full((A, S, G + 1), np.nan)
        tail_freq = np.full((A, S, G + 1), np.nan)
        invalid = np.full((A, S, G + 1), np.nan)
    for si, seed in enumerate(seeds):
        gen0 = lt.device_params(_load_model(regime.gen_dir(seed, None, 0) / "model"))
        nll, cnt = lt.score_blocks(s.model_config, gen0, s.train, c.eval_batch_size, regime.dtype)
        real_scored.append(nll / cnt)
        for a in range(A):
            for g in range(G + 1):
                arm = None if g == 0 else a
                d = regime.gen_dir(seed, arm, g)
                with np.load(d / "eval.npz") as z:
                    test_nll_seq[a, si, g] = z["test_nll_sum"] / z["test_count"]
                    test_ppl[a, si, g] = math.exp(lt.corpus_nll(z["test_nll_sum"], z["test_count"]))
                    val_loss[a, si, g] = z["val_loss"][int(z["best_epoch"]) - 1]
                    best_epoch[a, si, g] = int(z["best_epoch"])
                if si == 0 and len(s.prompts):
                    cont[a, g] = np.load(d / "prompts_generated.npy")
                if g == G:
                    continue
                data = regime.generated(seed, arm, g)
                scores_path = d / "scored_by_gen0.npz"
                if scores_path.exists():
                    with np.load(scores_path) as z:
                        gnll, gcnt = z["nll_sum"], z["count"]
                else:
                    gnll, gcnt = lt.score_blocks(
                        s.model_config, gen0, data, c.eval_batch_size, regime.dtype
                    )
                    if lt.is_main():
                        write_arrays(scores_path, nll_sum=gnll, count=gcnt)
                gen_nll[a][g].append(gnll / gcnt)
                rep_frac[a, si, g] = float(tm.repeated_ngram_fraction(data, REPEAT_N).mean())
                for j, n in enumerate(DISTINCT_N):
                    distinct[a, si, g, j] = tm.distinct_n(data, n)
                if synth:
                    st = sl.tail_stats(s.source, data, c.tail_mass)
                    true_nll[a, si, g] = float(np.mean(st.true_nll))
                    cond = (
                        -np.asarray(
                            sl.conditional_log_likelihood(
                                s.source, jnp.asarray(s.train), jnp.asarray(data)
                            )
                        )
                        / c.block_size
                    )
                    true_cond[a, si, g] = float(np.mean(cond))
                    uni_lost[a, si, g] = st.unigram_lost_mass
                    bi_lost[a, si, g] = st.bigram_lost_mass
                    tail_freq[a, si, g] = st.tail_frequency
                    invalid[a, si, g] = st.invalid_fraction
    real_ppl = np.exp(np.concatenate(real_scored))
    real_test_ppl = np.exp(test_nll_seq[0, :, 0].ravel())
    gen_ppl = [[np.exp(np.concatenate(gen_nll[a][g])) for g in range(G)] for a in range(A)]
    rows = [real_ppl] + [x for arm_rows in gen_ppl for x in arm_rows]
    edges = tm.log_bins(rows, 40)
    hist = (
        np.stack([tm.histograms(gen_ppl[a], edges) for a in range(A)])
        if G
        else np.zeros((A, 0, 40))
    )
    out = {
        "generation": np.arange(G + 1),
        "fresh_fractions": np.asarray(c.fresh_fractions, np.float64),
        "seeds": np.asarray(seeds),
        "test_perplexity": test_ppl,
        "test_nll_per_sequence": test_nll_seq,
        "val_loss": val_loss,
        "best_epoch": best_epoch,
        "repeated_ngram_fraction": rep_frac,
        "distinct_n": distinct,
        "distinct_n_orders": np.asarray(DISTINCT_N),
        "hist_edges": edges,
        "hist_generated": hist,  # (arms, generations 0..G-1, bins): model g's data, by gen 0
        "hist_real_train": tm.histogram(real_ppl, edges),
        "hist_real_test": tm.histogram(real_test_ppl, edges),
        "real_train_perplexity_by_gen0": real_ppl,
        "real_repeated_ngram_fraction": np.float64(
            tm.repeated_ngram_fraction(s.train, REPEAT_N).mean()
        ),
        "real_distinct_n": np.asarray([tm.distinct_n(s.train, n) for n in DISTINCT_N]),
        "prompts": s.prompts,
        "continuations": cont,  # (arms, generations, prompts, block), seed 0
    }
    for a in range(A):
        for g in range(G):
            out[f"generated_perplexity_by_gen0_arm{a}_gen{g}"] = gen_ppl[a][g]
    if synth:
        st = sl.tail_stats(s.source, s.train, c.tail_mass)
        test_true = sl.tail_stats(s.source, s.test, c.tail_mass).true_nll
        out.update(
            true_nll_generated=true_nll,
            true_conditional_nll_generated=true_cond,
            unigram_lost_mass=uni_lost,
            bigram_lost_mass=bi_lost,
            tail_frequency=tail_freq,
            invalid_fraction=invalid,
            real_true_nll=np.float64(np.mean(st.true_nll)),
            real_unigram_lost_mass=np.float64(st.unigram_lost_mass),
            real_bigram_lost_mass=np.float64(st.bigram_lost_mass),
            real_tail_frequency=np.float64(st.tail_frequency),
            test_true_nll_per_sequence=test_true,
            source_test_perplexity=np.float64(_source_perplexity(s.source, s.test)),
            source_tail_mass=np.float64(
                np.asarray(sl.unigram_marginal(s.source))[
                    sl.tail_set(sl.unigram_marginal(s.source), c.tail_mass)
                ].sum()
            ),
        )
    return out


def _source_perplexity(source, blocks: np.ndarray) -> float:
    """The true source's perplexity on the scored targets of ``blocks`` (tokens 2..T given their
    prefix): exp(sum_b [log p(x_1) - log p(x_1..x_T)] / (n (T - 1))), exact by the forward
    algorithm; no model can do better in expectation."""
    from collapse_jax.families.lm import synthetic_language as sl

    ll = np.asarray(sl.log_likelihood(source, jnp.asarray(blocks)), np.float64)
    first = np.log(np.asarray(sl.unigram_marginal(source), np.float64))[blocks[:, 0]]
    return math.exp(float((first - ll).sum()) / (blocks.shape[0] * (blocks.shape[1] - 1)))


def _stats(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over ``axis`` ignoring NaN (all-NaN entries stay NaN)."""
    import warnings

    x = np.asarray(x, np.float64)
    n = x.shape[axis]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no data there
        mean = np.nanmean(x, axis=axis)
        sd = np.nanstd(x, axis=axis, ddof=1) if n > 1 else np.zeros_like(mean)
    return mean, sd / math.sqrt(n)


def summarize(config: Config, setup: Setup, arrays: dict) -> dict:
    """summary.json: per-arm series (mean ± stderr over seeds) and the headline changes."""
    gens = arrays["generation"]
    out: dict[str, Any] = {
        "study": NAME,
        "corpus": setup.corpus_source,
        "model": config.model,
        "seconds": float(arrays["seconds"]),
        "arms": [],
    }
    for a, f in enumerate(config.fresh_fractions):
        arm: dict[str, Any] = {"fresh_fraction": f}
        ppl = arrays["test_perplexity"][a]
        arm["test_perplexity"] = series(gens, *_stats(ppl))
        change = ppl[:, -1] - ppl[:, 0]
        m, se = _stats(change[:, None])
        arm["perplexity_change"] = {"mean": float(m[0]), "stderr": float(se[0])}
        arm["repeated_ngram_fraction"] = series(gens, *_stats(arrays["repeated_ngram_fraction"][a]))
        arm["distinct_2"] = series(gens, *_stats(arrays["distinct_n"][a, :, :, 1]))
        if "true_nll_generated" in arrays:
            for key in (
                "true_nll_generated",
                "unigram_lost_mass",
                "bigram_lost_mass",
                "tail_frequency",
            ):
                arm[key] = series(gens, *_stats(arrays[key][a]))
        out["arms"].append(arm)
    for a, f in enumerate(config.fresh_fractions):
        out[f"test_perplexity_fresh{f:g}"] = out["arms"][a]["test_perplexity"]
    return out


# --------------------------------------------------------------------------------------------
# Figures and report (from the saved arrays only)


def _arm_label(f: float) -> str:
    return "no original data" if f == 0 else f"{f:.0%} original data"


def _log_x(ax) -> None:
    """Log x axis with plain major labels only (minor labels overlap on short ranges)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def write_figures(rd: RunDir, arrays: dict) -> list[tuple[str, str]]:
    """Draw every figure from ``metrics.npz`` arrays; return (file, caption) pairs."""
    import matplotlib.pyplot as plt

    from collapse_jax.core.runs import save_figure

    figs = []
    gens = arrays["generation"]
    fr = arrays["fresh_fractions"]
    A = len(fr)
    # Test perplexity: mean ± 2 stderr over seeds, seeds as thin lines (the paper's right panels).
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 3.6), squeeze=False, sharey=True)
    for a, ax in enumerate(axes[0]):
        ppl = arrays["test_perplexity"][a]
        for row in ppl:
            ax.plot(gens, row, color="0.6", lw=0.8)
        m, se = _stats(ppl)
        rep.band(ax, gens, m, se, label="mean ± 2 stderr")
        if "source_test_perplexity" in arrays:
            ax.axhline(
                float(arrays["source_test_perplexity"]),
                color="k",
                ls="--",
                label="true source (floor)",
            )
        ax.set_title(_arm_label(fr[a]))
        ax.set_xlabel("generation")
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, rd.file("test_perplexity.png"))
    figs.append(("test_perplexity.png", "Test perplexity per generation; grey: each seed."))

    # Per-sequence perplexity histograms, 2-D overlay (the paper's left panels).
    edges = arrays["hist_edges"]
    centers = np.sqrt(edges[1:] * edges[:-1])
    hist = arrays["hist_generated"]
    G = hist.shape[1]
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 3.6), squeeze=False, sharey=True)
    for a, ax in enumerate(axes[0]):
        for g in range(G):
            ax.plot(
                centers,
                hist[a, g],
                color=cmap(g / max(G - 1, 1)),
                lw=1.2,
                label=f"generation {g}" if g in (0, G - 1) or G <= 5 else None,
            )
        ax.plot(centers, arrays["hist_real_train"], "k--", lw=1.2, label="real training data")
        ax.plot(centers, arrays["hist_real_test"], "k:", lw=1.2, label="real test data")
        _log_x(ax)
        ax.set_xlabel("perplexity under the generation-0 model")
        ax.set_ylabel("density (per log perplexity)")
        ax.set_title(_arm_label(fr[a]))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(fig, rd.file("perplexity_histograms.png"))
    figs.append(
        (
            "perplexity_histograms.png",
            "Per-sequence perplexity of each generation's generated data, scored by the "
            "generation-0 model; dashed: the real training data.",
        )
    )

    # Ridgeline: one offset curve per generation.
    fig, axes = plt.subplots(1, A, figsize=(5 * A, 0.6 * (G + 2) + 1.5), squeeze=False)
    for a, ax in enumerate(axes[0]):
        scale = max(float(hist[a].max()) if G else 1.0, float(arrays["hist_real_train"].max()))
        step = 0.6 * scale
        rows = [("real", arrays["hist_real_train"])] + [(f"gen {g}", hist[a, g]) for g in range(G)]
        for i, (label, h) in enumerate(rows):
            base = step * i
            color = "0.3" if i == 0 else cmap((i - 1) / max(G - 1, 1))
            ax.fill_between(centers, base, base + h, color=color, alpha=0.6, lw=0)
            ax.plot(centers, base + h, color="k", lw=0.5)
            ax.text(centers[0], base + 0.05 * step, label, fontsize=7, va="bottom")
        _log_x(ax)
        ax.set_yticks([])
        ax.set_xlabel("perplexity under the generation-0 model")
        ax.set_title(_arm_label(fr[a]))
    save_figure(fig, rd.file("perplexity_ridgeline.png"))
    figs.append(
        (
            "perplexity_ridgeline.png",
            "The same histograms as a ridgeline, bottom: real "
            "data, then generations 0, 1, ... upwards.",
        )
    )

    # Repetition and diversity of the generated data.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    gg = gens[:-1] if len(gens) > 1 else gens
    for a in range(A):
        m, se = _stats(arrays["repeated_ngram_fraction"][a][:, : len(gg)])
        rep.band(axes[0], gg, m, se, label=_arm_label(fr[a]))
        for j, n in enumerate(arrays["distinct_n_orders"]):
            if n not in (1, 2, 4):
                continue
            m, se = _stats(arrays["distinct_n"][a, :, : len(gg), j])
            rep.band(axes[1], gg, m, se, label=f"distinct-{n}, {_arm_label(fr[a])}")
    axes[0].axhline(
        float(arrays["real_repeated_ngram_fraction"]), color="k", ls="--", label="real data"
    )
    axes[0].set_ylabel(f"repeated {REPEAT_N}-gram fraction")
    axes[1].set_ylabel("distinct-n")
    for ax in axes:
        ax.set_xlabel("generation that produced the data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, rd.file("repetition_diversity.png"))
    figs.append(
        (
            "repetition_diversity.png",
            "Repetition within generated sequences and "
            "distinct-n diversity of each generation's generated data.",
        )
    )

    if "true_nll_generated" in arrays:
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
        keys = (
            ("true_nll_generated", "real_true_nll", "true NLL per token (nats)"),
            ("unigram_lost_mass", "real_unigram_lost_mass", "lost unigram mass"),
            ("bigram_lost_mass", "real_bigram_lost_mass", "lost bigram mass"),
        )
        for ax, (key, ref, label) in zip(axes, keys, strict=True):
            for a in range(A):
                m, se = _stats(arrays[key][a][:, : len(gg)])
                rep.band(ax, gg, m, se, label=_arm_label(fr[a]))
            ax.axhline(float(arrays[ref]), color="k", ls="--", label="real training data")
            ax.set_ylabel(label)
            ax.set_xlabel("generation that produced the data")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save_figure(fig, rd.file("synthetic_truth.png"))
        figs.append(
            (
                "synthetic_truth.png",
                "Exact quantities under the true source: NLL of the "
                "generated text and the probability mass of unigrams/bigrams it never "
                "contains.",
            )
        )
    return figs


def _decode_text(tokenizer, ids) -> str:
    text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    return " ".join(text.split())


def write_report(rd: RunDir, config: Config, setup: Setup, summary: dict) -> None:
    from collapse_jax.core.runs import read_arrays

    arrays = read_arrays(rd.file("metrics.npz"))
    figs = write_figures(rd, arrays)
    G = config.generations
    lines = [
        "# Language-model regime: generations trained on generated text",
        "",
        f"Model `{config.model}`"
        + (" (pre-trained here from scratch as the base)" if config.model in BUILTIN_MODELS else "")
        + f", corpus: {setup.corpus_source}, {len(setup.train)} training blocks of "
        f"{config.block_size} tokens, {config.generations} generations after generation 0, "
        f"{config.epochs} epochs each, {config.seeds} seeds, policy `{config.policy}`, "
        f"start from `{config.start_from}`, decoding `{config.decoding}`"
        + (f" ({config.num_beams} beams)" if config.decoding == "beam" else "")
        + (
            f", repetition penalty {config.repetition_penalty:g}"
            if config.repetition_penalty != 1
            else ""
        )
        + f". Wall time {summary['seconds']:.0f} s (all invocations of this run directory).",
        "",
        "No closed-form theory exists for this regime; the table reports the measured change "
        "of test perplexity from generation 0 to the last generation (mean ± stderr over "
        "seeds).",
        "",
        f"| arm | test perplexity, gen 0 | test perplexity, gen {G} | change ± stderr |",
        "|---|---|---|---|",
    ]
    for a, f in enumerate(config.fresh_fractions):
        ppl = arrays["test_perplexity"][a]
        m, se = _stats(ppl)
        ch = summary["arms"][a]["perplexity_change"]
        lines.append(
            f"| {_arm_label(f)} | {rep.fmt(m[0])} ± {rep.fmt(se[0])} | {rep.fmt(m[-1])} ± "
            f"{rep.fmt(se[-1])} | {ch['mean']:+.4g} ± {ch['stderr']:.2g} |"
        )
    if "true_nll_generated" in arrays:
        lines += [
            "",
            "Exact source quantities of the data each generation produced (seed mean; the real "
            "training data for reference):",
            "",
            "| data | true NLL/token | lost unigram mass | lost bigram mass | tail-word frequency |",
            "|---|---|---|---|---|",
            f"| real training data | {rep.fmt(float(arrays['real_true_nll']))} | "
            f"{rep.fmt(float(arrays['real_unigram_lost_mass']))} | "
            f"{rep.fmt(float(arrays['real_bigram_lost_mass']))} | "
            f"{rep.fmt(float(arrays['real_tail_frequency']))} |",
        ]
        for a, f in enumerate(config.fresh_fractions):
            for g in range(G):
                lines.append(
                    f"| gen {g}, {_arm_label(f)} | "
                    + " | ".join(
                        rep.fmt(float(np.nanmean(arrays[k][a, :, g])))
                        for k in (
                            "true_nll_generated",
                            "unigram_lost_mass",
                            "bigram_lost_mass",
                            "tail_frequency",
                        )
                    )
                    + " |"
                )
    lines.append("")
    for name, caption in figs:
        lines.append(rep.figure_md(name, caption))
    if len(arrays["prompts"]):
        lines += ["## Continuations of fixed prompts (seed 0)", ""]
        for p in range(len(arrays["prompts"])):
            prompt = _decode_text(setup.tokenizer, arrays["prompts"][p])
            lines.append(f"**Prompt {p}:** {prompt}")
            lines.append("")
            for a, f in enumerate(config.fresh_fractions):
                for g in range(G + 1):
                    if g == 0 and a > 0:
                        continue
                    text = _decode_text(setup.tokenizer, arrays["continuations"][a, g, p])
                    who = "gen 0" if g == 0 else f"gen {g} ({_arm_label(f)})"
                    lines.append(f"- *{who}:* {text}")
            lines.append("")
    rd.write_report("\n".join(lines) + "\n")
