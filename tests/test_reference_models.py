"""The shipped MNIST reference models: they load in one call, are small, and do what their cards say."""

import os

import numpy as np
import torch
from tiny import check_shipped_classifier

from benchmarks.data import load_mnist
from benchmarks.harness.training import denoising_psnr
from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_reference_models, model_card


def test_files_are_safetensors_under_10mb_with_cards():
    for name in REFERENCE_FILES["mnist"]:
        path = os.path.join(MODELS_DIR, name)
        assert path.endswith(".safetensors") and os.path.getsize(path) < 10 * 2**20
        card = model_card(path)
        assert {"seed", "metrics", "command", "train_split"} <= set(card)


def test_classifier_accuracy_on_held_out_split():
    check_shipped_classifier("mnist", *load_mnist("test"), minimum=0.98)


def test_prior_denoises_better_than_the_noisy_input():
    _, prior = load_reference_models("mnist")
    x, _ = load_mnist("test", n=200)
    psnr = denoising_psnr(prior, x)
    for sigma, value in psnr.items():
        noisy_psnr = -10 * np.log10(float(sigma) ** 2)  # PSNR of the noisy input itself (MSE = sigma^2)
        assert value > noisy_psnr + 3.0, (sigma, value)
    # The score points toward the data: a small step along it lowers the distance to the clean image.
    xt = torch.from_numpy(x[:50])
    noisy = xt + 0.25 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stepped = noisy + 0.25**2 * 0.5 * prior.score(noisy, 0.25)
    assert (stepped - xt).pow(2).mean() < (noisy - xt).pow(2).mean()
