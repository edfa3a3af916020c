"""Training and evaluation of neural models: optimizer, sharded jitted step, per-sequence scores.

Generic parts (usable by any Flax model, e.g. the VAE regime):

* :class:`OptimizerConfig`, :func:`make_schedule` (linear warm-up then cosine decay) and
  :func:`make_optimizer` (global-norm clipping + Optax AdamW);
* :func:`make_mesh`, :func:`shard_batch`, :func:`param_sharding` (replicated, or sharded along
  the largest divisible dimension over the ``"model"`` axis for models that do not fit one
  device) and :func:`maybe_initialize_distributed` for multi-host runs;
* :class:`TrainState` / :class:`StepInfo` and :func:`make_train_step`: a jitted step
  ``(state, batch, key) -> (state, info)`` whose loss is a *sum* over examples divided by a
  *count* summed over the whole (accumulated) batch, so gradient accumulation and any number of
  devices give the same update as one big batch.

Language-model parts: :func:`causal_lm_sums` (next-token negative log-likelihood with padding
masks), :func:`make_lm_train_step`, :func:`sequence_log_likelihoods` and :func:`score_sequences`
(per-sequence NLL sums and token counts, hence perplexities).

Target convention: position ``t + 1`` is a scored target when both it and the token before it
are real (``mask[t] = mask[t + 1] = 1``). With right padding this is Hugging Face's
``labels = input_ids`` (padding labels ignored); with left padding it also skips predicting the
first real token from a padding context.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from collapse_jax.core.errors import ConfigError, check_float, check_int

DATA_AXIS = "data"
MODEL_AXIS = "model"


# --------------------------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay, global-norm clipping, gradient accumulation."""

    learning_rate: float = 5e-5  # peak learning rate, reached after warmup_steps
    warmup_steps: int = 0  # linear warm-up from 0 to learning_rate over this many updates
    total_steps: int = 1000  # updates in the whole run (cosine decay ends here)
    end_lr_fraction: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    decay_vectors: bool = False  # also decay 1-D parameters (biases, norms); HF Trainer does not
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    max_grad_norm: float | None = 1.0  # clip gradients to this global norm; None: no clipping
    grad_accum_steps: int = 1  # micro-batches per update (the batch is split into this many)

    def __post_init__(self):
        check_float("learning_rate", self.learning_rate, 0.0, open_min=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("total_steps", self.total_steps, 1)
        if self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"warmup_steps {self.warmup_steps} exceeds total_steps {self.total_steps}"
            )
        check_float("end_lr_fraction", self.end_lr_fraction, 0.0, 1.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("b1", self.b1, 0.0, 1.0)
        check_float("b2", self.b2, 0.0, 1.0)
        check_float("eps", self.eps, 0.0, open_min=True)
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", self.max_grad_norm, 0.0, open_min=True)
        check_int("grad_accum_steps", self.grad_accum_steps, 1)


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Learning rate at update ``n``: ``lr · n / W`` for ``n < W``, then
    ``end + (lr − end) · (1 + cos(π (n − W) / (N − W))) / 2`` (``W`` warm-up, ``N`` total)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.end_lr_fraction,
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm (optional), then AdamW on :func:`make_schedule`; weight decay
    applies to matrices only unless ``decay_vectors`` (Hugging Face ``Trainer``'s rule: no decay
    on biases and LayerNorm parameters)."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=None if config.decay_vectors else _matrices,
        )
    )
    return optax.chain(*parts)


def _matrices(params: Any) -> Any:
    """Weight-decay mask: parameters with at least two dimensions (kernels, embeddings)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


# --------------------------------------------------------------------------------------------
# Devices: mesh, shardings, multi-host start-up.
# --------------------------------------------------------------------------------------------

_MULTIHOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit: with JAX_NUM_PROCESSES and JAX_PROCESS_ID
    "COORDINATOR_ADDRESS",
    "MEGASCALE_COORDINATOR_ADDRESS",  # multi-slice TPU
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pod slices
)


def _multihost_requested(env: dict[str, str]) -> bool:
    if any(env.get(k) for k in _MULTIHOST_ENV[:3]):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes several processes.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), a
    TPU pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts, or Megascale), SLURM
    (``SLURM_NTASKS > 1``) and Open MPI (``OMPI_COMM_WORLD_SIZE > 1``); JAX's cluster detection
    fills in the rest. Must run before any other JAX call. Returns whether it initialised.
    """
    env = dict(os.environ if env is None else env)
    if not _multihost_requested(env) or jax.distributed.is_initialized():
        return False
    kwargs: dict[str, Any] = {}
    address = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if address:
        kwargs["coordinator_address"] = address
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(model_parallel: int = 1, devices: Iterable[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    model_parallel = check_int("model_parallel", model_parallel, 1)
    if len(devices) % model_parallel:
        raise ConfigError(
            f"model_parallel {model_parallel} does not divide the {len(devices)} devices"
        )
    grid = np.array(devices, dtype=object).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the ``data`` axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a batch (pytree of arrays with a leading example axis) on the mesh.

    In a multi-process run each process passes its own slice of the global batch.
    """
    sharding = batch_sharding(mesh)
    n_data = mesh.shape[DATA_AXIS]

    def put(x):
        x = np.asarray(x)
        if (x.shape[0] * jax.process_count()) % n_data:
            raise ConfigError(
                f"batch size {x.shape[0] * jax.process_count()} is not divisible by the "
                f"{n_data} data-parallel devices"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def param_sharding(params: Any, mesh: Mesh, min_size: int = 2**18) -> Any:
    """Shardings for a parameter tree: replicated, except that with a ``model`` axis larger
    than one, each array of at least ``min_size`` elements is split along its largest
    dimension divisible by the axis size (GSPMD inserts the gathers), as in ZeRO-3/FSDP."""
    n_model = mesh.shape[MODEL_AXIS]

    def spec(x):
        if n_model == 1 or x.size < min_size:
            return replicated(mesh)
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % n_model == 0:
                axes = [None] * x.ndim
                axes[d] = MODEL_AXIS
                return NamedSharding(mesh, PartitionSpec(*axes))
        return replicated(mesh)

    return jax.tree.map(spec, params)


# --------------------------------------------------------------------------------------------
# The generic train step.
# --------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """What a training step carries: update count, parameters, optimizer state."""

    step: Int[Array, ""]
    params: Any
    opt_state: Any


class StepInfo(NamedTuple):
    """What a training step reports (for the batch it consumed, before the update)."""

    loss: Float[Array, ""]  # summed loss / summed count over the whole batch
    count: Float[Array, ""]  # e.g. number of target tokens
    grad_norm: Float[Array, ""]  # global gradient norm before clipping
    learning_rate: Float[Array, ""]  # learning rate applied by this update


# loss_sums(params, batch, key) -> (sum of per-example losses, count they are averaged over)
LossSums = Callable[[Any, Any, jax.Array], tuple[Float[Array, ""], Float[Array, ""]]]


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    shardings: Any = None,
) -> TrainState:
    """Put ``params`` on the mesh (``shardings`` default: :func:`param_sharding`) and build
    the optimizer state with matching shardings."""
    if mesh is None:
        # A copy: the train step donates its state, which must not take the caller's arrays.
        params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    state_sharding = train_state_sharding(params, optimizer, mesh, shardings)
    init = jax.jit(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)),
        out_shardings=state_sharding,
    )
    params = jax.device_put(params, state_sharding.params)
    return init(params)


def train_state_sharding(
    params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, shardings: Any = None
) -> TrainState:
    """Shardings of a :class:`TrainState`: the optimizer's parameter-shaped leaves follow the
    parameters, its other leaves (counters) are replicated."""
    if shardings is None:
        shardings = param_sharding(params, mesh)
    abstract = jax.eval_shape(optimizer.init, params)
    opt_sharding = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )
    return TrainState(replicated(mesh), shardings, opt_sharding)


def _split_micro(batch: Any, n: int) -> Any:
    """[B, ...] -> [n, B / n, ...] taking rows ``j, j + n, ...`` into micro-batch ``j``, so each
    device's contiguous slice of the data axis contributes to every micro-batch (no resharding)."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} not divisible by grad_accum_steps {n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    loss_sums: LossSums,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    state_sharding: TrainState | None = None,
    donate: bool = True,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]]:
    """A jitted update ``(state, batch, key) -> (state, info)``.

    The gradient is that of ``Σ loss / Σ count`` over the whole batch: with
    ``grad_accum_steps = k`` the batch is split into ``k`` micro-batches whose loss sums and
    gradients are accumulated in a ``lax.scan`` (memory of one micro-batch), then one optimizer
    update is applied. Micro-batch ``j`` gets dropout key ``fold_in(key, j)``.

    With a ``mesh``, the batch is expected sharded by :func:`shard_batch` and the state by
    :func:`init_train_state`; input and output shardings are fixed so repeated calls never
    recompile.
    """
    grad_accum_steps = check_int("grad_accum_steps", grad_accum_steps, 1)
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, StepInfo]:
        if grad_accum_steps == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch, key)
        else:
            micro = _split_micro(batch, grad_accum_steps)
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(carry, inp):
                g_acc, l_acc, c_acc = carry
                j, mb = inp
                (l, c), g = grad_fn(state.params, mb, jax.random.fold_in(key, j))
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, count), _ = jax.lax.scan(
                body, init, (jnp.arange(grad_accum_steps), micro)
            )
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = schedule(state.step) if schedule is not None else jnp.float32(jnp.nan)
        info = StepInfo(loss_sum / denom, count, optax.tree.norm(grads), jnp.float32(lr))
        return TrainState(state.step + 1, params, opt_state), info

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    if state_sharding is None:
        raise ValueError("make_train_step with a mesh needs state_sharding")
    rep = replicated(mesh)
    info_sharding = StepInfo(rep, rep, rep, rep)
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding(mesh), rep),
        out_shardings=(state_sharding, info_sharding),
        donate_argnums=donate_argnums,
    )


# --------------------------------------------------------------------------------------------
# Causal language modelling.
# --------------------------------------------------------------------------------------------

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


def opt_apply_fn(config: Any, dtype: Any = jnp.float32, *, remat: bool = False) -> ApplyFn:
    """``apply_fn`` for :class:`collapse_jax.families.lm.opt.OPTForCausalLM` (dropout when
    ``deterministic`` is false; ``remat`` recomputes layer activations in the backward pass)."""
    from collapse_jax.families.lm.opt import OPTForCausalLM

    model = OPTForCausalLM(config, dtype=dtype, remat=remat)

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
    loss = functools.partial(causal_lm_sums, apply_fn, deterministic=not dropout)
    step = make_train_step(
        loss,
        optimizer,
        grad_accum_steps=optimizer_config.grad_accum_steps,
        schedule=make_schedule(optimizer_config),
        mesh=mesh,
        state_sharding=sharding,
    )
    return state, step


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
    losses = []
    k_order, k_dropout = jax.random.split(key)
    update = 0
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_order, epoch), n))
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            b_ids = np.full((batch_size, ids.shape[1]), ids[rows[0], 0], np.int32)
            b_mask = np.zeros((batch_size, ids.shape[1]), np.int32)
            b_ids[: len(rows)], b_mask[: len(rows)] = ids[rows], mask[rows]
            if jax.process_count() > 1:  # every process holds all blocks; pass its own rows
                local = batch_size // jax.process_count()
                lo = jax.process_index() * local
                b_ids, b_mask = b_ids[lo : lo + local], b_mask[lo : lo + local]
            batch = shard_batch({"input_ids": b_ids, "attention_mask": b_mask}, mesh)
            state, info = step(state, batch, jax.random.fold_in(k_dropout, update))
            losses.append(info.loss)
            update += 1
            if progress is not None:
                progress(update, total, float(info.loss))
    return FitResult(state.params, np.asarray(jax.device_get(losses)), state)


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
        s, c = jax.device_get(fn(params, ids, mask))
        nll[idx] = np.asarray(s, np.float64)[: len(idx)]
        count[idx] = np.round(np.asarray(c)[: len(idx)]).astype(np.int64)
    return SequenceScores(nll, count)
