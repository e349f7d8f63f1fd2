"""DiffAttack (attacks_adaptive.diffattack) against independent facts: central finite differences of its full loss
(float64, fixed purification noise and sampled steps), the deviated-reconstruction loss computed by hand for one
Euler step on the Gaussian prior, a toy where the attack must raise the defended loss, and its refusals."""

import math

import pytest
import torch
from tiny import SIZE, gen, images, linear_classifier
from torch import nn

from attacks_adaptive import DiffAttack
from attacks_adaptive.diffattack import DeviationRecorder
from purifiers import (ADPPyTorch, COUPPyTorch, DiffPure, DiffPurePyTorch, GaussianPrior, PurifiedClassifier,
                       ScoreOptPyTorch)
from purifiers.conventions import VPSchedule

# t* = 0.02 with dt = 5e-3: a 4-step solver, cheap enough for finite differences.
FOUR_STEPS = dict(t_star=0.02, dt=5e-3, gradient="exact", seed=5)


def _smooth_classifier(dtype=torch.float64, seed=0):
    """A smooth (tanh) 3-class classifier, so central differences are exact to O(h^2)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    return net.to(dtype).eval()


def _purifier(method, prior, classifier):
    if method == "coup":
        return COUPPyTorch(prior, classifier, guidance_scale=3.0, **FOUR_STEPS)
    return DiffPurePyTorch(prior, **FOUR_STEPS)


def _loss_and_gradient(attack, x, y, seed, clean=None):
    """The attack's EOT loss (summed over inputs) and gradient at ``x``, with the purification's noise and the
    attack's sampled steps fixed (the purifier's streams reset, the attack's generator seeded)."""
    attack.model.purifier.reset_generator()
    grad, loss, _ = attack.loss_gradient(x, y, clean=clean, generator=gen(seed))
    return loss.sum(), grad


# ---------------------------------------------------------------------------------------------------------------------
# the gradient of L_cls + lambda L_dev == central finite differences

@pytest.mark.parametrize("method, loss, anchor", [("diffpure", "ce", "input"), ("coup", "dlr", "input"),
                                                  ("diffpure", "ce", "clean")])
def test_full_loss_gradient_matches_finite_differences(prior64, method, loss, anchor):
    classifier = _smooth_classifier()
    purifier = _purifier(method, prior64, classifier)
    assert purifier.algorithm.num_steps == 4
    attack = DiffAttack(PurifiedClassifier(purifier, classifier), eps=0.1, loss=loss, eot=2, dev_steps=2,
                        anchor=anchor, lam=1.0)
    x, y = images(), torch.tensor([0, 2])
    direction = torch.randn(x.shape, generator=gen(2), dtype=x.dtype)
    _, grad = _loss_and_gradient(attack, x, y, seed=3)
    h = 1e-5
    # the clean images stay x ("clean" anchor: a fixed target)
    plus, _ = _loss_and_gradient(attack, x + h * direction, y, seed=3, clean=x)
    minus, _ = _loss_and_gradient(attack, x - h * direction, y, seed=3, clean=x)
    finite_difference = (plus - minus) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), finite_difference, rtol=1e-6, atol=1e-9)


def test_finite_differences_tell_a_wrong_weight_or_wrong_steps(prior64):
    # The check above can fail: the gradient of the lambda = 1 loss misses the finite differences of the lambda = 2
    # loss, and those of the same loss on other sampled steps, by far more than its tolerance.
    classifier = _smooth_classifier()
    model = PurifiedClassifier(_purifier("diffpure", prior64, classifier), classifier)
    attack = DiffAttack(model, eps=0.1, eot=2, dev_steps=1, lam=1.0)
    heavier = DiffAttack(model, eps=0.1, eot=2, dev_steps=1, lam=2.0)
    x, y = images(), torch.tensor([0, 2])
    direction = torch.randn(x.shape, generator=gen(2), dtype=x.dtype)
    _, grad = _loss_and_gradient(attack, x, y, seed=3)
    derivative = (grad * direction).sum()
    h = 1e-5

    def finite_difference(att, seed):
        return (_loss_and_gradient(att, x + h * direction, y, seed)[0]
                - _loss_and_gradient(att, x - h * direction, y, seed)[0]) / (2 * h)

    torch.testing.assert_close(derivative, finite_difference(attack, 3), rtol=1e-6, atol=1e-9)
    other_steps = next(s for s in range(4, 40) if _sampled_steps(attack, s) != _sampled_steps(attack, 3))
    for value in (finite_difference(heavier, 3), finite_difference(attack, other_steps)):
        assert abs(derivative - value) > 100 * (1e-6 * abs(value) + 1e-9)  # 100x the tolerance the check uses


def _sampled_steps(attack, seed):
    """The steps ``generator(seed)`` samples for 4 copies (2 inputs x 2 EOT) of the 4-step solver."""
    attack._rng = gen(seed)
    try:
        return attack._step_weights(4, 4, "cpu").nonzero().tolist()
    finally:
        attack._rng = None


# ---------------------------------------------------------------------------------------------------------------------
# the deviated-reconstruction loss as its definition says

def test_deviation_of_states_offset_from_the_diffusion_is_the_weighted_square():
    algorithm = DiffPure(GaussianPrior(0.5, 0.2).double(), t_star=0.02, dt=5e-3)
    grid = algorithm.grid()
    x0, eps = images(), torch.randn(2, 1, SIZE, SIZE, generator=gen(1), dtype=torch.float64)
    offsets = {2: 0.1, 4: -0.3}  # states after steps 2 and 4: the weights' columns 1 and 3
    def diffused(t):  # the forward diffusion sqrt(a) x0 + sqrt(1 - a) eps, [-1, 1] units
        a = VPSchedule().alpha_bar(t)
        return math.sqrt(a) * (2 * x0 - 1) + math.sqrt(1 - a) * eps

    states = {k: diffused(float(grid[k])) + c for k, c in offsets.items()}
    weights = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.25, 0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([0.5 * (0.1**2 + 0.3**2), 0.25 * 0.1**2], dtype=torch.float64)
    recorder = DeviationRecorder(algorithm, x0, grid, weights, eps)
    for k, state in states.items():
        torch.testing.assert_close(recorder(k, state), state)  # the identity on the state
    assert recorder(1, states[2]) is None  # a step no row sampled is left alone
    torch.testing.assert_close(recorder.total, expected)


def test_deviation_after_one_euler_step_on_the_gaussian_prior_is_the_hand_computed_one():
    # One Euler-Maruyama step from x_{t*} = sqrt(a*) x + sqrt(1 - a*) eps with the Gaussian prior's closed-form score,
    # against the forward diffusion of x to t_1 with the same eps: L_dev = mean((x'_{t_1} - x_{t_1})^2).
    m, s, t_star = 0.375, 0.15, 0.02
    prior = GaussianPrior(m, s).double()
    purifier = DiffPurePyTorch(prior, t_star=t_star, dt=t_star - 1e-5, gradient="exact", seed=1)  # t_end = 1e-5
    classifier = linear_classifier().double()
    model = PurifiedClassifier(purifier, classifier)
    x, y = images(n=1), torch.tensor([3])
    with_dev = DiffAttack(model, eps=0.1, eot=1, lam=1.0)
    without = DiffAttack(model, eps=0.1, eot=1, lam=0.0)
    deviation = _loss_and_gradient(with_dev, x, y, 0)[0] - _loss_and_gradient(without, x, y, 0)[0]

    purifier.reset_generator()
    _, noise = purifier.purify_with_states(x, lambda k, state, noise: None)
    vp = VPSchedule()
    t0, t1 = (float(t) for t in noise.grid)
    a0, a1, beta = vp.alpha_bar(t0), vp.alpha_bar(t1), vp.beta(t0)
    x_pm1, eps = 2 * x - 1, noise.start
    start = math.sqrt(a0) * x_pm1 + math.sqrt(1 - a0) * eps
    score = -(start - math.sqrt(a0) * (2 * m - 1)) / (4 * a0 * s**2 + 1 - a0)
    state = start + (0.5 * beta * start + beta * score) * (t0 - t1) + math.sqrt(beta) * noise.increments[0]
    diffused = math.sqrt(a1) * x_pm1 + math.sqrt(1 - a1) * eps
    torch.testing.assert_close(deviation, ((state - diffused) ** 2).mean(), rtol=1e-9, atol=1e-12)
    assert deviation > 1e-4  # the Brownian increment and the score's pull make it non-zero


# ---------------------------------------------------------------------------------------------------------------------
# the attack

def test_diffattack_raises_the_defended_loss(prior32):
    classifier = linear_classifier()
    purifier = DiffPurePyTorch(prior32, t_star=0.02, dt=5e-3, gradient="exact", seed=0)
    model = PurifiedClassifier(purifier, classifier)
    x, y = images(n=3, dtype=torch.float32), torch.tensor([0, 1, 2])
    attack = DiffAttack(model, eps=0.1, steps=3, eot=2, dev_steps=2)
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6

    def defended_loss(inp):
        purifier.reset_generator()
        with torch.no_grad():
            return nn.functional.nll_loss(model(inp), y).item()

    assert defended_loss(x_adv) > defended_loss(x) + 0.1


def test_describe_states_the_attack_gradient_eot_iterations_and_lambda(prior32):
    model = PurifiedClassifier(DiffPurePyTorch(prior32, **FOUR_STEPS), linear_classifier())
    row = DiffAttack(model, eps=0.1, steps=7, eot=3, lam=0.5, loss="dlr").describe()
    assert (row["attack"], row["gradient"], row["eot"], row["iterations"], row["lam"]) == ("DiffAttack-DLR", "exact",
                                                                                        3, 7, 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# refusals and bad parameters

@pytest.mark.parametrize("wrapper", ["adp", "scoreopt", "none"])
def test_refuses_purifiers_without_a_reverse_diffusion(prior32, wrapper):
    classifier = linear_classifier()
    if wrapper == "none":
        target, name = classifier, "an undefended classifier"
    else:
        purifier = (ADPPyTorch(prior32, steps=2, gradient="exact", seed=0) if wrapper == "adp"
                    else ScoreOptPyTorch(prior32, steps=1, seed=0))
        target, name = PurifiedClassifier(purifier, classifier), type(purifier).__name__
    with pytest.raises(ValueError, match=f"DiffAttack does not apply to {name}: .*reverse diffusion"):
        DiffAttack(target, eps=0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lam=-1.0), "lam must be"), (dict(lam=float("nan")), "lam must be"), (dict(lam=True), "lam must be"),
    (dict(dev_steps=0), "dev_steps must be"), (dict(dev_steps=5), r"dev_steps must be .*\[1, 4\]"),
    (dict(dev_steps=2.0), "dev_steps must be"), (dict(anchor="x0"), "anchor must be"),
    (dict(gradient="surrogate"), "no gradient setting"), (dict(eot=0), "eot must be"), (dict(loss="l2"), "loss"),
])
def test_bad_parameters_raise(prior32, kwargs, match):
    model = PurifiedClassifier(DiffPurePyTorch(prior32, **FOUR_STEPS), linear_classifier())
    with pytest.raises(ValueError, match=match):
        DiffAttack(model, eps=0.1, **kwargs)


def test_gradient_mode_cannot_be_set_away_from_exact(prior32):
    attack = DiffAttack(PurifiedClassifier(DiffPurePyTorch(prior32, **FOUR_STEPS), linear_classifier()), eps=0.1)
    with pytest.raises(ValueError, match="'exact' gradient mode"):
        attack.set_params(gradient="bpda")
