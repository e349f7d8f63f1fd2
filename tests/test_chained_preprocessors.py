"""A purifier chained with another ART ``PreprocessorPyTorch`` in a ``PyTorchClassifier`` (ART issue 485: the backward
pass through chained preprocessing defences): ART's ``loss_gradient`` against central finite differences of the same
chain computed here, the straight-through gradient of the ``bpda`` mode in the chain, and the attacks' adapter
(:class:`attacks_adaptive.DefendedModel`) on such chains.

ART 1.20's own PyTorch preprocessors are no use here (``SpatialSmoothingPyTorch`` needs kornia, the MP3 and video ones
are for audio and video), so the other step is :class:`BlurContrast`, defined here with a known forward. The purifier
is the toy of ``tiny.py`` (noise, then a denoiser) in float64 with a fixed seed, reset before every evaluation, so that
the chain is a deterministic function of its input.
"""

import numpy as np
import pytest
import torch
from art.defences.preprocessor import FeatureSqueezing
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
from tiny import art_classifier, images, linear_classifier, make_toy
from torch.nn import functional as F

import attacks_adaptive as aa
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.losses import ce_loss

torch.set_num_threads(1)
ORDERS = ("purifier first", "other first")


class BlurContrast(PreprocessorPyTorch):
    """``x -> clip(0.5 + gain (blur(x) - 0.5), 0, 1)`` with a 3x3 box blur (replicated edges): affine, with a
    Jacobian that is neither diagonal nor the identity; ``clip=False`` leaves the [0, 1] box."""

    params = ["gain", "clip"]

    def __init__(self, gain: float = 1.5, clip: bool = True):
        super().__init__(device_type="cpu", is_fitted=True, apply_fit=False, apply_predict=True)
        self.gain, self.clip = gain, clip

    def forward(self, x, y=None):
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        out = 0.5 + self.gain * (blurred - 0.5)
        return (out.clamp(0, 1) if self.clip else out), y


def chain(prior64, order, gradient="exact", dtype=torch.float64):
    purifier = make_toy(prior64, gradient=gradient, seed=0, device_type="cpu")
    other = BlurContrast()
    steps = [purifier, other] if order == "purifier first" else [other, purifier]
    model = linear_classifier().to(dtype)
    return art_classifier(model, steps), purifier, other, model


def data(n=2):
    return images(n=n, dtype=torch.float64), torch.tensor([3, 7][:n])


def art_gradient(classifier, purifier, x, y):
    purifier.reset_generator()
    return torch.from_numpy(classifier.loss_gradient(x.numpy(), np.eye(10)[y.numpy()]))


def chain_loss(classifier, purifier, x, y, straight_through=()):
    """The mean cross-entropy of the chain at ``x`` (the same noise every call); the steps in ``straight_through``
    pass their value forward and the identity's gradient back."""
    purifier.reset_generator()
    for step in classifier.preprocessing_operations:
        out, _ = step.forward(x, None)
        x = x + (out - x).detach() if step in straight_through else out
    return F.cross_entropy(classifier.model(x), y)


def autograd(classifier, purifier, x, y, **kwargs):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(chain_loss(classifier, purifier, x, y, **kwargs), x)
    return grad


def finite_differences(classifier, purifier, x, y, h=1e-5):
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[i] = h
            e = e.view_as(x)
            grad.view(-1)[i] = (chain_loss(classifier, purifier, x + e, y)
                                - chain_loss(classifier, purifier, x - e, y)) / (2 * h)
    return grad


@pytest.mark.parametrize("order", ORDERS)
def test_exact_gradient_of_the_chain_equals_finite_differences(prior64, order):
    classifier, purifier, other, _ = chain(prior64, order)
    x, y = data(n=1)
    grad = art_gradient(classifier, purifier, x, y)
    fd = finite_differences(classifier, purifier, x, y)
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    # The check can fail: without the other step's Jacobian (its backward taken as the identity) it would.
    without_other = autograd(classifier, purifier, x, y, straight_through=(other,))
    assert (without_other - fd).abs().max() > 100 * (grad - fd).abs().max() + 1e-4


@pytest.mark.parametrize("order", ORDERS)
def test_bpda_gradient_in_the_chain_is_straight_through_the_purifier_only(prior64, order):
    classifier, purifier, other, model = chain(prior64, order, gradient="bpda")
    x, y = data()
    grad = art_gradient(classifier, purifier, x, y)
    # Built from the purifier's value only: the classifier's gradient at the chain's output, pulled back through the
    # other step (where it comes first) or taken at the purified point through it (where the purifier comes first).
    purifier.reset_generator()
    with torch.no_grad():
        inner = x if order == "purifier first" else other.forward(x)[0]
        purified = purifier.forward(inner)[0]
    if order == "purifier first":
        u = purified.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(F.cross_entropy(model(other.forward(u)[0]), y), u)
    else:
        z = purified.clone().requires_grad_(True)
        (g_z,) = torch.autograd.grad(F.cross_entropy(model(z), y), z)
        x_leaf = x.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(other.forward(x_leaf)[0], x_leaf, grad_outputs=g_z)
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-10)
    assert (grad - autograd(classifier, purifier, x, y, straight_through=(purifier, other))).abs().max() > 1e-4


@pytest.mark.parametrize("order", ORDERS)
def test_defended_model_gradient_equals_arts_on_the_chain(prior64, order):
    classifier, purifier, other, _ = chain(prior64, order)
    x, y = data()
    model = DefendedModel.from_target(classifier)
    assert model.purifier is purifier and (model.before is None) == (order == "purifier first")
    purifier.reset_generator()
    grad, _, _ = model.loss_gradient(x, y, ce_loss, 1)
    # ART averages the cross-entropy over the batch; the adapter differentiates each row's loss.
    torch.testing.assert_close(grad / x.shape[0], art_gradient(classifier, purifier, x, y), rtol=1e-7, atol=1e-10)
    purifier.reset_generator()
    logits = model.purified_logits(x, False)
    purifier.reset_generator()
    torch.testing.assert_close(logits.float(), torch.from_numpy(classifier.predict(x.numpy())))  # ART's float32


def test_attacks_run_on_a_step_before_the_purifier(prior64):
    classifier, _, _, _ = chain(prior64, "other first", dtype=torch.float32)  # the attacks work in float32
    x, y = data()
    for attack in (aa.PGDEOT(classifier, eps=0.05, gradient="exact", steps=2, eot=2),
                   aa.DiffHammer(classifier, eps=0.05, steps=1, eot=2),
                   aa.SquareEOT(classifier, eps=0.05, steps=3, eot=2)):
        x_adv = attack(x, y)
        assert 0 < (x_adv - x).abs().max() <= 0.05 + 1e-6, attack.name


@pytest.mark.parametrize("order", ORDERS)
def test_the_runners_fingerprint_sees_the_chained_steps(prior64, order):
    """A saved batch must not be resumed for a chain whose other step changed (the runner's resume key)."""
    from attacks_adaptive.runner import model_fingerprint

    classifier, _, other, _ = chain(prior64, order)
    x, y = data()
    before = model_fingerprint(DefendedModel.from_target(classifier), x, y)
    where = "after" if order == "purifier first" else "before"
    assert before["preprocessing"][where][0] == {"class": "BlurContrast", "gain": "1.5", "clip": "True"}
    other.gain = 1.25
    assert model_fingerprint(DefendedModel.from_target(classifier), x, y) != before


def test_chains_the_adapter_refuses(prior64):
    purifier = make_toy(prior64, seed=0, device_type="cpu")
    model = linear_classifier().double()
    with pytest.raises(ValueError, match="more than one PurifierPyTorch"):
        DefendedModel.from_target(art_classifier(model, [purifier, BlurContrast(), make_toy(prior64)]))
    with pytest.raises(ValueError, match="must be a PreprocessorPyTorch.*FeatureSqueezing"):
        DefendedModel.from_target(art_classifier(model, [FeatureSqueezing(clip_values=(0, 1)), purifier]))
    # A step before the purifier must leave [0, 1] images: the purifier's own input check says so.
    leaving_the_box = DefendedModel.from_target(art_classifier(model, [BlurContrast(gain=4.0, clip=False), purifier]))
    with pytest.raises(ValueError, match="purifier input"):
        leaving_the_box.purified_logits(images(n=2, low=0.0, high=1.0, dtype=torch.float64), False)
