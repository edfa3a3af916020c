"""The VAE study: convolutional VAEs trained generation after generation on images decoded by
their predecessor (Shumailov et al. 2024, the MNIST VAE experiment).

Generation numbering follows :mod:`collapse_jax.core.loop`: generation 0 is real MNIST,
generation 1 is the VAE trained on ``M_0`` real training images (the paper's "generation 0"),
and generation ``n + 1`` is a freshly initialised VAE trained on the data set ``T_n`` that the
shared :func:`~collapse_jax.core.loop.mix_training_data` builds from samples of generation
``n`` (decoder Bernoulli means of ``z ~ N(0, I)``, or binarised Bernoulli draws of them), fresh
real images (``fresh_fraction``) and, for the accumulating policies, all earlier data. With
``resample_each_epoch`` (the paper's setting) the synthetic part is drawn afresh for every epoch.
Synthetic images are stored at MNIST's precision (uint8, steps of 1/255).

Metrics of every generation ``n`` (``n = 0`` describes real test images):

* ``latent_spread``: the generation-1 encoder's posterior means of ``eval_samples`` images of
  generation ``n`` (the paper's metric): standard deviation over images, averaged over latent
  dimensions (``latent_std`` keeps each dimension; ``latent_means`` the points, for the KDE plot);
* ``nelbo``: negative ELBO of real test images under generation ``n`` (nats per image, one
  reparameterised sample; generation 0 has none);
* ``class_hist`` / ``class_entropy``: classes of the generated digits according to a small CNN
  trained once on real MNIST (entropy in nats, at most ln 10 = 2.303);
* ``pixel_diversity``: mean pairwise Euclidean distance of ``diversity_samples`` images;
* ``grids``: the first 64 images (an 8x8 grid per generation).

Independent seeds run one after another in the same study (error bars = standard error over
seeds). Each seed is a chain of the neural host loop (:mod:`collapse_jax.core.host_loop`):
every generation trains with the core epoch loop (:func:`collapse_jax.core.training.fit_epochs`)
and an Orbax checkpoint after every epoch (the epoch loop's state plus the models and metrics
still needed); every random key is :func:`~collapse_jax.core.host_loop.generation_key` of
(seed, generation, part) folded with the epoch and step, and every data order is seeded by
(seed, generation, epoch), so ``resume = true`` ends with exactly the metrics of an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from collapse_jax.core import operators
from collapse_jax.core import training as tr
from collapse_jax.core.checkpointing import Checkpointer, arrays_to_tree, tree_to_arrays
from collapse_jax.core.errors import (
    MAX_GENERATIONS,
    ConfigError,
    check_choice,
    check_int,
    check_memory,
)
from collapse_jax.core.flags import add_config_arguments, apply_flags
from collapse_jax.core.host_loop import (
    Progress,
    check_resume,
    fit_checkpoint,
    fit_generations,
    generation_key,
    restore_fit,
)
from collapse_jax.core.policies import Policy, Schedule, mix_training_data
from collapse_jax.core.runs import RunDir, read_arrays, series, write_arrays
from collapse_jax.core.statistics import chain_stats
from collapse_jax.families import DESCRIPTIONS
from collapse_jax.families.vae import classifier as clf
from collapse_jax.families.vae import data as mnist
from collapse_jax.families.vae import model as vae
from collapse_jax.families.vae.report import METRICS, claims, make_report

NAME = "vae"
DESCRIPTION = DESCRIPTIONS[NAME]

SYNTHETIC = ("means", "binary")


#: The data operators of the VAE study (on its generated images, through the digit classifier).
OPERATORS = ("curate", "verify")


@dataclasses.dataclass(frozen=True)
class Config(operators.OperatorFields):
    """The VAE regime. Defaults: the paper's setting (GPU-sized: 5 generations of 30 epochs).
    The data-operator fields come from :class:`collapse_jax.core.operators.OperatorFields`:
    curate with reward ``logit:D[:SCALE]`` (the classifier's logit of digit D) and verify with
    good ``classes:I,J`` (the classifier's label) act on the generated images."""

    generations: int = 6  # G: models trained; generation 1 on real images, 2..G on generated
    epochs: int = 30  # training epochs per generation
    batch_size: int = 256  # minibatch size (sharded over all local devices)
    samples: int = 60000  # M_0: training images per generation (real ones for generation 1)
    schedule: str = (
        "constant"  # sample-size schedule: constant | linear[:SLOPE] | poly:A | list:...
    )
    policy: str = "replace"  # replace | accumulate | accumulate-subsample | mix:ALPHA,BETA,GAMMA
    fresh_fraction: float = 0.0  # fraction of every new batch drawn fresh from real MNIST
    synthetic: str = "means"  # synthetic images: decoder Bernoulli "means" or "binary" draws
    resample_each_epoch: bool = True  # draw fresh synthetic data every epoch (replace/mix only)
    seeds: int = 3  # independent recursions, run one after another
    seed: int = 0  # seed of the first recursion (the others use seed + 1, ...)
    channels1: int = 64  # first conv width of the encoder (and last of the decoder)
    channels2: int = 128  # second conv width
    latent: int = 20  # latent dimension
    learning_rate: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-5  # L2 weight decay (PyTorch Adam semantics)
    eval_samples: int = 1000  # images per generation for latent and class metrics
    eval_test: int = 10000  # real test images for the negative ELBO (0 = all)
    diversity_samples: int = 500  # images for the mean pairwise distance
    classifier_epochs: int = 2  # epochs of the digit classifier (trained once, cached)
    classifier_train: int = 0  # real training images for the classifier (0 = all)
    mnist_source: str = "auto"  # auto | local | package | hub | sklearn-digits (see data.py)
    data_dir: str = ""  # data directory ("" = $COLLAPSE_JAX_DATA_DIR)
    cache_dir: str = ""  # classifier cache ("" = $COLLAPSE_JAX_CACHE_DIR or ~/.cache/collapse_jax)
    resume: bool = False  # continue an interrupted run in the same directory


def validate(config: Config) -> Config:
    """Check every field; raise :class:`ConfigError` naming the bad value."""
    c = config
    check_int("generations", c.generations, 1, MAX_GENERATIONS)
    check_int("epochs", c.epochs, 1)
    check_int("batch size", c.batch_size, 1)
    check_int("samples", c.samples, 1, 2**31 - 1)
    if c.samples < c.batch_size:
        raise ConfigError(f"samples {c.samples} must be at least the batch size {c.batch_size}")
    sizes = Schedule.parse(c.schedule).sizes(c.samples, c.generations)
    if sizes.min() < c.batch_size:
        raise ConfigError(
            f"schedule {c.schedule!r} gives a training set of {int(sizes.min())} images, "
            f"fewer than the batch size {c.batch_size}"
        )
    policy = Policy.parse(c.policy, c.fresh_fraction)
    check_choice("synthetic", c.synthetic, SYNTHETIC)
    if c.resample_each_epoch and (policy.accumulates or policy.beta > 0):
        raise ConfigError(
            f"resample_each_epoch needs a replace or mix policy without beta, got {c.policy!r}; "
            "set resample_each_epoch = false"
        )
    check_int("seeds", c.seeds, 1)
    check_int("seed", c.seed, 0)
    vae.VAEConfig(c.channels1, c.channels2, c.latent, c.learning_rate, c.weight_decay)
    check_int("eval samples", c.eval_samples, 2)
    check_int("eval test", c.eval_test, 0)
    check_int("diversity samples", c.diversity_samples, 2)
    if c.diversity_samples > c.eval_samples:
        raise ConfigError(
            f"diversity samples {c.diversity_samples} exceed eval samples {c.eval_samples}"
        )
    check_int("classifier epochs", c.classifier_epochs, 1)
    check_int("classifier train", c.classifier_train, 0)
    _operators(c)
    check_choice("MNIST source", c.mnist_source, mnist.SOURCES)
    if c.data_dir and not Path(c.data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {c.data_dir} is not a directory")
    if c.cache_dir and Path(c.cache_dir).expanduser().exists():
        if not Path(c.cache_dir).expanduser().is_dir():
            raise ConfigError(f"cache_dir {c.cache_dir} exists and is not a directory")
    _check_cost(c, sizes)
    return config


def _operators(c: Config) -> operators.Operators:
    """The run's data operators (validated; the VAE takes curate and verify)."""
    return operators.parse(c, NAME, OPERATORS, classes=10)


#: Images a configuration may train on in all (generations × epochs × images × seeds, plus the
#: classifier): 10^12 is years of training on any one machine.
MAX_TRAINED_IMAGES = 10**12


def _check_cost(c: Config, sizes: np.ndarray) -> None:
    """Refuse configurations whose time or memory no machine has, before anything compiles:
    the images trained on in all, the VAE's parameters with Adam's state and a batch's
    activations, and the evaluation images."""
    images = c.seeds * c.epochs * float(sizes.sum()) + c.classifier_epochs * 60000
    if images > MAX_TRAINED_IMAGES:
        raise ConfigError(
            f"seeds {c.seeds} × epochs {c.epochs} × generations {c.generations} of samples "
            f"{c.samples} (classifier_epochs {c.classifier_epochs}) train on {images:.3g} images, "
            f"above {MAX_TRAINED_IMAGES:.0e}"
        )
    c1, c2, z = c.channels1, c.channels2, c.latent
    params = 16 * c1 + 16 * c1 * c2 + 49 * c2 * 3 * z + 16 * c2 * c1 + 16 * c1
    activations = c.batch_size * (196 * c1 + 49 * c2 + 784) * 4
    check_memory(
        4 * (4 * float(params) + activations),
        f"channels1 {c1}, channels2 {c2} and latent {z} at batch_size {c.batch_size}",
    )
    check_memory(4 * 784 * 4 * float(c.eval_samples), f"eval_samples {c.eval_samples}")


def demo_config() -> Config:
    """The CPU-sized setting for ``collapse-jax demo``."""
    return dataclasses.replace(
        cpu_config(),
        generations=3,
        epochs=4,
        batch_size=64,
        samples=4096,
        seeds=2,
        eval_samples=500,
        eval_test=1000,
        diversity_samples=250,
        classifier_epochs=1,
        classifier_train=10000,
    )


def cpu_config() -> Config:
    """The CPU-sized experiment (``experiments/vae_cpu.toml``): narrower VAE, 10k images."""
    return Config(
        generations=6,
        epochs=5,
        batch_size=128,
        samples=10000,
        resample_each_epoch=True,
        channels1=16,
        channels2=32,
        eval_samples=1000,
        eval_test=2000,
        seeds=3,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's flags, one per config field; unset flags leave the config unchanged."""
    add_config_arguments(parser, Config)


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """Apply the flags that were given onto ``base`` and validate."""
    return apply_flags(args, base, validate)


# --------------------------------------------------------------------------------------------
# Compiled pieces, shared by every generation and seed of a process


@functools.lru_cache(maxsize=8)
def _compiled(arch: vae.VAEConfig, batch_size: int):
    model = vae.make_model(arch)
    opt = vae.make_optimizer(arch)
    mesh = tr.data_mesh(batch_size)
    sharding = tr.train_state_sharding(vae.param_shapes(model), opt, mesh)
    return (
        model,
        opt,
        mesh,
        sharding,
        vae.make_train_step(model, opt, mesh),
        vae.VAEFunctions(model),
    )


def _arch(c: Config) -> vae.VAEConfig:
    return vae.VAEConfig(c.channels1, c.channels2, c.latent, c.learning_rate, c.weight_decay)


def _policy(c: Config) -> Policy:
    return Policy.parse(c.policy, c.fresh_fraction)


def _keeps_history(c: Config) -> bool:
    """Whether T_n depends on earlier data sets (so all models must be kept to rebuild it)."""
    p = _policy(c)
    return p.accumulates or p.beta > 0


# --------------------------------------------------------------------------------------------
# Metrics


def class_entropy(hist: np.ndarray) -> float:
    """Shannon entropy (nats) of a class histogram."""
    p = hist / max(hist.sum(), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of ``x`` (n, features)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    sq = (x**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    iu = np.triu_indices(len(x), 1)
    return float(np.sqrt(d2[iu]).mean())


def _generation_metrics(images_u8, ref_params, fns, classifier_params, c: Config) -> dict:
    """Metrics of one generation's images (uint8, (n, 28, 28)); see the module docstring."""
    x = mnist.to_unit(images_u8)
    means = fns.encoder_means(ref_params, x)
    labels = clf.predict(classifier_params, x)
    hist = np.bincount(labels, minlength=10).astype(np.float64)
    std = means.std(0)
    return {
        "latent_means": means.astype(np.float32),
        "latent_std": std.astype(np.float32),
        "latent_spread": np.float64(std.mean()),
        "class_hist": hist,
        "class_entropy": np.float64(class_entropy(hist)),
        "pixel_diversity": np.float64(mean_pairwise_distance(x[: c.diversity_samples])),
        "grid": np.asarray(images_u8[:64], np.uint8),
    }


# --------------------------------------------------------------------------------------------
# One recursion (one seed): a checkpointed host loop


class _Recursion:
    """State and data of one seed's recursion."""

    def __init__(self, c: Config, seed: int, data: mnist.ImageData, classifier_params, out: Path):
        self.c = c
        self.seed = seed
        self.data = data
        self.classifier_params = classifier_params
        self.model, self.opt, self.mesh, self.sharding, self.step_fn, self.fns = _compiled(
            _arch(c), c.batch_size
        )
        self.policy = _policy(c)
        self.ops = _operators(c)
        self.sizes = Schedule.parse(c.schedule).sizes(c.samples, c.generations)
        self.ckpt = Checkpointer(out, max_to_keep=2)
        self.models: dict[int, Any] = {}  # generation -> params (those needed later)
        self.metrics: dict[int, dict] = {}  # generation -> metrics
        self.losses: dict[int, list[float]] = {}  # generation -> mean loss per epoch
        self._sets: dict[tuple[int, int], np.ndarray] = {}  # (gen, epoch or 0) -> T_{gen-1}
        self._pool: dict[int, np.ndarray | None] = {}  # gen -> accumulated pool P_{gen-1}
        self._real: np.ndarray | None = None
        n_test = c.eval_test or len(data.x_test)
        self.test_x = mnist.to_unit(data.x_test[:n_test])
        self.template = tr.start_fit(vae.init_state(self.model, self.opt, jax.random.key(0)))

    # ---- keys and data ------------------------------------------------------------------

    def gen_keys(self, gen: int):
        """Keys of generation ``gen``: initialisation, data, training, evaluation."""
        return tuple(generation_key(self.seed, gen, part) for part in range(4))

    def real_set(self) -> np.ndarray:
        """T_0: M_0 real training images (a seeded subset when M_0 is smaller than the split)."""
        if self._real is None:
            n, x = int(self.sizes[0]), self.data.x_train
            if n != len(x):
                rng = np.random.default_rng([self.seed, 0, 0, 7])
                idx = rng.choice(len(x), n, replace=n > len(x))
                x = x[np.sort(idx)]
            self._real = x
        return self._real

    def training_set(self, gen: int, epoch: int) -> np.ndarray:
        """T_{gen-1}: the images generation ``gen`` is trained on in ``epoch``."""
        if gen == 1:
            return self.real_set()
        e = epoch if self.c.resample_each_epoch else 0
        if (gen, e) in self._sets:
            return self._sets[(gen, e)]
        history = _keeps_history(self.c)
        previous = self.training_set(gen - 1, 0) if history else None
        params = self.models[gen - 1]
        k_sample = jax.random.fold_in(self.gen_keys(gen)[1], e)
        binarize = self.c.synthetic == "binary"

        def sample_model(n: int) -> np.ndarray:
            if self.ops.on_points:  # curation / verification by the digit classifier
                return self.curated(params, k_sample, n, binarize, [self.seed, gen, e, 13])
            return mnist.to_uint8(self.fns.sample(params, k_sample, n, binarize))

        train, pool = mix_training_data(
            np.random.default_rng([self.seed, gen, e, 11]),
            self.policy,
            int(self.sizes[gen - 1]),
            sample_model,
            previous,
            self.data.x_train,
            pool=self._pool.get(gen - 1),
        )
        # Later steps need only this set (and pool): T_gen is built from T_{gen-1}.
        self._pool = {gen: pool}
        self._sets = {(gen, e): train}
        return train

    def curated(self, params, key, n: int, binarize: bool, seed) -> np.ndarray:
        """``n`` images after the operators: K × tries fresh samples per kept image, the reward
        a class logit and the verifier's truth the classifier's label
        (:func:`collapse_jax.core.operators.select_indices`); dropped images are left out."""
        ops = self.ops
        m = n * operators.candidates_per_example(ops)
        images = mnist.to_uint8(self.fns.sample(params, key, m, binarize))
        logits = clf.logits(self.classifier_params, mnist.to_unit(images))
        reward = correct = None
        if ops.curate is not None:
            reward = ops.curate.reward.scale * logits[:, ops.curate.reward.digit]
        if ops.verify is not None:
            correct = np.isin(logits.argmax(1), ops.verify.good.classes)
        rng = np.random.default_rng(seed)
        idx = operators.select_indices(rng, m, n, ops, reward, correct, fresh=True)
        return images[idx]

    # ---- checkpoints ----------------------------------------------------------------------

    def _step_id(self, gen: int, epochs_done: int) -> int:
        return (gen - 1) * self.c.epochs + epochs_done

    def save(self, gen: int, fit: tr.FitState) -> None:
        arrays, meta = fit_checkpoint(fit)
        for g, p in self.models.items():
            arrays.update(tree_to_arrays(p, f"model{g}"))
        for g, m in self.metrics.items():
            for name, value in m.items():
                arrays[f"metric{g}__{name}"] = np.asarray(value)
        meta.update(
            seed=self.seed,
            generation=gen,
            models=sorted(self.models),
            metrics=sorted(self.metrics),
            losses={str(g): v for g, v in self.losses.items()},
        )
        self.ckpt.save(self._step_id(gen, fit.epochs_done), arrays, meta)

    def restore(self) -> tuple[int, tr.FitState]:
        """Load the latest checkpoint: returns (generation, its epoch loop's state)."""
        arrays, meta = self.ckpt.restore()
        if meta.get("seed") != self.seed:
            raise ConfigError(
                f"checkpoint in {self.ckpt.directory} belongs to seed {meta.get('seed')}"
            )
        self.models = {
            int(g): arrays_to_tree(self.template.train.params, arrays, f"model{g}")
            for g in meta["models"]
        }
        self.metrics = {}
        for g in meta["metrics"]:
            prefix = f"metric{g}__"
            self.metrics[int(g)] = {
                k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)
            }
        self.losses = {int(g): list(v) for g, v in meta["losses"].items()}
        return int(meta["generation"]), restore_fit(self.template, arrays, meta)

    # ---- the loop -------------------------------------------------------------------------

    def train_generation(self, gen: int, fit: tr.FitState | None, progress, hook) -> None:
        """Fit generation ``gen`` (from ``fit``, a restored epoch loop, when given) with a
        checkpoint after every epoch; evaluate it after the last."""
        c = self.c
        k_init, _, k_train, k_eval = self.gen_keys(gen)
        if fit is None:
            params = vae.init_params(self.model, k_init)
            fit = tr.start_fit(tr.init_train_state(params, self.opt, self.mesh))
        else:
            fit = fit._replace(train=jax.device_put(fit.train, self.sharding))
        clock = [time.perf_counter()]

        def batches(epoch: int):
            x = self.training_set(gen, epoch)
            order = np.random.default_rng([self.seed, gen, epoch, 13]).permutation(len(x))
            for i in range(len(x) // c.batch_size):
                idx = order[i * c.batch_size : (i + 1) * c.batch_size]
                yield tr.shard_batch(mnist.to_unit(x[idx]), self.mesh)

        def on_epoch(f: tr.FitState) -> None:
            now = time.perf_counter()
            rate = len(self.training_set(gen, f.epochs_done - 1)) / (now - clock[0])
            clock[0] = now
            self.losses[gen] = list(f.train_loss)
            progress.advance()
            progress.note(
                f"generation {gen}/{c.generations} epoch {f.epochs_done}/{c.epochs} "
                f"loss {f.train_loss[-1]:.2f} ({rate:,.0f} images/s)"
            )
            if f.epochs_done == c.epochs:
                self.finish_generation(gen, jax.device_get(f.train.params), k_eval)
            self.save(gen, f)
            if hook is not None:
                hook(self.seed, gen, f.epochs_done)

        tr.fit_epochs(
            self.step_fn,
            fit,
            epochs=c.epochs,
            batches=batches,
            step_key=lambda epoch, i: jax.random.fold_in(jax.random.fold_in(k_train, epoch), i),
            on_epoch=on_epoch,
        )

    def finish_generation(self, gen: int, params, k_eval) -> None:
        """Evaluate generation ``gen`` (and generation 0 once generation 1 exists)."""
        c = self.c
        self.models[gen] = params
        ref = self.models[1]
        if gen == 1:
            real = self.data.x_test[: c.eval_samples]
            m0 = _generation_metrics(real, ref, self.fns, self.classifier_params, c)
            m0["nelbo"] = np.float64(np.nan)
            self.metrics[0] = m0
        k_sample, k_nelbo = jax.random.split(k_eval)
        images = mnist.to_uint8(
            self.fns.sample(params, k_sample, c.eval_samples, c.synthetic == "binary")
        )
        m = _generation_metrics(images, ref, self.fns, self.classifier_params, c)
        m["nelbo"] = np.float64(self.fns.mean_nelbo(params, self.test_x, k_nelbo))
        self.metrics[gen] = m
        # Drop models no later step needs: the reference (1), the newest, or all with history.
        if not _keeps_history(c):
            for g in [g for g in self.models if g not in (1, gen)]:
                del self.models[g]

    def run(self, progress: Progress, hook) -> dict:
        c = self.c
        gen, fit = 1, None
        if self.ckpt.latest() is not None:
            gen, fit = self.restore()
            if fit.epochs_done == c.epochs:
                gen, fit = gen + 1, None
        progress.start(c.generations * c.epochs)
        progress.advance(self._step_id(gen, 0 if fit is None else fit.epochs_done))
        fit_generations(
            c.generations,
            lambda g: self.train_generation(g, fit if g == gen else None, progress, hook),
            first=gen,
        )
        return self.stack()

    def stack(self) -> dict[str, np.ndarray]:
        """Per-generation metrics stacked along a leading generation axis."""
        gens = sorted(self.metrics)
        out = {k: np.stack([self.metrics[g][k] for g in gens]) for k in self.metrics[gens[0]]}
        out["train_loss"] = np.array([self.losses[g] for g in range(1, len(gens))])
        return out


# --------------------------------------------------------------------------------------------
# The study


def run(
    config: Config,
    out_dir,
    *,
    progress: bool | None = None,
    hook: Callable[[int, int, int], None] | None = None,
) -> dict:
    """Run the study into ``out_dir``; return the summary.

    ``hook(seed, generation, epochs_done)`` is called after every epoch's checkpoint (tests use
    it to interrupt a run).
    """
    c = validate(config)
    rd = RunDir(out_dir)
    check_resume(c, rd, started=(rd.path / "checkpoints").exists())
    t0 = time.perf_counter()
    data = mnist.load_mnist(c.mnist_source, c.data_dir or None)
    if c.eval_samples > len(data.x_test):  # generation 0's metrics are of real test images
        raise ConfigError(
            f"eval_samples {c.eval_samples} exceeds the {len(data.x_test)} test images of "
            f"{data.source}"
        )
    rd.write_config(c, NAME)
    settings = clf.ClassifierSettings(epochs=c.classifier_epochs, max_train=c.classifier_train)
    classifier = clf.load_or_train(data, settings, c.cache_dir or None, progress=bool(progress))
    per_seed = []
    for s in range(c.seed, c.seed + c.seeds):
        seed_file = rd.file(f"seeds/seed{s}.npz")
        if seed_file.exists():
            per_seed.append(read_arrays(seed_file))
            continue
        bar = Progress(progress, f"vae seed {s}", unit="epoch")
        try:
            rec = _Recursion(c, s, data, classifier.params, rd.path / "checkpoints" / f"seed{s}")
            result = rec.run(bar, hook)
            rec.ckpt.close()
        finally:
            bar.finish()
        write_arrays(seed_file, **result)
        per_seed.append(result)
    arrays = {k: np.stack([r[k] for r in per_seed]) for k in per_seed[0]}
    arrays["generation"] = np.arange(c.generations + 1)
    rd.write_metrics(**arrays)
    summary = summarize(c, arrays, data, classifier, time.perf_counter() - t0)
    rd.write_summary(summary)
    make_report(rd.path, summary)
    return summary


def summarize(c: Config, arrays: dict, data, classifier, seconds: float) -> dict:
    gens = arrays["generation"]
    summary: dict[str, Any] = {
        "study": NAME,
        "data_source": data.source,
        "is_mnist": data.is_mnist,
        "classifier_test_accuracy": classifier.test_accuracy,
        "seeds": c.seeds,
        "policy": _policy(c).describe(),
        "operators": _operators(c).describe(),
        "seconds": seconds,
    }
    for name in METRICS:
        st = chain_stats(arrays[name])
        summary[name] = series(gens, st.mean, st.stderr)
    hist = arrays["class_hist"] / arrays["class_hist"].sum(-1, keepdims=True)
    summary["class_fraction_mean"] = hist.mean(0)
    summary["claims"] = claims(arrays, _operators(c))
    return summary
