"""ScoreOpt (purifiers.scoreopt, purifiers.scoreopt_pytorch) against independent facts: central finite differences,
the Gaussian prior's closed form, torch.optim.Adam, autograd through the one-shot denoiser, ART's own attacks."""

import numpy as np
import pytest
import torch

from purifiers import GaussianPrior, PurifiedClassifier, ScoreOpt, ScoreOptPyTorch
from purifiers.conventions import pm1_sigma_to_pixel, to_pm1
from purifiers.noise import randn
from tiny import SIZE, art_classifier, check_art_attacks_run, check_bpda_gradient, gen, images, linear_classifier

# ---------------------------------------------------------------------------------------------------------------------
# exact gradient == central finite differences, fixed noise, float64
CASES = [dict(variant="O", loss=loss) for loss in ("diff", "mse", "sr")]
CASES += [dict(variant="N", loss=loss) for loss in ("diff", "mse", "sr")]
CASES += [dict(variant="N", loss="diff", n_target="outer"), dict(variant="O", loss="sr", optimizer="gd")]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: "-".join(map(str, s.values())))
def test_exact_gradient_matches_central_finite_differences(prior64, settings):
    steps = dict(steps=2) if settings["variant"] == "O" else dict(steps=2, inner_steps=2)
    algorithm = ScoreOpt(prior64, lr=0.05, noise_range=(0.4, 0.6), mse_lambda=0.7, **steps, **settings)
    x = images()
    weights = torch.randn(x.shape, generator=gen(1), dtype=x.dtype)
    direction = torch.randn(x.shape, generator=gen(2), dtype=x.dtype)

    def objective(inp):
        return (weights * algorithm(inp, generator=gen(7))).sum()

    x_var = x.clone().requires_grad_(True)
    out = algorithm(x_var, generator=gen(7))
    assert 0.0 < out.min() and out.max() < 1.0, "the output clip must be inactive for the finite-difference check"
    grad, = torch.autograd.grad((weights * out).sum(), x_var)
    h = 1e-5
    with torch.no_grad():
        finite_difference = (objective(x + h * direction) - objective(x - h * direction)) / (2 * h)
    analytic = (grad * direction).sum()
    torch.testing.assert_close(analytic, finite_difference, rtol=1e-6, atol=1e-9)


def test_checkpointing_leaves_the_exact_gradient_unchanged(prior64):
    grads = []
    for checkpoint_steps in (True, False):
        algorithm = ScoreOpt(prior64, variant="O", loss="sr", steps=3, checkpoint_steps=checkpoint_steps)
        x = images().requires_grad_(True)
        grads.append(torch.autograd.grad(algorithm(x, generator=gen(3)).pow(2).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# the maths of the algorithm
def test_diff_loss_gradient_descent_contracts_towards_gaussian_mean_at_closed_form_rate():
    # Gaussian data N(mu, tau^2): D(y; s) = mu + k (y - mu), k = tau^2 / (tau^2 + s^2) (pixel units; the ratio is
    # the same on [-1, 1]). The Diff loss ||(k - 1)(x - mu) + k s eps||^2 has gradient (through D and the target)
    # 2 (k - 1) [(k - 1)(x - mu) + k s eps], so one gradient-descent step maps x - mu to
    # (1 - 2 eta (1 - k)^2)(x - mu) plus a noise term that does not depend on x. Two inputs purified with the same
    # noise therefore differ by (1 - 2 eta (1 - k)^2)^M times their initial difference.
    mu, tau, sigma_pm1, lr, steps = 0.5, 0.2, 0.5, 0.25, 5
    algorithm = ScoreOpt(GaussianPrior(mu, tau), variant="O", loss="diff", optimizer="gd", lr=lr, steps=steps,
                         noise_range=(sigma_pm1, sigma_pm1))
    x_a = images(n=3, low=0.4, high=0.6)
    at_mean = torch.full_like(x_a, mu)
    out, out_at_mean = algorithm(x_a, generator=gen(5)), algorithm(at_mean, generator=gen(5))
    assert 0.0 < min(out.min(), out_at_mean.min()) and max(out.max(), out_at_mean.max()) < 1.0
    k = tau**2 / (tau**2 + pm1_sigma_to_pixel(sigma_pm1) ** 2)
    rate = 1 - 2 * lr * (1 - k) ** 2
    torch.testing.assert_close(out - out_at_mean, rate**steps * (x_a - mu), rtol=1e-6, atol=1e-9)
    # and on average over pixels the purified image sits closer to the mean by that factor (the noise averages out)
    ratio = ((out - mu) * (x_a - mu)).sum() / ((x_a - mu) ** 2).sum()
    assert abs(ratio.item() - rate**steps) < 0.15


def test_adam_update_is_torch_optim_adam():
    # Replay Algorithm 1 (Diff loss) with torch.optim.Adam and the same draws: sigma (rand, N), eps1 (randn) per step.
    prior, lr, steps, low, high = GaussianPrior(0.5, 0.2), 0.03, 4, 0.4, 0.6
    x_a = images(n=3)
    algorithm = ScoreOpt(prior, variant="O", loss="diff", lr=lr, steps=steps, noise_range=(low, high))
    out = algorithm(x_a, generator=gen(11))

    generator = gen(11)
    x = to_pm1(x_a).clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        sigma = low + (high - low) * torch.rand(x.shape[0], generator=generator, dtype=x.dtype)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        s = sigma.view(-1, 1, 1, 1)
        denoised = 2 * prior.denoise((x + s * eps + 1) / 2, sigma / 2) - 1
        adam.zero_grad()
        (denoised - x).pow(2).sum().backward()
        adam.step()
    torch.testing.assert_close(out, ((x.detach() + 1) / 2).clamp(0, 1), rtol=1e-12, atol=1e-12)


def test_score_regulariser_is_zero_at_the_adversarial_point_with_shared_noise(prior64):
    algorithm = ScoreOpt(prior64, loss="sr")
    x_a = to_pm1(images())
    sigma = torch.tensor([0.5, 0.45], dtype=x_a.dtype)
    eps = torch.randn(x_a.shape, generator=gen(0), dtype=x_a.dtype)
    assert torch.equal(algorithm.loss_terms(x_a, x_a, sigma, eps, eps)["sr"], torch.zeros(2, dtype=x_a.dtype))
    other = torch.randn(x_a.shape, generator=gen(1), dtype=x_a.dtype)
    terms = algorithm.loss_terms(x_a, x_a, sigma, eps, other)
    assert (terms["sr"] > 0).all() and torch.equal(terms["mse"], torch.zeros(2, dtype=x_a.dtype))


def test_seeded_purification_is_deterministic_and_noise_dependent(prior32):
    algorithm = ScoreOpt(prior32, variant="N", loss="sr", steps=2, inner_steps=2)
    x = images(dtype=torch.float32)
    first, again = algorithm(x, generator=gen(4)), algorithm(x, generator=gen(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, algorithm(x, generator=gen(5)))


@pytest.mark.parametrize("settings, forward, backward", [
    (dict(variant="O", loss="diff", steps=3), 3, 3),
    (dict(variant="O", loss="sr", steps=3), 6, 3),
    (dict(variant="N", loss="mse", steps=2, inner_steps=2), 6, 4),
    (dict(variant="N", loss="sr", steps=2, inner_steps=2), 10, 4)])
def test_purified_classifier_reports_prior_forward_and_backward_passes(prior32, settings, forward, backward):
    model = PurifiedClassifier(ScoreOptPyTorch(prior32, seed=0, **settings), linear_classifier())
    model.reset_counters()
    with torch.no_grad():
        model(images(n=4, dtype=torch.float32))
    assert model.nfe_per_image() == {"prior_forward": forward, "prior_backward": backward, "classifier": 1}


# ---------------------------------------------------------------------------------------------------------------------
# the ART wrapper's gradient modes
def test_surrogate_gradient_is_autograd_through_the_one_shot_denoiser(prior64):
    purifier = ScoreOptPyTorch(prior64, noise_range=(0.3, 0.5), gradient="surrogate", seed=9, device_type="cpu")
    x = images().requires_grad_(True)
    weights = torch.randn(x.shape, generator=gen(1), dtype=x.dtype)
    out, _ = purifier.forward(x)
    grad, = torch.autograd.grad((weights * out).sum(), x)

    sigma = pm1_sigma_to_pixel(0.4)
    purifier.reset_generator()  # the same per-image noise streams as the call above
    eps = randn(x.shape, purifier.generator(x.device, x.shape[0]), dtype=x.dtype)
    reference = prior64.denoise(x + sigma * eps, sigma)
    expected, = torch.autograd.grad((weights * reference).sum(), x)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grad, expected)


def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_point(prior32):
    check_bpda_gradient(ScoreOptPyTorch(prior32, steps=2, gradient="bpda", seed=2, device_type="cpu"),
                        linear_classifier(), min_move=1e-3)


@pytest.mark.parametrize("gradient", ["bpda", "surrogate", "exact"])
def test_art_pgd_and_apgd_run_through_each_gradient_mode(prior32, gradient):
    purifier = ScoreOptPyTorch(prior32, variant="N", steps=1, inner_steps=2, gradient=gradient, eot_samples=2,
                               seed=0, device_type="cpu")
    classifier = art_classifier(linear_classifier(), [purifier])
    x, y = images(n=2, dtype=torch.float32).numpy(), np.array([3, 5])
    check_art_attacks_run(classifier, x, y, eps=0.1, eps_step=0.05)
    assert classifier.predict(x).shape == (2, 10)


def test_channels_last_and_numpy_call(prior32):
    x = images(n=2, dtype=torch.float32)
    first = ScoreOptPyTorch(prior32, seed=1, device_type="cpu")(x.numpy())[0]
    last = ScoreOptPyTorch(prior32, seed=1, channels_first=False, device_type="cpu")(x.permute(0, 2, 3, 1).numpy())[0]
    assert first.dtype == np.float32 and first.shape == x.shape and 0 <= first.min() and first.max() <= 1
    np.testing.assert_allclose(last, first.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# bad input and bad settings
@pytest.mark.parametrize("bad, message", [
    (np.full((2, 1, SIZE, SIZE), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((1, SIZE, SIZE), dtype=np.float32), "4-D"),
    (np.full((2, 1, SIZE, SIZE), 200.0, dtype=np.float32), "255"),
    (np.zeros((2, 1, SIZE, SIZE), dtype=np.uint8), "dtype"),
    (np.zeros((0, 1, SIZE, SIZE), dtype=np.float32), "empty"),
    (np.zeros((2, SIZE, SIZE, 1), dtype=np.float32), "channels"),
    (np.full((2, 1, SIZE, SIZE), 1.2, dtype=np.float32), "outside")])
def test_bad_input_raises_a_clear_value_error(prior32, bad, message):
    purifier = ScoreOptPyTorch(prior32, device_type="cpu")
    with pytest.raises(ValueError, match=message):
        purifier(bad)
    with pytest.raises(ValueError, match=message):
        purifier.forward(torch.from_numpy(bad))


@pytest.mark.parametrize("settings, message", [
    (dict(variant="X"), "variant"), (dict(loss="l1"), "loss"), (dict(steps=0), "steps"),
    (dict(inner_steps=3), "inner loop"), (dict(lr=-0.1), "lr"), (dict(noise_range=(0.6, 0.4)), "noise_range"),
    (dict(optimizer="sgd"), "optimizer"), (dict(n_target="x0"), "n_target"), (dict(mse_lambda=-1.0), "mse_lambda"),
    (dict(gradient="full"), "gradient"), (dict(eot_samples=0), "eot_samples"), (dict(clip_values=(0, 255)), "clip")])
def test_bad_settings_raise_a_clear_value_error(prior32, settings, message):
    with pytest.raises(ValueError, match=message):
        ScoreOptPyTorch(prior32, **settings)


def test_set_params_reaches_the_algorithm_and_is_checked(prior32):
    purifier = ScoreOptPyTorch(prior32, variant="N")
    assert (purifier.steps, purifier.inner_steps, purifier.noise_range) == (1, 5, (0.5, 0.5))  # Table 10 defaults
    purifier.set_params(inner_steps=3, loss="sr")
    assert purifier.algorithm.inner_steps == 3 and purifier.algorithm.loss == "sr"
    with pytest.raises(ValueError, match="steps"):
        purifier.set_params(steps=0)
    with pytest.raises(ValueError, match="Prior"):
        ScoreOpt(linear_classifier())
