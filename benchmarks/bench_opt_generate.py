"""Beam-search generation speed: our jitted decoder vs ``transformers`` ``generate`` (PyTorch).

The paper's setting on the OPT-125m shape with random weights: 4 prompts of 64 tokens, 5 beams,
exactly 64 new tokens (``min_new_tokens = max_new_tokens = 64``), optionally a repetition
penalty. Both run in this process on the same checkpoint (float32); the script also checks that
the two produce the same tokens. Generated tokens/s counts the returned new tokens
(prompts × new tokens), as the peer figure does.

    python benchmarks/bench_opt_generate.py            # OPT-125m shape
    python benchmarks/bench_opt_generate.py --quick    # a small shape, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def _hf_config(quick: bool):
    import transformers

    if quick:
        return transformers.OPTConfig(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            ffn_dim=512,
            num_attention_heads=4,
            max_position_embeddings=256,
            dropout=0.0,
        )
    from collapse_jax.core.paths import data_dir

    config_file = None
    try:
        config_file = Path(data_dir()) / "opt-125m-config" / "config.json"
    except Exception:  # no data directory: OPT-125m's defaults are transformers' defaults
        config_file = None
    if config_file is not None and config_file.is_file():
        raw = json.loads(config_file.read_text())
        return transformers.OPTConfig(**{**raw, "dropout": 0.0})
    return transformers.OPTConfig(dropout=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for a smoke run")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (64)")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of ours (best kept)")
    parser.add_argument("--skip-peer", action="store_true", help="time ours only")
    parser.add_argument("--torch-device", default="cpu", help="the peer's device (cpu, cuda)")
    args = parser.parse_args()

    import torch
    import transformers

    from collapse_jax.families.lm import decoding
    from collapse_jax.families.lm.opt import OPTForCausalLM
    from collapse_jax.families.lm.opt_weights import load_pretrained

    quick = args.quick
    n_prompts = args.prompts or (2 if quick else 4)
    prompt_len = args.prompt_len or (16 if quick else 64)
    new_tokens = args.new_tokens or (16 if quick else 64)
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(_hf_config(quick)).eval()
    vocab = hf.config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (n_prompts, prompt_len)).astype(np.int64)
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    settings = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_beams=args.beams,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=hf.config.eos_token_id,
        pad_token_id=hf.config.pad_token_id,
    )

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        config, params = load_pretrained(tmp)
    params = jax.device_put(params)
    model = OPTForCausalLM(config)
    fn = decoding.generate_fn(model, **settings)

    t0 = time.perf_counter()
    out = fn(params, ids, mask)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = fn(params, ids, mask)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    generated = n_prompts * new_tokens
    ours_rate = generated / best

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} "
        "threads)"
    )
    n_params = sum(p.numel() for p in hf.parameters())
    print(
        f"shape: {n_params / 1e6:.1f}M params, {n_prompts} prompts x {prompt_len} tokens, "
        f"{args.beams} beams, {new_tokens} new tokens, repetition_penalty "
        f"{args.repetition_penalty}"
    )
    print(
        f"ours:   {ours_rate:8.1f} generated tokens/s ({best:.2f} s; first call with "
        f"compilation {first:.1f} s)"
    )
    if args.skip_peer:
        return
    dev = torch.device(args.torch_device)
    hf = hf.to(dev)
    t_ids, t_mask = torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)
    with torch.no_grad():
        # warm-up (first-call allocations and dispatch), then the timed run
        hf.generate(
            t_ids,
            attention_mask=t_mask,
            do_sample=False,
            **{**settings, "max_new_tokens": 2, "min_new_tokens": 2},
        )
        t0 = time.perf_counter()
        ref = hf.generate(t_ids, attention_mask=t_mask, do_sample=False, **settings).cpu()
        peer = time.perf_counter() - t0
    peer_rate = generated / peer
    same = np.array_equal(np.asarray(out.sequences), ref.numpy())
    print(
        f"peer:   {peer_rate:8.1f} generated tokens/s ({peer:.2f} s, transformers "
        f"{transformers.__version__} generate on {dev})"
    )
    print(f"ratio (ours / peer): {ours_rate / peer_rate:.2f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
