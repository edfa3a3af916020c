"""The language-model study's generations: decoding with chunked saves, models on disk, and the
:class:`Regime` that trains, evaluates and generates each generation of a chain (seed, arm)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from collapse_jax.core import operators
from collapse_jax.core.host_loop import Progress, fit_generations, generation_key
from collapse_jax.core.policies import Policy, mix_training_data
from collapse_jax.core.runs import (
    atomic_path,
    write_arrays,
)
from collapse_jax.families.lm import decoding as dec
from collapse_jax.families.lm import synthetic_language as sl
from collapse_jax.families.lm import training as lt
from collapse_jax.families.lm.config import OPERATORS, Config, Setup, compute_dtype
from collapse_jax.families.lm.opt import OPTForCausalLM
from collapse_jax.families.lm.opt_weights import load_pretrained, save_pretrained

# --------------------------------------------------------------------------------------------
# Generation with chunked saves


def make_decode_fn(model_config, config: Config, tokenizer) -> Callable:
    """The jitted decoder ``fn(params, prompts, key) -> new tokens [n, block]`` for the config."""

    module = OPTForCausalLM(model_config, dtype=compute_dtype(config))
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

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


# --------------------------------------------------------------------------------------------
# Models on disk


def _model_done(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _save_model(params, model_config, d: Path, tokenizer) -> None:

    tmp = d.with_name(d.name + ".tmp")
    if lt.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    if lt.is_main():
        save_pretrained(jax.device_get(params), model_config, tmp, tokenizer=tokenizer)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    lt.sync(f"saved {d}")


def load_model(d: Path):

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
        self.dtype = compute_dtype(config)
        self.base_params = None
        self.ops = operators.parse(config, "lm", OPERATORS, sequences=True)

    def key(self, seed: int, arm: int | None, g: int, *part: int) -> jax.Array:
        """The key of a stage of generation ``g`` of chain ``(seed, arm)``: the host loop's
        :func:`~collapse_jax.core.host_loop.generation_key` with the arm folded in before the
        generation (the streams of earlier versions of this study); no part trains, part 1
        generates the next data set, part 2 continues the fixed prompts."""
        return generation_key(seed, _arm_code(arm), g, *part)

    def label(self, seed: int, arm: int | None, g: int) -> str:
        return f"seed {seed} arm {arm if arm is not None else '-'} gen {g}"

    # -- the base model
    def base(self):
        if self.base_params is not None:
            return self.base_params
        s, c = self.setup, self.config
        if s.base_dir is not None:
            self.base_params = load_model(s.base_dir)
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
        self.base_params = load_model(d)
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
            init = load_model(self.gen_dir(seed, arm, g - 1) / "model")
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
            key=self.key(seed, arm, g),
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
            params = lt.device_params(load_model(d / "model"))
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
        params = lt.device_params(load_model(d / "model"))
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
            if self.ops.on_points:  # curation / verification of the decoded sequences
                return generated[np.sort(self.select(rng, generated, n))]
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

    def select(self, rng: np.random.Generator, generated: np.ndarray, n: int) -> np.ndarray:
        """Indices of the generated sequences kept by curation and verification
        (:func:`collapse_jax.core.operators.select_indices`). Row i continues training block i,
        so a sequence is scored under the synthetic source given that block as its prompt."""
        ops = self.ops
        reward = correct = None
        if ops.curate is not None:
            reward = ops.curate.reward(generated, self.setup.tokenizer.pad_token_id)
        if ops.verify is not None:
            ll = sl.conditional_log_likelihood(
                self.setup.source, jnp.asarray(self.setup.train), jnp.asarray(generated)
            )
            correct = np.asarray(ll) / generated.shape[1] >= ops.verify.good.threshold
        return operators.select_indices(rng, len(generated), n, ops, reward, correct)

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

    # -- the chains
    def run_first(self, seed: int) -> None:
        """Generation 0 of ``seed`` (the base fine-tuned on the real blocks), shared by the arms."""
        self.train_generation(seed, None, 0, self.setup.train)
        if self.shows_prompts(seed):
            self.continuations(seed, None, 0)

    def run_chain(self, seed: int, arm: int) -> None:
        """Generations ``1 .. G`` of chain ``(seed, arm)`` on the host loop
        (:func:`~collapse_jax.core.host_loop.fit_generations`): generation ``g`` trains on the
        data set built from generation ``g - 1``'s continuations; every stage is cached on disk,
        so calling it again resumes."""
        G = self.config.generations
        chain = {"previous": self.setup.train, "pool": None}

        def fit_generation(g: int) -> None:
            data, chain["pool"] = self.training_data(seed, arm, g, chain["previous"], chain["pool"])
            self.train_generation(seed, arm, g, data)
            if self.shows_prompts(seed):
                self.continuations(seed, arm, g)
            if g < G:
                self.generated(seed, arm, g)
            self.cleanup(seed, arm, g)
            chain["previous"] = data

        fit_generations(G, fit_generation)
