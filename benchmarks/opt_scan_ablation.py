"""Where the scanned OPT step loses throughput: the train step timed in variants, one process.

Usage: python benchmarks/opt_scan_ablation.py [--batch 32] [--seq 512] [--steps 10]
       [--dtype bfloat16] [--variants unrolled,scanned,...]

Each variant is the OPT-125m train step (AdamW + clipping, same random weights and batches) with
one thing changed: layers unrolled or scanned (parameters stored stacked), dropout on or off,
activation recomputation (``remat``: ``full`` or a ``jax.checkpoint_policies`` name), only the
forward loss, or the attention core (``collapse_jax.families.lm.attention``). Prints each
variant's step compile time and tokens/s, its ratio to the unrolled step with the same dropout
and attention ``xla`` (the step before the attention cores), and with ``--profile DIR`` a trace
of two steps per variant (``DIR/VARIANT``) for a kernel-by-kernel comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

# name: (scan_layers, dropout, remat, forward only, attention core)
VARIANTS = {
    "unrolled": (False, True, False, False, "xla"),
    "scanned": (True, True, False, False, "xla"),
    "unrolled-nodrop": (False, False, False, False, "xla"),
    "scanned-nodrop": (True, False, False, False, "xla"),
    "scanned-dots": (True, True, "dots_with_no_batch_dims_saveable", False, "xla"),
    "scanned-full": (True, True, True, False, "xla"),
    "unrolled-fwd": (False, True, False, True, "xla"),
    "scanned-fwd": (True, True, False, True, "xla"),
    "unrolled-probs": (False, True, False, False, "saved_probs"),
    "scanned-probs": (True, True, False, False, "saved_probs"),
    "scanned-probs-full": (True, True, True, False, "saved_probs"),
    "unrolled-cudnn": (False, True, False, False, "cudnn"),
    "scanned-cudnn": (True, True, False, False, "cudnn"),
    "scanned-cudnn-full": (True, True, True, False, "cudnn"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", default=None, help="also trace 2 steps of each variant here")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from collapse_jax.core import training as T
    from collapse_jax.families.lm import training as LT
    from collapse_jax.families.lm.opt import OPTConfig, stack_layers
    from collapse_jax.families.lm.opt_weights import load_pretrained

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_opt_train import time_step

    torch.manual_seed(0)
    hf_kwargs = OPTConfig().to_hf_dict()
    hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in ("architectures", "model_type")}
    with tempfile.TemporaryDirectory() as tmp:
        transformers.OPTForCausalLM(transformers.OPTConfig(**hf_kwargs)).save_pretrained(tmp)
        config, params = load_pretrained(tmp)
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, 50272, size=(args.batch, args.seq)) for _ in range(args.steps + 1)]
    mask = np.ones((args.batch, args.seq), np.int32)
    tokens = args.batch * (args.seq - 1)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    opt_cfg = T.OptimizerConfig(learning_rate=1e-5, warmup_steps=0, total_steps=1000)
    mesh = T.make_mesh()
    key = jax.random.key(0)
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}, "
        f"batch {args.batch} x {args.seq}, {args.steps} timed steps"
    )

    def put(ids):
        return T.shard_batch({"input_ids": ids.astype(np.int32), "attention_mask": mask}, mesh)

    def measure(name, results):
        scan, dropout, remat, forward, core = VARIANTS[name]
        apply_fn = LT.opt_apply_fn(config, dtype, remat=remat, scan_layers=scan, attention=core)
        tree = stack_layers(params) if scan else params
        state, step = LT.make_lm_train_step(apply_fn, opt_cfg, tree, mesh, dropout=dropout)
        if forward:
            sums = jax.jit(
                lambda s, b, k: LT.causal_lm_sums(apply_fn, s.params, b, k, deterministic=False)
            )

            def step(s, b, k, sums=sums):
                return s, sums(s, b, k)

            step.lower = lambda s, b, k, sums=sums: sums.lower(s, b, k)
        compile_s, seconds, state, info = time_step(step, state, [put(b) for b in batches], key)
        rate = args.steps * tokens / seconds
        results[name] = rate
        base = ("unrolled" if dropout else "unrolled-nodrop") if not forward else "unrolled-fwd"
        ratio = f", {rate / results[base]:.2f}x {base}" if base in results and base != name else ""
        print(f"{name:18s} compile {compile_s:6.1f} s  {rate:12,.0f} tokens/s{ratio}", flush=True)
        if args.profile:
            with jax.profiler.trace(os.path.join(args.profile, name)):
                for i in range(2):
                    state, info = step(state, put(batches[i]), jax.random.fold_in(key, i))
                jax.block_until_ready((state, info))
        del state, step

    results = {}
    for name in names:
        try:
            measure(name, results)
        except Exception as e:  # one variant that does not run on this device
            print(f"{name:18s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
