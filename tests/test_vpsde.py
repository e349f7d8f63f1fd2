"""COUP and DiffPure (purifiers.vpsde, purifiers.vpsde_pytorch, benchmarks.studies.coup_toy) against independent facts: the
Gaussian prior's closed forms, the moment ODEs of a linear SDE, central finite differences, the first-order convergence
of torchsde's adjoint, ART's own attacks, and binomial statistics for the toy experiment."""

import math

import numpy as np
import pytest
import torch
from tiny import SIZE, art_classifier, check_art_attacks_run, check_exact_pgd_increases_the_defended_loss, gen, images
from torch import nn

from benchmarks.studies.coup_toy import (flip_probability, mixture_score, noisy_classifier_guidance,
                                         noisy_classifier_probs)
from purifiers import COUP, COUPPyTorch, DiffPure, DiffPurePyTorch, GaussianPrior
from purifiers.conventions import DDPMSchedule, VPSchedule
from purifiers.vpsde import brownian_increments, coarsen_increments, subgrid_indices, time_grid

VP = VPSchedule()


def _tiny_classifier(dtype=torch.float64, seed=0, scale=1.0):
    """A smooth (tanh) classifier, so the guidance has a Hessian and finite differences are exact to O(h^2)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------------
# the solver against closed forms on the Gaussian prior

def test_vp_score_is_the_gaussian_closed_form():
    # Pixel data N(m, s^2) is N(2m - 1, 4 s^2) on [-1, 1]; the VP marginal is N(sqrt(a)(2m-1), 4 a s^2 + 1 - a).
    m, s = 0.375, 0.15  # m exactly representable: GaussianPrior stores its mean in float32
    coup = DiffPure(GaussianPrior(m, s).double())
    x = torch.randn(3, 1, SIZE, SIZE, generator=gen(), dtype=torch.float64)
    for t in (1e-3, 0.05, 0.1, 0.5):
        a = VP.alpha_bar(t)
        expected = -(x - math.sqrt(a) * (2 * m - 1)) / (4 * a * s**2 + 1 - a)
        torch.testing.assert_close(coup.vp_score(x, t), expected, rtol=1e-9, atol=1e-9)


def test_diffpure_on_gaussian_data_returns_the_data_distribution():
    # Forward diffusion of data samples lands on p_{t*}; the reverse SDE maps p_{t*} back to p_0 = N(m, s^2).
    m, s = 0.5, 0.1
    purifier = DiffPure(GaussianPrior(m, s).double(), t_star=0.1)
    x = (m + s * torch.randn(64, 1, 16, 16, generator=gen(1), dtype=torch.float64)).clamp(0, 1)
    out = purifier(x, generator=gen(2))
    n = out.numel()
    assert abs(out.mean().item() - m) < 4 * s / math.sqrt(n) + 1e-3
    # sample variance: standard error s^2 sqrt(2/n) (1.1% here); the Euler discretisation adds O(dt).
    assert out.var().item() == pytest.approx(s**2, rel=0.05)


def _linear_sde_moments(x0_pm1, t_star, t_end, mean_pm1, var_pm1, steps=20000):
    """Mean and variance of the unguided reverse SDE from a fixed point, for data N(mean_pm1, var_pm1): the reverse
    drift is linear, so d mean / d(-t) = beta mean / 2 - beta (mean - mu_t) / v_t and
    d var / d(-t) = 2 (beta / 2 - beta / v_t) var + beta, integrated here by RK4 in float64."""

    def rates(t, mean, var):
        a, beta = VP.alpha_bar(t), VP.beta(t)
        mu_t, v_t = math.sqrt(a) * mean_pm1, a * var_pm1 + 1 - a
        return 0.5 * beta * mean - beta * (mean - mu_t) / v_t, 2 * (0.5 * beta - beta / v_t) * var + beta

    mean, var, h = x0_pm1, 0.0, (t_star - t_end) / steps
    t = t_star
    for _ in range(steps):
        k1 = rates(t, mean, var)
        k2 = rates(t - h / 2, mean + h / 2 * k1[0], var + h / 2 * k1[1])
        k3 = rates(t - h / 2, mean + h / 2 * k2[0], var + h / 2 * k2[1])
        k4 = rates(t - h, mean + h * k3[0], var + h * k3[1])
        mean += h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        var += h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        t -= h
    return mean, var


def test_coup_without_guidance_matches_the_linear_sde_moments():
    # COUP starts the reverse SDE at the input itself: from x = 0.7 the output is Gaussian with the ODE's moments.
    m, s, x_pixel, t_star = 0.5, 0.2, 0.7, 0.1
    purifier = COUP(GaussianPrior(m, s).double(), None, t_star=t_star, guidance_scale=0.0)
    x = torch.full((64, 1, 16, 16), x_pixel, dtype=torch.float64)
    out = 2 * purifier(x, generator=gen(3)) - 1
    mean, var = _linear_sde_moments(2 * x_pixel - 1, t_star, purifier.t_end, 2 * m - 1, 4 * s**2)
    n = out.numel()
    assert abs(out.mean().item() - mean) < 4 * math.sqrt(var / n) + 2e-3
    assert out.var().item() == pytest.approx(var, rel=0.05)


def test_coup_default_grid_is_the_papers():
    coup = COUP(GaussianPrior(), None, guidance_scale=0.0)
    assert coup.num_steps == 100 and coup.grid()[0] == 0.1 and coup.grid()[-1] == pytest.approx(1e-5)
    assert COUP(GaussianPrior(), None, t_star=0.075, guidance_scale=0.0).num_steps == 75


def test_coarse_increments_are_the_same_brownian_path():
    grid = time_grid(0.1, 1e-5, 100)
    fine = brownian_increments((5,), grid, gen())
    idx = subgrid_indices(100, 20)
    coarse = coarsen_increments(fine, idx)
    torch.testing.assert_close(coarse.sum(0), fine.sum(0))
    torch.testing.assert_close(coarse[3], fine[15:20].sum(0))
    # variance of each increment is its step: check on many draws
    many = brownian_increments((20000,), time_grid(0.1, 0.0, 4), gen(1), dtype=torch.float64)
    assert many.var(dim=1).numpy() == pytest.approx(np.full(4, 0.025), rel=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# exact gradients == central finite differences (float64, fixed Brownian noise), through the ART wrapper's forward

@pytest.mark.parametrize("method, guidance_scale", [("coup", 0.0), ("coup", 3.0), ("diffpure", 0.0)])
def test_exact_gradient_matches_finite_differences(prior64, method, guidance_scale):
    settings = dict(t_star=0.02, dt=2e-3, gradient="exact", seed=5)
    if method == "coup":
        purifier = COUPPyTorch(prior64, _tiny_classifier(scale=3.0), guidance_scale=guidance_scale, **settings)
    else:
        purifier = DiffPurePyTorch(prior64, **settings)
    x = images()
    weights = torch.randn(x.shape, generator=gen(1), dtype=x.dtype)
    direction = torch.randn(x.shape, generator=gen(2), dtype=x.dtype)

    def objective(inp):
        purifier.reset_generator()
        return (weights * purifier.forward(inp)[0]).sum()

    x_var = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(objective(x_var), x_var)
    h = 1e-5
    with torch.no_grad():
        purifier.reset_generator()
        out = purifier.forward(x)[0]
        assert 0.0 < out.min() and out.max() < 1.0, "the output clamp must be inactive for the check"
        finite_difference = (objective(x + h * direction) - objective(x - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), finite_difference, rtol=1e-6, atol=1e-9)


def test_detached_guidance_misses_the_classifier_hessian_term(prior64):
    # The reference code's detached guidance: same purification, but its gradient is not the derivative.
    classifier = _tiny_classifier(scale=5.0)
    x = images()
    direction = torch.randn(x.shape, generator=gen(2), dtype=x.dtype)
    grads, values = {}, {}
    for mode in ("full", "detached"):
        coup = COUP(prior64, classifier, t_star=0.05, dt=5e-3, guidance_scale=10.0, guidance_gradient=mode)
        x_var = x.clone().requires_grad_(True)
        out = coup(x_var, generator=gen(4))
        grads[mode], = torch.autograd.grad(out.sum(), x_var)
        values[mode] = out.detach()
    assert 0.0 < values["full"].min() and values["full"].max() < 1.0
    h = 1e-5
    with torch.no_grad():
        fd = (coup(x + h * direction, generator=gen(4)).sum() - coup(x - h * direction, generator=gen(4)).sum())
        fd = fd / (2 * h)
    torch.testing.assert_close(values["full"], values["detached"])
    torch.testing.assert_close((grads["full"] * direction).sum(), fd, rtol=1e-6, atol=1e-9)
    # The detached gradient misses by far more than the finite-difference accuracy the full one meets.
    projected_gap = abs((grads["detached"] * direction).sum() - fd) / abs(fd)
    assert projected_gap > 1e-4, f"the Hessian term should matter here (relative gap {projected_gap:.2e})"
    assert (grads["detached"] - grads["full"]).norm() > 0.01 * grads["full"].norm()


def test_checkpointing_leaves_the_gradient_unchanged(prior64):
    classifier = _tiny_classifier()
    x = images()
    grads = []
    for ckpt in (True, False):
        coup = COUP(prior64, classifier, t_star=0.02, dt=4e-3, checkpoint_steps=ckpt)
        x_var = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(coup(x_var, generator=gen(1)).sum(), x_var)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# adjoint versus exact: same forward value; gradient gap of the adjoint solver's first order in dt

def test_adjoint_agrees_with_exact_to_first_order_in_dt(prior64):
    classifier = _tiny_classifier()
    x = images()
    weights = torch.randn(x.shape, generator=gen(1), dtype=x.dtype)
    gaps = []
    for dt in (2e-3, 1e-3):
        coup = COUP(prior64, classifier, t_star=0.02, dt=dt)
        noise = coup.draw_noise(x, gen(3))
        x_var = x.clone().requires_grad_(True)
        exact_out = coup.purify(x_var, noise)
        exact, = torch.autograd.grad((weights * exact_out).sum(), x_var)
        x_var = x.clone().requires_grad_(True)
        adjoint_out = coup.purify_adjoint(x_var, noise)
        adjoint, = torch.autograd.grad((weights * adjoint_out).sum(), x_var)
        torch.testing.assert_close(adjoint_out, exact_out, rtol=1e-12, atol=1e-12)
        gaps.append(((adjoint - exact).norm() / exact.norm()).item())
    assert gaps[0] < 0.03
    assert 0.35 < gaps[1] / gaps[0] < 0.65, f"adjoint gap should halve with dt, got {gaps}"


def test_surrogate_value_is_the_defense_and_gradient_the_coarse_solver(prior64):
    purifier = COUPPyTorch(prior64, _tiny_classifier(), t_star=0.02, dt=1e-3, gradient="surrogate",
                           surrogate_steps=5, seed=2)
    x = images()
    x_var = x.clone().requires_grad_(True)
    out = purifier.forward(x_var)[0]
    grad, = torch.autograd.grad(out.sum(), x_var)
    purifier.reset_generator()
    noise = purifier.algorithm.draw_noise(x, purifier.generator(x.device, x.shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(out, purifier.algorithm.purify(x, noise))
    x_var = x.clone().requires_grad_(True)
    coarse, = torch.autograd.grad(purifier.algorithm.purify(x_var, noise, num_steps=5).sum(), x_var)
    torch.testing.assert_close(grad, coarse)
    with pytest.raises(ValueError, match="surrogate_steps"):
        purifier.set_params(surrogate_steps=50)


def test_fixed_seed_gives_fixed_noise(prior32):
    purifier = DiffPurePyTorch(prior32, t_star=0.02, seed=3)
    x = images(dtype=torch.float32).numpy()
    first, _ = purifier(x)
    second, _ = purifier(x)
    purifier.reset_generator()
    again, _ = purifier(x)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


# ---------------------------------------------------------------------------------------------------------------------
# ART's attacks run on PyTorchClassifier with every wrapper in every gradient mode

class _TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("mode", ["bpda", "exact", "adjoint", "surrogate"])
@pytest.mark.parametrize("method", ["coup", "diffpure"])
def test_art_pgd_and_apgd_run_with_each_mode(prior32, method, mode):
    model = _TinyConvNet().eval()
    settings = dict(t_star=0.01, dt=2.5e-3, gradient=mode, surrogate_steps=2, seed=0,
                    eot_samples=2 if mode == "exact" else 1)
    if method == "coup":
        purifier = COUPPyTorch(prior32, model, **settings)
    else:
        purifier = DiffPurePyTorch(prior32, **settings)
    classifier = art_classifier(model, [purifier], nb_classes=3)
    x = images(n=2, dtype=torch.float32).numpy()
    y = np.array([0, 2])
    assert classifier.predict(x).shape == (2, 3)  # predict keeps N rows even with EOT
    check_art_attacks_run(classifier, x, y, apgd_iter=1)
    grad = classifier.loss_gradient(x, np.eye(3)[y])
    assert grad.shape == x.shape and np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_exact_pgd_increases_the_defended_loss(prior32):
    model = _TinyConvNet().eval()
    purifier = COUPPyTorch(prior32, model, t_star=0.01, dt=2.5e-3, gradient="exact", seed=0)
    check_exact_pgd_increases_the_defended_loss(purifier, model, nb_classes=3, eps_step=0.03, max_iter=3)


# ---------------------------------------------------------------------------------------------------------------------
# the toy experiment (section 5.3.2): closed forms against autograd, and the trend of Fig. 3b on fewer runs

def test_toy_score_and_guidance_closed_forms_match_autograd():
    x = torch.linspace(-2, 2, 101, dtype=torch.float64).requires_grad_(True)
    t = 0.05
    m = 0.5 * math.sqrt(VP.alpha_bar(t))
    log_p = torch.logaddexp(-0.5 * (x - m) ** 2, -0.5 * (x + m) ** 2)  # VP marginal of the mixture, up to a constant
    score, = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(mixture_score(x.detach(), t), score)
    for c in (0.0, 2.0):
        log_max, = torch.autograd.grad(noisy_classifier_probs(x, c).max(-1).values.log().sum(), x)
        torch.testing.assert_close(noisy_classifier_guidance(x.detach(), c), log_max)


def test_toy_guidance_helps_at_small_noise_and_hurts_at_large_noise():
    runs = 20000
    # Independent-sample bound on the standard error of a difference of two proportions (the runs share Brownian
    # paths, which only lowers the true error): 5 of these is far beyond chance.
    def se(p, q):
        return math.sqrt((p * (1 - p) + q * (1 - q)) / runs)

    clean_0, clean_5 = flip_probability(0.0, 0.0, runs=runs), flip_probability(5.0, 0.0, runs=runs)
    assert clean_5 < clean_0 - 5 * se(clean_0, clean_5)
    noisy_0, noisy_10 = flip_probability(0.0, 10.0, runs=runs), flip_probability(10.0, 10.0, runs=runs)
    assert noisy_10 > noisy_0 + 5 * se(noisy_0, noisy_10)


# ---------------------------------------------------------------------------------------------------------------------
# bad input and bad settings: clear ValueErrors

@pytest.mark.parametrize("bad, match", [
    (torch.full((1, 1, SIZE, SIZE), float("nan")), "NaN"),
    (torch.rand(1, SIZE, SIZE), "4-D"),
    (torch.rand(1, 1, SIZE, SIZE) * 255, "0-255"),
    (torch.zeros(0, 1, SIZE, SIZE), "empty"),
    (torch.randint(0, 2, (1, 1, SIZE, SIZE)), "dtype"),
])
def test_bad_images_raise(prior32, bad, match):
    purifier = COUP(prior32, _tiny_classifier(torch.float32), t_star=0.01)
    with pytest.raises(ValueError, match=match):
        purifier(bad)
    with pytest.raises(ValueError, match=match):
        DiffPurePyTorch(prior32, t_star=0.01)(bad.numpy())


@pytest.mark.parametrize("kwargs, match", [
    (dict(t_star=0.0), "t_star"),
    (dict(t_star=1.5), "t_star"),
    (dict(dt=0.5), "dt"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_gradient="half"), "guidance_gradient"),
    (dict(gradient="magic"), "gradient"),
    (dict(surrogate_steps=0), "surrogate_steps"),
    (dict(gradient="surrogate", t_star=0.01, surrogate_steps=20), "surrogate_steps"),
])
def test_bad_settings_raise(prior32, kwargs, match):
    with pytest.raises(ValueError, match=match):
        COUPPyTorch(prior32, _tiny_classifier(torch.float32), **kwargs)


def test_guidance_needs_a_classifier_and_diffpure_has_none(prior32):
    with pytest.raises(ValueError, match="classifier"):
        COUP(prior32, None, guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffPure(prior32, guidance_scale=1.0)
    with pytest.raises(ValueError, match="forward_alpha"):
        DiffPurePyTorch(prior32, forward_alpha="linear")
    purifier = COUPPyTorch(prior32, _tiny_classifier(torch.float32))
    with pytest.raises(ValueError, match="t_star"):
        purifier.set_params(t_star=-0.1)


def test_both_wrappers_take_forward_alpha_and_coup_only_with_its_forward_diffusion(prior32):
    """forward_alpha is an ART param of both wrappers (set_params validates it); COUP takes "ddpm" only where it runs a
    forward diffusion, the one step the setting changes."""
    x = images(n=2, dtype=torch.float32).numpy()
    for make in (lambda **kw: DiffPurePyTorch(prior32, t_star=0.01, dt=2e-3, seed=0, **kw),
                 lambda **kw: COUPPyTorch(prior32, _tiny_classifier(torch.float32), t_star=0.01, dt=2e-3,
                                          forward_diffusion=True, seed=0, **kw)):
        ddpm, purifier = make(forward_alpha="ddpm"), make()
        assert "forward_alpha" in ddpm.params and ddpm.algorithm.forward_alpha == "ddpm"
        first = ddpm(x)[0]
        assert not np.array_equal(first, purifier(x)[0])  # another alpha_bar(t*): another start of the reverse SDE
        purifier.set_params(forward_alpha="ddpm")
        purifier.reset_generator()
        np.testing.assert_array_equal(purifier(x)[0], first)
        with pytest.raises(ValueError, match="forward_alpha must be one of"):
            purifier.set_params(forward_alpha="linear")
    with pytest.raises(ValueError, match="forward_alpha='ddpm' .* forward_diffusion=True"):
        COUPPyTorch(prior32, _tiny_classifier(torch.float32), forward_alpha="ddpm")


def test_ddpm_forward_alpha_is_the_discrete_schedule(prior64):
    # The reference code's discrete alpha_bar at t* = 0.1 (DDPM timestep 99) is within 1e-3 of the continuous one.
    x = images()
    outs = {}
    for alpha in ("continuous", "ddpm"):
        purifier = DiffPure(GaussianPrior(0.5, 0.2).double(), t_star=0.1, forward_alpha=alpha)
        noise = purifier.draw_noise(x, gen(0))
        outs[alpha] = purifier.start_state(x, noise)
    a_ddpm = float(DDPMSchedule().alphas_cumprod[99])
    assert abs(math.log(a_ddpm) - VP.log_alpha_bar(0.1)) < 2e-3
    assert not torch.equal(outs["continuous"], outs["ddpm"])


def test_off_grid_brownian_query_raises():
    from purifiers.vpsde import _GridBrownian

    grid = time_grid(0.1, 1e-5, 10)
    bm = _GridBrownian(-grid, brownian_increments((2, 3), grid, gen()).flatten(2))
    torch.testing.assert_close(bm(-grid[0], -grid[-1]), bm._path[-1])
    with pytest.raises(ValueError, match="off its grid"):
        bm(-grid[0], -grid[0] + 0.0005)


# ---------------------------------------------------------------------------------------------------------------------
# the MNIST factories and the validation selection rule

def test_mnist_factories_use_the_validation_settings(prior32):
    from benchmarks.defenses import defense, record

    coup = defense("coup", "mnist", prior=prior32, classifier=_tiny_classifier(torch.float32), gradient="exact")
    assert isinstance(coup, COUPPyTorch) and coup.gradient == "exact"
    assert coup.t_star == record("coup").settings["mnist"]["t_star"]
    assert coup.guidance_scale == record("coup").settings["mnist"]["guidance_scale"]
    diffpure = defense("diffpure", "mnist", prior=prior32, t_star=0.05)
    assert isinstance(diffpure, DiffPurePyTorch) and diffpure.t_star == 0.05


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_exact_gradient_costs_two_network_forwards_per_step(prior64, guidance_scale):
    # One forward in the forward pass, one recomputation in the backward pass (purifiers.recompute); the
    # guidance's create_graph must not make the checkpoint recompute the step during the forward pass.
    coup = COUP(prior64, _tiny_classifier(), t_star=0.02, dt=4e-3, guidance_scale=guidance_scale)
    x = images(n=3).requires_grad_(True)
    prior64.nfe.reset()
    out = coup(x, generator=gen(1))
    assert prior64.nfe.forward == 3 * coup.num_steps
    torch.autograd.grad(out.sum(), x)
    assert prior64.nfe.forward == 2 * 3 * coup.num_steps
    assert prior64.nfe.backward == 3 * coup.num_steps
