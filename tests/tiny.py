"""Tiny models, images and shared checks for the purifier tests (8x8 grey images, float64 where gradients are compared
with finite differences). The fixtures built from them live in ``conftest.py``."""

import numpy as np
import torch
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from purifiers import EDMDenoiser, PurifiedClassifier, PurifierPyTorch, gradient_mode
from purifiers.nets.unet import SmallUNet

SIZE = 8


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_prior(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    prior = EDMDenoiser(SmallUNet(1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, emb_dim=16))
    for p in prior.parameters():  # the U-Net's last conv starts at zero: perturb every weight so D is not a no-op
        nn.init.normal_(p, std=0.05)
    return prior.to(dtype).eval().requires_grad_(False)


def images(n=2, low=0.3, high=0.7, dtype=torch.float64, seed=0):
    return (low + (high - low) * torch.rand(n, 1, SIZE, SIZE, generator=gen(seed))).to(dtype)


def linear_classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 10)).eval()


def check_shipped_classifier(dataset, x, y, minimum):
    """The shipped classifier of ``dataset`` reaches ``minimum`` accuracy on ``(x, y)``, the accuracy its card states."""
    import os

    from benchmarks.harness.training import accuracy
    from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_reference_models, model_card

    acc = accuracy(load_reference_models(dataset)[0], x, y)
    assert acc >= minimum
    card = model_card(os.path.join(MODELS_DIR, REFERENCE_FILES[dataset][0]))
    assert abs(card["metrics"]["test_accuracy"] - acc) < 1e-9


def art_classifier(model, defences=(), nb_classes=10, loss=None):
    return PyTorchClassifier(model, loss=loss or nn.CrossEntropyLoss(), input_shape=(1, SIZE, SIZE),
                             nb_classes=nb_classes, clip_values=(0.0, 1.0), preprocessing_defences=list(defences),
                             device_type="cpu")


def check_bpda_gradient(purifier, model, min_move):
    """ART's loss gradient through a ``gradient="bpda"`` purifier equals the classifier's own input gradient at the
    purified point (the same noise: the generator is reset in between)."""
    x, y = images(n=3, dtype=torch.float32).numpy(), np.eye(10, dtype=np.float32)[[1, 4, 7]]  # ART: one-hot labels
    grad = art_classifier(model, [purifier]).loss_gradient(x, y)
    purifier.reset_generator()
    purified, _ = purifier(x)
    expected = art_classifier(model).loss_gradient(purified, y)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert np.abs(purified - x).max() > min_move  # the purifier did move the input


def check_art_attacks_run(classifier, x, y, eps=0.05, eps_step=0.02, apgd_iter=2):
    """ART's PGD and APGD run through the defended ``classifier``, stay in the eps-ball and move the input.

    ART draws APGD's random start from numpy's global generator, and APGD keeps the input where no iterate raised the
    (stochastic) defended loss: the global generator is seeded so the outcome does not hang on earlier tests."""
    np.random.seed(0)
    for attack in (ProjectedGradientDescent(classifier, eps=eps, eps_step=eps_step, max_iter=2, verbose=False),
                   AutoProjectedGradientDescent(classifier, eps=eps, eps_step=eps_step, max_iter=apgd_iter,
                                                nb_random_init=1, loss_type="cross_entropy", verbose=False)):
        x_adv = attack.generate(x, y=y)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert np.abs(x_adv - x).max() <= eps + 1e-6
        assert np.abs(x_adv - x).max() > 0.0, f"{type(attack).__name__} did not move the input"


def check_exact_pgd_increases_the_defended_loss(purifier, model, nb_classes, eps_step, max_iter):
    """ART's PGD through the exact gradient raises the deployed defense's loss (same purification noise)."""
    classifier = art_classifier(model, [purifier], nb_classes=nb_classes, loss=nn.CrossEntropyLoss(reduction="sum"))
    x, y = images(n=3, dtype=torch.float32).numpy(), np.array([0, 1, 2])
    x_adv = ProjectedGradientDescent(classifier, eps=0.1, eps_step=eps_step, max_iter=max_iter,
                                     verbose=False).generate(x, y=y)
    defended = PurifiedClassifier(purifier, model)

    def loss(inp):
        purifier.reset_generator()
        with torch.no_grad():
            return nn.functional.nll_loss(defended(torch.from_numpy(inp)), torch.from_numpy(y)).item()

    assert loss(x_adv) > loss(x) + 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Small random networks saved in the authors' checkpoint containers (score_sde's checkpoint_*.pth, NCSNv2's
# checkpoint.pth), written the way their training loops write them.

TINY_SCORE_SDE = {  # the CIFAR-10 configs' structure (VP DDPM++, VE NCSN++ with FIR and the input pyramid), shrunk
    "vp": dict(sde="vpsde", nf=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
               embedding_type="positional", centered=True),
    "ve": dict(sde="vesde", nf=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
               embedding_type="fourier", fir=True, progressive_input="residual", scale_by_sigma=True, centered=False),
}
TINY_NCSNV2 = dict(ngf=4, num_classes=10, sigma_begin=1.0, sigma_end=0.01)


def tiny_score_sde(kind="vp", seed=0, image_size=32):
    from purifiers.nets.score_sde import NCSNpp, ScoreSDEConfig

    torch.manual_seed(seed)
    return NCSNpp(ScoreSDEConfig.from_mapping({**TINY_SCORE_SDE[kind], "image_size": image_size})).eval()


def tiny_ncsnv2(seed=0):
    from purifiers.nets.ncsnv2 import NCSNv2, NCSNv2Config

    torch.manual_seed(seed)
    return NCSNv2(NCSNv2Config(**TINY_NCSNV2)).eval()


def _raw_weights(net, seed):
    """The 'model' entry's weights: the trained (EMA-averaged) parameters plus noise, so a test can tell which of the
    two was loaded; buffers and frozen parameters (score_sde's Fourier ``W``) are never averaged, so they stay."""
    g = gen(seed)
    trainable = {k for k, p in net.named_parameters() if p.requires_grad}
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if k in trainable else v
            for k, v in net.state_dict().items()}


def save_score_sde_checkpoint(net, path, seed=1):
    """score_sde's ``save_checkpoint``: {optimizer, model, ema, step}; ``module.`` keys (DataParallel); the EMA's
    ``shadow_params`` are the trainable parameters in ``parameters()`` order (here: the network's own weights)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    torch.save({"optimizer": torch.optim.Adam(trainable).state_dict(),
                "model": {f"module.{k}": v for k, v in _raw_weights(net, seed).items()},
                "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": [p.detach().clone() for p in trainable]},
                "step": 3}, path)


def save_ncsnv2_checkpoint(net, path, seed=1):
    """NCSNv2's runner: [state_dict, optimizer, epoch, step, ema] with ``module.`` keys; the EMA keyed by unprefixed
    names (here: the network's own weights)."""
    torch.save([{f"module.{k}": v for k, v in _raw_weights(net, seed).items()},
                torch.optim.Adam(net.parameters()).state_dict(), 1, 3,
                {k: p.detach().clone() for k, p in net.named_parameters()}], path)


# A toy purifier: Gaussian noise, then the exact denoiser of a Gaussian prior (a module:function factory, also for
# commands run in a subprocess with tests/ on PYTHONPATH: --defense tiny:make_toy).

class NoiseDenoise(nn.Module):
    """x -> D(x + sigma n, sigma): one-shot denoising of a noised input."""

    def __init__(self, prior, sigma: float):
        super().__init__()
        self.prior, self.sigma = prior, sigma

    def forward(self, x, generator=None):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.prior.denoise(x + self.sigma * noise, self.sigma).clamp(0, 1)


class ToyPurifier(PurifierPyTorch):
    def __init__(self, prior, sigma=0.2, **kwargs):
        super().__init__(NoiseDenoise(prior, sigma), **kwargs)

    @gradient_mode("exact")
    def _exact(self, x, generator):
        return self.algorithm(x, generator=generator)


def make_toy(prior, classifier=None, sigma=0.2, gradient="exact", **kwargs):
    return ToyPurifier(prior, sigma=sigma, gradient=gradient, **kwargs)


def tiny_coup_exact(steps, rows=2):
    """A COUP wrapper with the exact gradient on the tiny prior and ``steps`` Euler steps, and a batch: a picklable
    factory for :func:`benchmarks.harness.profiling.exact_gradient_peak_memory`."""
    from purifiers import COUPPyTorch

    purifier = COUPPyTorch(tiny_prior(torch.float32), linear_classifier(), t_star=2e-3 * steps + 1e-5, dt=2e-3,
                           gradient="exact", seed=0, device_type="cpu")
    return purifier, images(n=rows, dtype=torch.float32)
