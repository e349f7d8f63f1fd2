"""``python -m benchmarks check-prior PATH``: what a prior file is, the conventions it is used with, and whether it
denoises.

Prints the detected format and config, the conventions (data range, noise parametrisation, time input), the parameter
count, the card of the public checkpoint it matches (``purifiers/cards/``) and its file's SHA256, then a self-test:
denoising PSNR at pixel sigma 0.05 / 0.1 / 0.25 / 0.5 on images of the matching dataset against the identity's PSNR
(the noisy image itself). A prior worse than the identity is flagged loudly and the command exits with status 1: that
is the symptom of a wrong convention (time scaled by 999 or not, [-1, 1] or [0, 1] data, score or sigma times score).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from torch import nn

SIGMAS = (0.05, 0.1, 0.25, 0.5)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def check_prior(source, *, format: str | None = None, config=None, ema: bool = True, data: str | None = None,
                n: int = 16, seed: int = 0, device: str = "cpu", verbose: bool = True) -> dict:
    """Load ``source`` (a path or a :class:`~purifiers.priors.backends.Prior`), print its card and run the denoising self-test.

    :returns: ``{"card", "known_checkpoint", "sha256", "data", "psnr": {sigma: {"prior", "identity"}},
        "worse_than_identity": [sigma, ...], "ok"}``; ``ok`` is False when the prior does worse than the identity at any
        sigma.
    """
    from purifiers.priors.backends import Prior
    from purifiers.priors.checkpoints import find_card
    from purifiers.priors.loading import load_prior

    say = print if verbose else (lambda *a, **k: None)
    if isinstance(source, Prior):
        prior = source.to(device).eval()
    else:
        prior = load_prior(source, format=format, config=config, ema=ema, device=device)
    card = prior.describe()
    known = find_card(card)
    sha256 = _sha256(source) if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) else None
    say(f"prior: {source if not isinstance(source, Prior) else type(source).__name__}")
    for key, value in card.items():
        say(f"  {key}: {value:,}" if isinstance(value, int) else f"  {key}: {value}")
    if known:
        say(f"known checkpoint: {known['name']}\n  used by: {'; '.join(known['used_by'])}\n  source: {known['source']}")
        if known.get("sha256") and sha256 and known["sha256"] != sha256:
            say(f"  WARNING: SHA256 {sha256} differs from the card's {known['sha256']}: not the published file.")
    if sha256:
        say(f"  sha256: {sha256}")

    x, data_name = _images(data, _input_channels(prior), n)
    say(f"self-test: denoising PSNR on {len(x)} images of {data_name}, noise at pixel sigma "
        f"{', '.join(map(str, SIGMAS))}")
    x = torch.from_numpy(x).to(device)
    check_fits(prior, x[:1], data_name)
    generator = torch.Generator().manual_seed(seed)
    psnr, worse = {}, []
    for sigma in SIGMAS:
        noisy = x + sigma * torch.randn(x.shape, generator=generator).to(x)
        with torch.no_grad():
            denoised = prior.denoise(noisy, sigma)
        psnr[sigma] = {"prior": _psnr(denoised, x), "identity": _psnr(noisy, x)}
        flag = psnr[sigma]["prior"] < psnr[sigma]["identity"]
        if flag:
            worse.append(sigma)
        say(f"  sigma {sigma:<5} prior {psnr[sigma]['prior']:6.2f} dB   identity {psnr[sigma]['identity']:6.2f} dB"
            + ("   <-- WORSE THAN THE IDENTITY" if flag else ""))
    if worse:
        say(f"FAILED: the prior denoises worse than doing nothing at sigma {', '.join(map(str, worse))}. The usual "
            "cause is a wrong convention: data range ([0, 1] or [-1, 1]), time input (999 t or t, sigma or level), "
            "or output scaling (epsilon, score, sigma times score). Check --format/--config; for a random or "
            "mismatched network this is expected.")
    else:
        say("OK: the prior beats the identity at every sigma.")
    return {"card": card, "known_checkpoint": known, "sha256": sha256, "data": data_name, "psnr": psnr,
            "worse_than_identity": worse, "ok": not worse}


def check_fits(prior, x: torch.Tensor, data_name: str) -> None:
    """Denoise one image of the data first, so that a prior built for other images is refused by name: a network of
    other channels or size fails inside (a conv of other input channels, a side its U-Net cannot halve and join again,
    a resolution its attention layers or input pyramid are fixed to) with an error that names neither the prior nor
    the data."""
    try:
        with torch.no_grad():
            prior.denoise(x, SIGMAS[0])
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"the prior cannot denoise the {tuple(x.shape[1:])} images of {data_name} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); give --data with "
                         "images of the size and channels it was trained on.") from err


def _psnr(estimate: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), images on [0, 1]."""
    mse = ((estimate - clean) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _input_channels(prior: nn.Module) -> int | None:
    """The in_channels of the prior's first convolution (None for a prior without one, e.g. GaussianPrior)."""
    conv = next((m for m in prior.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _images(data: str | None, channels: int | None, n: int) -> tuple[np.ndarray, str]:
    from benchmarks.data import load_cifar10, load_fashion_mnist, load_mnist

    if data is None:
        if channels not in (None, 1):
            raise ValueError(f"the prior takes {channels}-channel images: give --data (a CIFAR-10 folder holding "
                             "cifar-10-batches-py/, or a folder of images); bundled MNIST is one-channel.")
        data = "mnist"
    if data == "mnist":
        x, name = load_mnist("test", n=n)[0], "bundled MNIST (test split)"
    elif data == "fashion_mnist":
        x, name = load_fashion_mnist("test", n=n)[0], "Fashion-MNIST (test split)"
    elif os.path.isdir(os.path.join(data, "cifar-10-batches-py")):
        x, name = load_cifar10(data, "test", n=n)[0], f"CIFAR-10 ({data}, test split)"
    elif os.path.isdir(data):
        x, name = _image_folder(data, channels or 3, n), f"images in {data}"
    else:
        raise FileNotFoundError(f"--data {data!r}: not 'mnist', 'fashion_mnist', a CIFAR-10 folder or a folder of "
                                "images.")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"the prior takes {channels}-channel images but {name} has {x.shape[1]}; "
                         "give matching --data.")
    return x, name


def _image_folder(folder: str, channels: int, n: int) -> np.ndarray:
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))[:n]
    if not files:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    arrays = []
    for name in files:
        with Image.open(os.path.join(folder, name)) as image:
            arrays.append(np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"the images in {folder} differ in size ({sorted(sizes)}); use one size (the prior's).")
    x = np.stack(arrays)
    return (x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2)).astype(np.float32)
