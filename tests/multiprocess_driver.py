"""One process of the multi-process check (``tests/test_multiprocess.py``).

``python tests/multiprocess_driver.py OUT N I PORT`` runs the scan runner and the language-model
trainer and decoder as process ``I`` of ``N`` (``N > 1``: ``jax.distributed.initialize`` with a
coordinator on ``127.0.0.1:PORT``) and writes every result, gathered to the host, to
``OUT/process_I.npz``. The caller sets the environment (``JAX_PLATFORMS=cpu`` and the number of
host devices of each process) before this process imports JAX.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np

TINY_OPT = dict(
    vocab_size=101,
    hidden_size=32,
    num_hidden_layers=1,
    ffn_dim=48,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    """``{prefix/path: host array}`` of a pytree (typed keys as key data)."""
    from collapse_jax.core.loop import to_host

    out = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[prefix + jax.tree_util.keystr(path)] = to_host(leaf)
    return out


def scan_runner(out: Path) -> dict[str, np.ndarray]:
    """16 chains for 20 generations of the discrete family (exact count samplers, the host-side
    compaction check between chunks, a per-chain trace, a checkpoint at every chunk and a resume
    from it) and of the Gaussian family (statistics over chains, every third generation)."""
    from collapse_jax.core.loop import run_generations
    from collapse_jax.core.policies import Policy
    from collapse_jax.core.runs import ScanCheckpoint
    from collapse_jax.families.discrete import kernel as dk
    from collapse_jax.families.gaussian import d0 as gd0
    from collapse_jax.families.gaussian import kernel as gk

    res = {}
    chains = 16
    fam = dk.make_family(Policy(), "counts", max_size=8)
    fam = fam._replace(reduce=lambda info: info.metrics)  # per chain: sharded over the chains
    run = functools.partial(
        run_generations,
        fam,
        jax.random.key(1),
        chains,
        np.full(21, 8),
        dk.discrete_params(np.array([0.7, 0.3]), chains),
        chunk_generations=5,
        progress=False,
    )
    r = run()
    res |= flat("discrete/trace", r.trace) | flat("discrete/state", r.state)
    res |= flat("discrete/final_info", r.final_info)
    # Checkpoint at every chunk (the last one is never saved), then resume from the file.
    ckpt = out / "discrete_checkpoint.npz"
    run(checkpoint=ScanCheckpoint(ckpt, every_seconds=0.0))
    assert ckpt.exists(), "no checkpoint was written"
    resumed = run(checkpoint=ScanCheckpoint(ckpt, resume=True))
    res |= flat("discrete/resumed_trace", resumed.trace) | flat("discrete/resumed", resumed.state)

    d0 = gd0.make_d0("normal", 2, mean=[1.0, -2.0], cov=[[2.0, 0.6], [0.6, 0.5]])
    sizes = np.full(21, 10)
    gfam = gk.make_family(d0, sizes[:-1])
    gfam = gfam._replace(
        reduce=functools.partial(gk.reduce_info, log_trace0=float(np.log(d0.trace)))
    )
    g = run_generations(
        gfam,
        jax.random.key(2),
        chains,
        sizes,
        record_every=3,
        chunk_generations=6,
        progress=False,
    )
    res |= flat("gaussian/trace", g.trace) | flat("gaussian/state", g.state)
    res |= flat("gaussian/final_info", g.final_info)
    return res


def lm_trainer_and_decoder(out: Path) -> dict[str, np.ndarray]:
    """A tiny OPT on the data-parallel mesh over every device of every process, through the LM
    study's own functions: ``train_model`` (the core sharded step with dropout and two
    micro-batches, each process feeding its own rows; ``fit_epochs`` selecting the epoch with
    the lowest validation NLL by ``score_blocks``; an Orbax checkpoint after every epoch, written
    by all processes together), then the study's greedy and beam decoders on the parameters
    replicated over the mesh."""
    from collapse_jax.core.host_loop import Progress
    from collapse_jax.families.lm import training as LT
    from collapse_jax.families.lm.config import Config
    from collapse_jax.families.lm.generations import make_decode_fn
    from collapse_jax.families.lm.opt import OPTConfig

    tiny = OPTConfig(**TINY_OPT)
    params0 = jax.device_get(LT.init_model_params(tiny, 0))
    rng = np.random.default_rng(0)
    train = rng.integers(3, tiny.vocab_size, size=(24, 12)).astype(np.int32)
    valid = rng.integers(3, tiny.vocab_size, size=(12, 12)).astype(np.int32)
    res = flat("init/params", params0)

    study = Config(batch_size=8, eval_batch_size=8, grad_accum_steps=2)
    tuned = LT.train_model(
        tiny,
        params0,
        train,
        valid,
        epochs=3,
        learning_rate=3e-3,
        config=study,
        key=jax.random.key(7),
        order_seed=(1, 2),
        ckpt_dir=out / "train_model",
        progress=Progress(False, "train"),
    )
    res["train_model/train_loss"], res["train_model/val_loss"] = tuned.train_loss, tuned.val_loss
    res["train_model/best_epoch"] = np.asarray(tuned.best_epoch)
    res |= flat("train_model/params", tuned.params)

    params = LT.device_params(tuned.params)
    nll, count = LT.score_blocks(tiny, params, valid, 8)
    res["score_blocks/nll"], res["score_blocks/count"] = nll, count
    tokenizer = types.SimpleNamespace(eos_token_id=2, pad_token_id=tiny.pad_token_id)
    for decoding, beams in (("greedy", 1), ("beam", 3)):
        config = Config(block_size=6, decoding=decoding, num_beams=beams)
        decode = make_decode_fn(tiny, config, tokenizer)
        res[f"decode/{decoding}"] = np.asarray(decode(params, valid[:8, :6], jax.random.key(5)))
    return res


def main(out: str, n_processes: int, process_id: int, port: int) -> None:
    out = Path(out)
    if n_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=n_processes,
            process_id=process_id,
        )
    assert jax.process_count() == n_processes and jax.process_index() == process_id
    res = {"devices": np.asarray(jax.device_count()), "local": np.asarray(jax.local_device_count())}
    t0 = time.perf_counter()
    res |= scan_runner(out)
    t1 = time.perf_counter()
    res |= lm_trainer_and_decoder(out)
    t2 = time.perf_counter()
    print(
        f"process {process_id}/{n_processes}: scan {t1 - t0:.1f} s, lm {t2 - t1:.1f} s",
        file=sys.stderr,
    )
    np.savez(out / f"process_{process_id}.npz", **res)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
