"""Training and scoring of causal language models on the core engine (:mod:`collapse_jax.core.training`).

* :func:`causal_lm_sums` (next-token negative log-likelihood with padding masks),
  :func:`opt_apply_fn` and :func:`make_lm_train_step` (the core step with that loss);
* :func:`fit_lm`: the paper's fine-tuning over fixed-length blocks, and :func:`train_model`: the
  study's fine-tune with a checkpoint after every epoch and selection of the epoch with the lowest
  validation loss; both run the core epoch loop :func:`~collapse_jax.core.training.fit_epochs`;
* :func:`sequence_log_likelihoods`, :func:`score_sequences` (ragged sequences, bucketed lengths)
  and :func:`score_blocks` (equal-length blocks): per-sequence NLL sums and token counts;
* the multi-host helpers of the study: :func:`default_mesh`, :func:`put_rows`, :func:`gather`,
  :func:`sync`, :func:`is_main`.

Target convention: position ``t + 1`` is a scored target when both it and the token before it
are real (``mask[t] = mask[t + 1] = 1``). With right padding this is Hugging Face's
``labels = input_ids`` (padding labels ignored); with left padding it also skips predicting the
first real token from a padding context.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from collapse_jax.core.checkpointing import Checkpointer
from collapse_jax.core.errors import ConfigError, check_int
from collapse_jax.core.host_loop import Progress, fit_checkpoint, restore_fit
from collapse_jax.core.loop import place, to_host, tree_to_host
from collapse_jax.core.training import (
    DATA_AXIS,
    FitState,
    OptimizerConfig,
    StepInfo,
    TrainState,
    fit_epochs,
    init_train_state,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    replicated,
    shard_batch,
    start_fit,
    train_state_sharding,
)
from collapse_jax.families.lm.config import scans_layers
from collapse_jax.families.lm.opt import OPTForCausalLM, init_params
from collapse_jax.families.lm.stacking import STACKED, stack_layers, unstack_layers

ApplyFn = Callable[..., Any]  # (params, ids, mask, deterministic, key) -> logits [B, T, V]


def token_log_likelihoods(
    logits: Float[Array, "batch seq vocab"],
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
) -> tuple[Float[Array, "batch seq1"], Float[Array, "batch seq1"]]:
    """``log p(x_{t+1} | x_{≤t})`` for ``t = 0 .. T-2`` and its target weight (1 where both
    tokens are real, else 0). Computed in float32 with a stable log-softmax."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    weights = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logz, weights.astype(jnp.float32)


def causal_lm_sums(
    apply_fn: ApplyFn,
    params: Any,
    batch: dict[str, Array],
    key: jax.Array | None,
    *,
    deterministic: bool = False,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Summed next-token NLL over scored targets and their number.

    ``batch`` holds ``input_ids`` and ``attention_mask`` ``[B, T]``; ``apply_fn(params, ids,
    mask, deterministic, key)`` returns logits.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = apply_fn(params, ids, mask, deterministic, key)
    ll, w = token_log_likelihoods(logits, ids, mask)
    return -(ll * w).sum(), w.sum()


def opt_apply_fn(
    config: Any,
    dtype: Any = jnp.float32,
    *,
    remat: bool | str = False,
    scan_layers: bool = False,
    scan_unroll: int = 1,
    attention: str = "auto",
) -> ApplyFn:
    """``apply_fn`` for :class:`collapse_jax.families.lm.opt.OPTForCausalLM` (dropout when
    ``deterministic`` is false; ``remat`` recomputes layer activations in the backward pass (all, or
    all but what the ``jax.checkpoint_policies`` policy it names saves);
    ``scan_layers`` runs the layers as one scan, ``scan_unroll`` of them per iteration, ``False``
    unrolls them); ``attention`` picks the attention core's implementation
    (:mod:`collapse_jax.families.lm.attention`)."""
    model = OPTForCausalLM(
        config,
        dtype=dtype,
        remat=remat,
        scan_layers=scan_layers,
        scan_unroll=scan_unroll,
        attention=attention,
    )

    def apply_fn(params, ids, mask, deterministic, key):
        rngs = None if deterministic or key is None else {"dropout": key}
        logits, _ = model.apply(
            {"params": params}, ids, mask, deterministic=deterministic, rngs=rngs
        )
        return logits

    return apply_fn


def make_lm_train_step(
    apply_fn: ApplyFn,
    optimizer_config: OptimizerConfig,
    params: Any,
    mesh: Mesh | None = None,
    *,
    param_shardings: Any = None,
    dropout: bool = True,
) -> tuple[TrainState, Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]]]:
    """Initial :class:`TrainState` and the jitted causal-LM step for ``batch = {input_ids,
    attention_mask}`` (with dropout unless ``dropout=False``)."""
    optimizer = make_optimizer(optimizer_config)
    state = init_train_state(params, optimizer, mesh, param_shardings)
    sharding = None
    if mesh is not None:
        sharding = train_state_sharding(params, optimizer, mesh, param_shardings)
    return state, _lm_step(apply_fn, optimizer_config, optimizer, mesh, sharding, dropout)


def _lm_step(apply_fn, optimizer_config, optimizer, mesh, sharding, dropout: bool):
    """The core step with the causal-LM loss and the config's accumulation and schedule."""
    loss = functools.partial(causal_lm_sums, apply_fn, deterministic=not dropout)
    return make_train_step(
        loss,
        optimizer,
        grad_accum_steps=optimizer_config.grad_accum_steps,
        schedule=make_schedule(optimizer_config),
        mesh=mesh,
        state_sharding=sharding,
    )


class FitResult(NamedTuple):
    """Outcome of :func:`fit_lm`."""

    params: Any  # trained parameters (on the mesh)
    losses: np.ndarray  # [n_updates] training loss of each update's batch (before the update)
    state: TrainState  # final train state (to continue training)


def fit_lm(
    apply_fn: ApplyFn,
    params: Any,
    input_ids: Int[Array, "n seq"],
    attention_mask: Int[Array, "n seq"] | None,
    optimizer_config: OptimizerConfig,
    *,
    batch_size: int,
    epochs: int,
    key: jax.Array,
    mesh: Mesh | None = None,
    dropout: bool = True,
    param_shardings: Any = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> FitResult:
    """Train a causal LM for ``epochs`` passes over fixed-length blocks (the paper's fine-tuning).

    Each epoch visits the ``n`` blocks in a fresh random order (``fold_in(key, epoch)``) in
    batches of ``batch_size``; the last, short batch is filled with fully masked rows, which add
    no target tokens, so every update has the same shape (one compilation) and the loss of a
    short batch is its own token mean, as in an unpadded run. ``optimizer_config.total_steps``
    should equal the number of updates, ``epochs · ceil(n / batch_size)``.

    ``mesh`` defaults to all devices (data parallel). In a multi-process run every process
    passes the same blocks and key; each feeds its contiguous share of every batch (the rows its
    devices hold). ``progress(update, total, loss)`` is called after each update (it syncs to
    the host).
    """
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ConfigError(
            f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same [n, seq]"
        )
    n = ids.shape[0]
    batch_size = check_int("batch_size", batch_size, 1)
    epochs = check_int("epochs", epochs, 1)
    if batch_size % optimizer_config.grad_accum_steps:
        raise ConfigError(
            f"batch_size {batch_size} must be divisible by grad_accum_steps "
            f"{optimizer_config.grad_accum_steps}"
        )
    if mesh is None:
        mesh = make_mesh()
    per_device = mesh.shape[DATA_AXIS] * optimizer_config.grad_accum_steps
    if batch_size % per_device:
        raise ConfigError(
            f"batch_size {batch_size} must be divisible by {per_device} (data-parallel devices "
            f"{mesh.shape[DATA_AXIS]} x grad_accum_steps {optimizer_config.grad_accum_steps}); "
            "pass a smaller mesh or change the batch size"
        )
    per_epoch = -(-n // batch_size)
    total = epochs * per_epoch
    state, step = make_lm_train_step(
        apply_fn, optimizer_config, params, mesh, param_shardings=param_shardings, dropout=dropout
    )
    k_order, k_dropout = jax.random.split(key)

    def batches(epoch: int):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_order, epoch), n))
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            b_ids = np.full((batch_size, ids.shape[1]), ids[rows[0], 0], np.int32)
            b_mask = np.zeros((batch_size, ids.shape[1]), np.int32)
            b_ids[: len(rows)], b_mask[: len(rows)] = ids[rows], mask[rows]
            yield shard_batch(_process_rows({"input_ids": b_ids, "attention_mask": b_mask}), mesh)

    losses = []

    def on_step(epoch: int, i: int, info: StepInfo) -> None:
        losses.append(info.loss)
        if progress is not None:
            progress(len(losses), total, float(info.loss))

    fit = fit_epochs(
        step,
        start_fit(state),
        epochs=epochs,
        batches=batches,
        step_key=lambda epoch, i: jax.random.fold_in(k_dropout, epoch * per_epoch + i),
        on_step=on_step,
    )
    return FitResult(fit.train.params, np.asarray(tree_to_host(losses)), fit.train)


def sequence_log_likelihoods(
    apply_fn: ApplyFn,
    params: Any,
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Per-sequence ``(nll_sum, n_tokens)``: ``−Σ_t log p(x_{t+1} | x_{≤t})`` over scored targets
    and their number; perplexity is ``exp(nll_sum / n_tokens)``. No dropout."""
    logits = apply_fn(params, input_ids, attention_mask, True, None)
    ll, w = token_log_likelihoods(logits, input_ids, attention_mask)
    return -(ll * w).sum(axis=1), w.sum(axis=1)


class SequenceScores(NamedTuple):
    """Per-sequence scores (NumPy, one entry per input sequence)."""

    nll_sum: np.ndarray  # summed negative log-likelihood (nats)
    n_tokens: np.ndarray  # scored target tokens

    @property
    def nll(self) -> np.ndarray:
        """Mean NLL per token (NaN where nothing is scored)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_tokens > 0, self.nll_sum / np.maximum(self.n_tokens, 1), np.nan)

    @property
    def perplexity(self) -> np.ndarray:
        """``exp(nll)`` per sequence."""
        return np.exp(self.nll)


def _bucket(n: int, cap: int) -> int:
    """Round a length up to a power of two (at least 8, at most ``cap``), limiting compiles."""
    return min(cap, max(8, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def score_sequences(
    apply_fn: ApplyFn,
    params: Any,
    sequences: list[list[int]],
    *,
    batch_size: int = 8,
    max_length: int,
    pad_token_id: int = 1,
    mesh: Mesh | None = None,
) -> SequenceScores:
    """Score token sequences (each at most ``max_length`` long) in right-padded batches.

    Batch shapes are ``[batch_size, bucket]`` with the length rounded up to a power of two, so a
    whole corpus compiles a handful of times; the last batch is padded with empty rows.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    if mesh is not None and batch_size % mesh.shape[DATA_AXIS]:
        raise ConfigError(
            f"batch_size {batch_size} must be divisible by the {mesh.shape[DATA_AXIS]} "
            "data-parallel devices"
        )
    for i, s in enumerate(sequences):
        if len(s) > max_length:
            raise ConfigError(
                f"sequence {i} has {len(s)} tokens, more than max_length {max_length}"
            )
    fn = jax.jit(functools.partial(sequence_log_likelihoods, apply_fn))
    nll = np.zeros(len(sequences), np.float64)
    count = np.zeros(len(sequences), np.int64)
    order = np.argsort([len(s) for s in sequences], kind="stable")  # similar lengths together
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = _bucket(max(len(sequences[i]) for i in idx), max_length)
        ids = np.full((batch_size, width), pad_token_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = sequences[i]
            mask[row, : len(sequences[i])] = 1
        if mesh is not None:
            ids, mask = shard_batch((ids, mask), mesh)
        s, c = tree_to_host(fn(params, ids, mask))
        nll[idx] = np.asarray(s, np.float64)[: len(idx)]
        count[idx] = np.round(np.asarray(c)[: len(idx)]).astype(np.int64)
    return SequenceScores(nll, count)


def corpus_nll(nll_sum: np.ndarray, count: np.ndarray) -> float:
    """Mean NLL per target token over a set of blocks (log of the corpus perplexity)."""
    return float(nll_sum.sum() / max(count.sum(), 1))


# --------------------------------------------------------------------------------------------
# Devices of the study (one or several processes)


def is_main() -> bool:
    """Whether this is the process that writes files."""
    return jax.process_index() == 0


@functools.lru_cache(maxsize=4)
def default_mesh() -> Mesh:
    """The data-parallel mesh over all devices of all processes (built once)."""
    return make_mesh()


def _process_rows(batch: Any) -> Any:
    """This process's contiguous share of the rows of a global host batch (all of it when there
    is one process): in a multi-process run every process holds the same global array."""
    if jax.process_count() == 1:
        return batch
    per = jax.tree.leaves(batch)[0].shape[0] // jax.process_count()
    lo = jax.process_index() * per
    return jax.tree.map(lambda x: x[lo : lo + per], batch)


def put_rows(x: np.ndarray):
    """Place a host batch on the mesh (rows split over devices) when the rows divide evenly."""
    mesh = default_mesh()
    n_data = mesh.shape[DATA_AXIS]
    if n_data == 1 or x.shape[0] % n_data:
        return jnp.asarray(x)
    return shard_batch(_process_rows(x), mesh)


def sync(name: str) -> None:
    """In a multi-process run, wait until every process got here (after the main one wrote a
    file that the others read next)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
    """A device array as one host array in every process (a collective when it is spread
    over several processes)."""
    return to_host(x)


def device_params(params):
    """Put host parameters on the devices once (replicated over the mesh)."""
    return place(params, replicated(default_mesh()))


# --------------------------------------------------------------------------------------------
# Scoring equal-length blocks


@functools.lru_cache(maxsize=8)
def _score_fn(model_config, dtype, scan_layers: bool = False):
    apply_fn = opt_apply_fn(model_config, dtype, scan_layers=scan_layers)
    return jax.jit(functools.partial(sequence_log_likelihoods, apply_fn))


def score_blocks(
    model_config, params, blocks: np.ndarray, batch_size: int, dtype=jnp.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block ``(nll_sum, n_targets)`` of equal-length blocks: next-token NLL of tokens
    2..T given their prefix (no BOS), as Hugging Face's ``labels = input_ids``.

    The last batch is completed with masked rows, so one shape is compiled per run. Parameters
    stored stacked (:func:`~collapse_jax.families.lm.stacking.stack_layers`) are scored with the
    layers scanned.
    """
    fn = _score_fn(model_config, dtype, STACKED in params)
    n, t = blocks.shape
    nll = np.zeros(n, np.float64)
    cnt = np.zeros(n, np.int64)
    for start in range(0, n, batch_size):
        rows = blocks[start : start + batch_size]
        k = len(rows)
        ids = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        ids[:k], mask[:k] = rows, 1
        s, c = fn(params, put_rows(ids), put_rows(mask))
        nll[start : start + k] = gather(s)[:k]
        cnt[start : start + k] = np.round(gather(c)[:k]).astype(np.int64)
    return nll, cnt


# --------------------------------------------------------------------------------------------
# The study's fine-tune: per-epoch checkpoints, selection by validation loss


@functools.lru_cache(maxsize=8)
def _trainer(model_config, opt_config, dtype, dropout: bool, scan_layers: bool = False):
    """(optimizer, jitted step, state sharding), cached so that every generation with the same
    shapes reuses one compiled step; ``scan_layers``: for parameters stored stacked, the layers
    run as one scan."""
    apply_fn = opt_apply_fn(model_config, dtype, scan_layers=scan_layers)
    optimizer = make_optimizer(opt_config)
    mesh = default_mesh()
    layout = stack_layers if scan_layers else dict
    params = jax.eval_shape(lambda: layout(init_model_params(model_config, 0)))
    sharding = train_state_sharding(params, optimizer, mesh)
    step = _lm_step(apply_fn, opt_config, optimizer, mesh, sharding, dropout)
    return optimizer, step, sharding


def init_model_params(model_config, seed: int):
    """Fresh OPT parameters from ``key(seed)`` (jitted: Flax's init run op by op compiles every
    small operation separately)."""
    return jax.jit(init_params, static_argnums=0)(model_config, jax.random.key(seed))


class TrainResult(NamedTuple):
    params: Any  # selected parameters (host NumPy tree)
    train_loss: np.ndarray  # mean training loss per epoch
    val_loss: np.ndarray  # validation NLL per token after each epoch
    best_epoch: int  # 1-based epoch whose parameters were kept


def train_model(
    model_config,
    params,
    data: np.ndarray,
    validation: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    config: Any,
    key: jax.Array,
    order_seed: tuple[int, ...],
    ckpt_dir: Path,
    progress: Progress,
) -> TrainResult:
    """Fine-tune ``params`` on ``data`` blocks for ``epochs``; checkpoint after every epoch.

    ``config`` is the study's configuration (batch sizes, warm-up, weight decay, dtype,
    ``select_by_validation``). Batches are a fresh permutation per epoch from
    ``np.random.default_rng((*order_seed, epoch))`` and dropout keys ``fold_in(key, update)``,
    so a run resumed from any epoch's checkpoint continues exactly as the uninterrupted one. The
    kept parameters are those of the epoch with the lowest validation loss
    (``select_by_validation``) or of the last epoch. With ``config.scan_layers`` on
    (:func:`~collapse_jax.families.lm.config.scans_layers`) the fine-tune and its validation
    run on the parameters stored stacked and scan the layers; its checkpoints hold them stacked
    too, and the kept parameters come back in the per-layer layout of ``params``.
    """
    scan = scans_layers(config, model_config.num_hidden_layers)
    if scan:
        params = stack_layers(params)
    bs = config.batch_size
    steps_per_epoch = len(data) // bs
    opt_config = OptimizerConfig(
        learning_rate=learning_rate,
        warmup_steps=min(config.warmup_steps, epochs * steps_per_epoch),
        total_steps=epochs * steps_per_epoch,
        weight_decay=config.weight_decay,
        grad_accum_steps=config.grad_accum_steps,
    )
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    optimizer, step, sharding = _trainer(model_config, opt_config, dtype, True, scan)
    fit = start_fit(init_train_state(params, optimizer, default_mesh()), keep_best=True)

    def batches(epoch: int):
        order = np.random.default_rng((*order_seed, epoch)).permutation(len(data))
        for b in range(steps_per_epoch):
            ids = data[order[b * bs : (b + 1) * bs]]
            batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            yield shard_batch(_process_rows(batch), default_mesh())

    def validate(p) -> float:
        return corpus_nll(*score_blocks(model_config, p, validation, config.eval_batch_size, dtype))

    def on_epoch(f: FitState) -> None:
        progress.note(f"loss {f.train_loss[-1]:.3f} val {f.val_loss[-1]:.3f}")
        # Every process saves: Orbax synchronises them and the primary one writes (a save by
        # process 0 alone waits forever for the others).
        ckpt.save(f.epochs_done, *fit_checkpoint(f))

    with Checkpointer(ckpt_dir, max_to_keep=1) as ckpt:
        if ckpt.latest() is not None:
            fit = restore_fit(fit, *ckpt.restore(), sharding)
        progress.start((epochs - fit.epochs_done) * steps_per_epoch)
        fit = fit_epochs(
            step,
            fit,
            epochs=epochs,
            batches=batches,
            step_key=lambda epoch, i: jax.random.fold_in(key, epoch * steps_per_epoch + i),
            validate=validate,
            select_by_validation=config.select_by_validation,
            on_step=lambda *_: progress.advance(),
            on_epoch=on_epoch,
        )
        progress.finish()
    return TrainResult(
        unstack_layers(fit.best_params) if scan else fit.best_params,
        np.asarray(fit.train_loss),
        np.asarray(fit.val_loss),
        fit.best_epoch,
    )
