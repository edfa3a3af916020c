"""Training throughput: our jitted OPT step vs transformers' PyTorch eager, same process.

Usage: python benchmarks/bench_opt_train.py [--quick] [--batch 8] [--seq 64] [--steps 5]
       [--dtype float32|bfloat16] [--peak-gflops G]

Both sides train OPTForCausalLM (OPT-125m shape, or a small shape with --quick) from the same
random weights on the same random token batches with AdamW, dropout on, full float32 unless
--dtype bfloat16 (ours only). Prints tokens/s of each, their ratio, and the model FLOPs
utilisation estimate 6 · N · tokens/s / peak (N = parameter count).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def peak_flops_guess() -> tuple[float, str]:
    """Peak float32 FLOP/s of the first device (GPU/TPU tables are rough; CPU from the
    measured matmul ceiling of this project's reference machine unless --peak-gflops)."""
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "").lower()
    table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "v5": 197e12, "v4": 275e12}
    for name, peak in table.items():
        if name in kind:
            return peak, f"{dev.device_kind} dense bf16 peak"
    return 266e9, "measured JAX float32 matmul ceiling of the 2-core reference CPU"


def time_step(step, state, batches, key):
    """(compile seconds, seconds of the timed steps, state, last info) of a jitted train step:
    ``step.lower(...).compile()`` on the first batch, one warm-up step on it, then one timed
    step per remaining batch (step i's key ``fold_in(key, i)``)."""
    import jax

    t0 = time.perf_counter()
    step.lower(state, batches[0], jax.random.fold_in(key, 0)).compile()
    compile_s = time.perf_counter() - t0
    state, info = step(state, batches[0], jax.random.fold_in(key, 0))
    jax.block_until_ready(info)
    t0 = time.perf_counter()
    for i in range(1, len(batches)):
        state, info = step(state, batches[i], jax.random.fold_in(key, i))
    jax.block_until_ready((state, info))
    return compile_s, time.perf_counter() - t0, state, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model shape, few steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="timed steps (after one warm-up)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--torch-device", default="cpu", help="the peer's device (cpu, cuda)")
    p.add_argument("--skip-torch", action="store_true", help="time only our step (e.g. on GPU)")
    p.add_argument("--peak-gflops", type=float, default=None, help="device peak for the MFU")
    p.add_argument(
        "--compare-scan",
        action="store_true",
        help="also time the step with the layers scanned over parameters stored stacked "
        "(OPTForCausalLM(scan_layers=True), stack_layers)",
    )
    p.add_argument(
        "--scan-unroll",
        default="1",
        help="with --compare-scan: comma-separated layers per scan iteration to time (e.g. 1,2,4)",
    )
    args = p.parse_args(argv)
    unrolls = [int(u) for u in args.scan_unroll.split(",")]

    import jax
    import jax.numpy as jnp

    from collapse_jax.core import training as T
    from collapse_jax.families.lm import training as LT
    from collapse_jax.families.lm.opt import OPTConfig, num_params, stack_layers
    from collapse_jax.families.lm.opt_weights import load_pretrained

    if args.quick:
        hf_kwargs = dict(
            vocab_size=50272,
            hidden_size=256,
            num_hidden_layers=4,
            ffn_dim=1024,
            num_attention_heads=4,
            max_position_embeddings=2048,
        )
        steps = args.steps or 3
    else:
        hf_kwargs = OPTConfig().to_hf_dict()  # OPT-125m
        steps = args.steps or 5
    batch, seq = args.batch, args.seq
    rng = np.random.default_rng(0)
    batches = [rng.integers(3, 50272, size=(batch, seq)) for _ in range(steps + 1)]
    mask = np.ones((batch, seq), np.int32)
    tokens_per_step = batch * (seq - 1)

    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in ("architectures", "model_type")}
    hf_model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        config, params = load_pretrained(tmp)
    n_params = num_params(params)
    print(
        f"model: {n_params / 1e6:.1f}M parameters, batch {batch} x {seq} tokens, "
        f"{steps} timed steps, device {jax.devices()[0].device_kind} x {jax.device_count()}"
    )

    # --- ours ---
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    opt_cfg = T.OptimizerConfig(learning_rate=1e-5, warmup_steps=0, total_steps=1000)
    mesh = T.make_mesh()
    key = jax.random.key(0)

    def put(ids):
        return T.shard_batch({"input_ids": ids.astype(np.int32), "attention_mask": mask}, mesh)

    def measure(scan_layers: bool, unroll: int = 1):
        """(compile seconds, tokens/s, loss, recompiles) of our step, layers scanned or unrolled."""
        apply_fn = LT.opt_apply_fn(config, dtype, scan_layers=scan_layers, scan_unroll=unroll)
        tree = stack_layers(params) if scan_layers else params  # scanned: stored stacked
        state, step = LT.make_lm_train_step(apply_fn, opt_cfg, tree, mesh)
        compile_s, seconds, state, info = time_step(step, state, [put(b) for b in batches], key)
        rate = steps * tokens_per_step / seconds
        return compile_s, rate, float(info.loss), step._cache_size() - 1

    results = {}
    for variant in [0, *unrolls] if args.compare_scan else [0]:  # 0: unrolled
        results[variant] = measure(variant > 0, max(variant, 1))
        c, rate, loss, recompiles = results[variant]
        kind = f"layers scanned, unroll {variant}" if variant else "layers unrolled"
        print(f"ours ({args.dtype}, {kind}): {rate:,.0f} tokens/s (step compile {c:.1f} s)")
        print(f"  loss {loss:.4f}, recompiles after warm-up: {recompiles}")
        if variant:
            (c_u, r_u, _, _) = results[0]
            print(
                f"  scanned vs unrolled: compile {c_u / c:.2f}x shorter, tokens/s {rate / r_u:.2f}x"
            )
    ours = results[0][1]

    if args.peak_gflops:
        peak, peak_desc = args.peak_gflops * 1e9, "given peak"
    else:
        peak, peak_desc = peak_flops_guess()
    mfu = 6 * n_params * ours / peak
    print(f"  model FLOPs utilisation 6·N·tokens/s / peak = {mfu:.1%} (peak: {peak_desc})")

    if args.skip_torch:
        return 0
    # --- transformers, PyTorch eager ---
    dev = torch.device(args.torch_device)
    hf_model = hf_model.to(dev).train()
    optim = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, weight_decay=0.0)
    tmask = torch.tensor(mask, dtype=torch.long, device=dev)

    def torch_step(ids):
        ids = torch.tensor(ids, dtype=torch.long, device=dev)
        out = hf_model(input_ids=ids, attention_mask=tmask, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    torch_step(batches[0])
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        loss = torch_step(batches[i])
    theirs = steps * tokens_per_step / (time.perf_counter() - t0)
    print(
        f"transformers eager (torch {torch.__version__}, {args.torch_threads} threads): "
        f"{theirs:,.0f} tokens/s, loss {loss:.4f}"
    )
    print(f"ratio ours / transformers: {ours / theirs:.2f}x")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
