"""Training-step throughput (images/s) of the Flax VAE vs the same architecture in PyTorch.

Both run in this process on the same random batch: our jitted, sharded Optax step
(``collapse_jax.families.vae.model``) and an eager PyTorch step (``torch.set_num_threads(2)``) with the
paper's architecture, loss (summed BCE + KL) and ``Adam(lr=1e-3, weight_decay=1e-5)``. Rounds
alternate between the two and the best round of each is reported, so that load from other
processes on the machine affects both alike.

    python benchmarks/bench_vae.py [--quick] [--batch 256] [--widths 64,128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def bench_jax(widths, batch, steps, rounds_x):
    import jax

    from collapse_jax.core import training as tr
    from collapse_jax.families.vae import model as vae

    cfg = vae.VAEConfig(channels1=widths[0], channels2=widths[1])
    model, opt = vae.make_model(cfg), vae.make_optimizer(cfg)
    mesh = tr.data_mesh(batch)
    step = vae.make_train_step(model, opt, mesh)
    state = tr.init_train_state(vae.init_params(model, jax.random.key(0)), opt, mesh)
    x = tr.shard_batch(rounds_x, mesh)
    t0 = time.perf_counter()
    state, info = step(state, x, jax.random.key(0))
    info.loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        st = holder["state"]
        t = time.perf_counter()
        for i in range(steps):
            st, info = step(st, x, jax.random.key(i))
        info.loss.block_until_ready()
        holder["state"] = st
        return steps * batch / (time.perf_counter() - t)

    return run, compile_s, vae.count_params(state.params), len(mesh.devices.ravel())


def bench_torch(widths, batch, steps, x_np, device="cpu"):
    import torch
    from torch import nn

    torch.set_num_threads(2)
    c1, c2 = widths

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(
                nn.Conv2d(1, c1, 4, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),
                nn.Flatten(),
            )  # fmt: skip
            self.mean = nn.Linear(7 * 7 * c2, 20)
            self.logvar = nn.Linear(7 * 7 * c2, 20)
            self.fc = nn.Linear(20, 7 * 7 * c2)
            self.dec = nn.Sequential(
                nn.ReLU(), nn.Unflatten(1, (c2, 7, 7)), nn.ConvTranspose2d(c2, c1, 4, 2, 1),
                nn.ReLU(), nn.ConvTranspose2d(c1, 1, 4, 2, 1),
            )  # fmt: skip

        def forward(self, x):
            h = self.enc(x)
            mu, logvar = self.mean(h), self.logvar(h)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            return self.dec(self.fc(z)), mu, logvar

    torch.manual_seed(0)
    dev = torch.device(device)
    model = VAE().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bce = nn.BCEWithLogitsLoss(reduction="sum")

    def one():
        logits, mu, logvar = model(x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (bce(logits, x) + kl) / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    one()

    def run():
        t = time.perf_counter()
        for _ in range(steps):
            one()
        sync()
        return steps * batch / (time.perf_counter() - t)

    return run, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--widths", default="64,128", help="encoder conv widths (paper: 64,128)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--torch-device", default="cpu", help="the peer's device (cpu, cuda)")
    args = ap.parse_args()
    widths = tuple(int(v) for v in args.widths.split(","))
    steps = args.steps or (5 if args.quick else 20)
    rounds = args.rounds or (2 if args.quick else 3)
    x = np.random.default_rng(0).random((args.batch, 28, 28, 1)).astype(np.float32)

    import jax

    jax_run, compile_s, n_jax, n_dev = bench_jax(widths, args.batch, steps, x)
    torch_run, n_torch = bench_torch(widths, args.batch, steps, x, args.torch_device)
    assert n_jax == n_torch, (n_jax, n_torch)
    ours, peer = [], []
    for _ in range(rounds):
        ours.append(jax_run())
        peer.append(torch_run())
    best_ours, best_peer = max(ours), max(peer)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform} x{n_dev}")  # fmt: skip
    print(f"conv VAE widths {widths}, {n_jax:,} parameters, batch {args.batch}, "
          f"{steps} steps x {rounds} rounds (best round)")  # fmt: skip
    print(f"  collapse_jax (Flax + Optax, jit): {best_ours:10,.0f} images/s  "
          f"(compile {compile_s:.1f} s; rounds {', '.join(f'{v:,.0f}' for v in ours)})")  # fmt: skip
    print(f"  PyTorch eager ({args.torch_device:>4})          : {best_peer:10,.0f} images/s  "
          f"(rounds {', '.join(f'{v:,.0f}' for v in peer)})")  # fmt: skip
    print(f"  ratio ours / PyTorch: {best_ours / best_peer:.2f}x")


if __name__ == "__main__":
    main()
