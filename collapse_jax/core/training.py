"""The one training engine of the neural families: optimizer, mesh, sharded jitted step, epoch loop.

Model-agnostic (the VAE, its digit classifier and the OPT language models all train through it;
language-model losses and scoring live in :mod:`collapse_jax.families.lm.training`):

* :class:`OptimizerConfig`, :func:`make_schedule` (linear warm-up then cosine decay) and
  :func:`make_optimizer` (global-norm clipping + Optax AdamW);
* :func:`make_mesh` / :func:`data_mesh`, :func:`shard_batch`, :func:`param_sharding`
  (replicated, or sharded along the largest divisible dimension over the ``"model"`` axis for
  models that do not fit one device) and :func:`maybe_initialize_distributed` for multi-host runs;
* :class:`TrainState` / :class:`StepInfo` and :func:`make_train_step`: a jitted step
  ``(state, batch, key) -> (state, info)`` whose loss is a *sum* over examples divided by a
  *count* summed over the whole (accumulated) batch, so gradient accumulation and any number of
  devices give the same update as one big batch; with a mesh its shardings are fixed;
* :class:`FitState` and :func:`fit_epochs`: the one epoch loop, with optional validation-based
  selection of the best epoch's parameters and per-step / per-epoch callbacks (checkpoints,
  progress). A :class:`FitState` holds everything needed to resume the loop after any epoch.
"""

from __future__ import annotations

import dataclasses
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

from collapse_jax.core.devices import multihost_requested
from collapse_jax.core.errors import ConfigError, check_float, check_int
from collapse_jax.core.loop import place, tree_to_host

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


#: A subtree of this name holds layers' parameters stacked along a leading layer axis
#: (:func:`collapse_jax.families.lm.opt.stack_layers`): its leaves have one dimension more.
STACKED_LAYERS = "layers"


def _matrices(params: Any) -> Any:
    """Weight-decay mask: parameters with at least two dimensions (kernels, embeddings), not
    counting the layer axis of stacked layers (a stacked bias is still a vector)."""

    def is_matrix(path, x):
        stacked = any(getattr(k, "key", None) == STACKED_LAYERS for k in path)
        return jnp.ndim(x) >= (3 if stacked else 2)

    return jax.tree_util.tree_map_with_path(is_matrix, params)


# --------------------------------------------------------------------------------------------
# Devices: mesh, shardings, multi-host start-up.
# --------------------------------------------------------------------------------------------


def maybe_initialize_distributed(env: dict[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes several processes.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), a
    TPU pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts, or Megascale), SLURM
    (``SLURM_NTASKS > 1``) and Open MPI (``OMPI_COMM_WORLD_SIZE > 1``); JAX's cluster detection
    fills in the rest. Must run before any other JAX call. Returns whether it initialised.
    """
    env = dict(os.environ if env is None else env)
    if not multihost_requested(env) or jax.distributed.is_initialized():
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


def data_mesh(batch_size: int, devices: Iterable[Any] | None = None) -> Mesh:
    """A data-parallel ``(data, model=1)`` mesh over the most local devices (default:
    ``jax.local_devices()``) whose number divides ``batch_size``."""
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    while batch_size % n:
        n -= 1
    return make_mesh(1, devices[:n])


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


def new_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` for ``params`` (where ``params`` live, no placement)."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


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
        return new_train_state(params, optimizer)
    state_sharding = train_state_sharding(params, optimizer, mesh, shardings)
    init = jax.jit(lambda p: new_train_state(p, optimizer), out_shardings=state_sharding)
    params = place(params, state_sharding.params)
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
# The epoch loop.
# --------------------------------------------------------------------------------------------


class FitState(NamedTuple):
    """Where :func:`fit_epochs` stands after ``epochs_done`` epochs (what a checkpoint keeps)."""

    train: TrainState  # the train state after the last finished epoch (on the devices)
    epochs_done: int
    best_params: Any  # host parameters of the selected epoch (the start when none yet)
    best_val: float  # validation loss of the selected epoch (inf before any)
    best_epoch: int  # 1-based selected epoch (0: none yet)
    train_loss: tuple[float, ...]  # mean training loss of each finished epoch
    val_loss: tuple[float, ...]  # validation loss after each finished epoch (empty without one)


def start_fit(state: TrainState, *, keep_best: bool = False) -> FitState:
    """The :class:`FitState` before the first epoch; ``keep_best`` copies the starting
    parameters to the host as the selection's fallback (needed with validation)."""
    best = tree_to_host(state.params) if keep_best else None
    return FitState(state, 0, best, math.inf, 0, (), ())


def fit_epochs(
    step: Callable[[TrainState, Any, jax.Array], tuple[TrainState, StepInfo]],
    fit: FitState,
    *,
    epochs: int,
    batches: Callable[[int], Iterable[Any]],
    step_key: Callable[[int, int], jax.Array],
    validate: Callable[[Any], float] | None = None,
    select_by_validation: bool = True,
    on_step: Callable[[int, int, StepInfo], None] | None = None,
    on_epoch: Callable[[FitState], None] | None = None,
) -> FitState:
    """Run epochs ``fit.epochs_done + 1 .. epochs`` of ``step`` and return the final state.

    ``batches(epoch)`` yields the placed batches of a 0-based epoch and ``step_key(epoch, i)``
    the key of its ``i``-th update, so a loop resumed from a saved :class:`FitState` continues
    exactly as an uninterrupted one. The training loss of an epoch is the mean of its updates'
    losses. With ``validate(params) -> loss`` the parameters of the epoch with the lowest
    validation loss are kept in ``best_params`` (of the last epoch unless
    ``select_by_validation``). ``on_step(epoch, i, info)`` runs after every update,
    ``on_epoch(fit)`` after every epoch (e.g. to save a checkpoint).
    """
    for epoch in range(fit.epochs_done, epochs):
        state, losses = fit.train, []
        for i, batch in enumerate(batches(epoch)):
            state, info = step(state, batch, step_key(epoch, i))
            losses.append(info.loss)
            if on_step is not None:
                on_step(epoch, i, info)
        train_loss = (*fit.train_loss, float(np.mean(tree_to_host(losses))))
        best = (fit.best_params, fit.best_val, fit.best_epoch)
        val_loss = fit.val_loss
        if validate is not None:
            val = float(validate(state.params))
            val_loss = (*val_loss, val)
            if not select_by_validation or val <= fit.best_val:
                best = (tree_to_host(state.params), val, epoch + 1)
        fit = FitState(state, epoch + 1, *best, train_loss, val_loss)
        if on_epoch is not None:
            on_epoch(fit)
    return fit
