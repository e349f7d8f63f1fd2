"""ADP (purifiers.adp, purifiers.adp_pytorch) against independent facts: the Gaussian prior's closed form, central
finite differences with fixed noise, the classifier's own gradient, ART's attacks and randomized smoothing."""

import numpy as np
import pytest
import torch
from art.estimators.certification.randomized_smoothing import NumpyRandomizedSmoothing
from torch import nn

from purifiers import ADP, ADPPyTorch, DenoiserPrior, GaussianPrior, PurifiedClassifier
from purifiers.adp import (ADPDivergedError, adp_score, detection_threshold_from_natural, median_heuristic_sigma,
                           score_norm)
from tiny import (SIZE, art_classifier, check_art_attacks_run, check_bpda_gradient,
                  check_exact_pgd_increases_the_defended_loss, gen, images, linear_classifier)

MU, STD = 0.5, 0.2


@pytest.fixture(scope="module")
def gaussian64():
    return GaussianPrior(MU, STD).double()


# ---------------------------------------------------------------------------------------------------------------------
# closed forms with the Gaussian prior: s(x) = -(c / (std^2 + c^2)) (x - mu) is linear, so eq. (17) is exact and each
# step shrinks x - mu by exactly 1 - lambda (eq. 15), whatever the conditioning level.

@pytest.mark.parametrize("step_rule", ["paper", "reference"])
@pytest.mark.parametrize("conditioning", ["running", "injected", "tracked"])
def test_each_step_shrinks_the_distance_to_the_gaussian_mean_by_one_minus_lambda(gaussian64, step_rule, conditioning):
    adp = ADP(gaussian64, steps=3, lam=0.05, tau=0.0, step_rule=step_rule, conditioning=conditioning)
    x0 = images(n=3)
    out = adp.update(x0, torch.tensor([0.1, 0.25, 0.4], dtype=torch.float64))
    torch.testing.assert_close(out - MU, 0.95**3 * (x0 - MU), rtol=1e-6, atol=1e-9)


def test_step_size_is_lambda_times_the_local_noise_level(gaussian64):
    # At conditioning c, s'(x) = -c/(std^2+c^2) I, so eq. (17) returns sigma_t = (std^2 + c^2)/c and
    # alpha = lambda sigma_t; the "running" conditioning feeds sigma_t back as the next level.
    adp = ADP(gaussian64, steps=1, lam=0.1, conditioning="running")
    x0, c = images(n=1), torch.tensor([0.3], dtype=torch.float64)
    g = adp_score(gaussian64, x0, c)
    out, next_cond, active = adp._step(x0, c, torch.tensor([True]), check_score_norm=False)
    sigma_t = (STD**2 + 0.3**2) / 0.3
    torch.testing.assert_close(out, x0 + 0.1 * sigma_t * g)
    torch.testing.assert_close(next_cond, torch.tensor([sigma_t], dtype=torch.float64))
    assert bool(active)


def test_paper_stopping_rule_is_per_sample_and_sticky(gaussian64):
    # Two images, one far from the mean and one close: with tau between their score norms after the first step,
    # the close one stops after one step (Algorithm 1's break) and the far one takes all three.
    pattern = torch.linspace(-1, 1, SIZE * SIZE, dtype=torch.float64).reshape(1, 1, SIZE, SIZE)
    x0 = torch.cat([MU + 0.3 * pattern, MU + 0.01 * pattern])
    c = torch.full((2,), 0.25, dtype=torch.float64)
    norms = score_norm(gaussian64, MU + 0.95 * (x0 - MU), 0.25)
    adp = ADP(gaussian64, steps=3, lam=0.05, conditioning="injected", tau=float(norms.mean()))
    out = adp.update(x0, c)
    torch.testing.assert_close(out[0] - MU, 0.95**3 * (x0[0] - MU))
    torch.testing.assert_close(out[1] - MU, 0.95 * (x0[1] - MU))


def test_reference_rule_stops_a_sample_once_its_step_size_falls_below_tau(gaussian64):
    # Reference code: alpha = clamp(lambda delta/(1-z), 1e-5, 0.1) = lambda (std^2 + c^2)/c, and a sample with
    # alpha <= tau does not move. c = 0.25 gives alpha = 0.0205, c = 0.05 gives 0.0425.
    adp = ADP(gaussian64, steps=2, lam=0.05, step_rule="reference", conditioning="injected", tau=0.03)
    x0 = images(n=2)
    out = adp.update(x0, torch.tensor([0.25, 0.05], dtype=torch.float64))
    torch.testing.assert_close(out[0], x0[0])
    torch.testing.assert_close(out[1] - MU, 0.95**2 * (x0[1] - MU))


def test_reference_step_size_is_clamped_at_one_tenth(gaussian64):
    adp = ADP(gaussian64, steps=1, lam=0.9, step_rule="reference", conditioning="injected")
    x0, c = images(n=1, low=0.45, high=0.55), torch.tensor([0.25], dtype=torch.float64)
    out = adp.update(x0, c)  # lambda sigma_t = 0.9 * 0.41 would be 0.369
    torch.testing.assert_close(out, x0 + 0.1 * adp_score(gaussian64, x0, c))


def test_exact_gradient_through_the_gaussian_prior_is_the_closed_form(gaussian64):
    # x_T - mu = (1 - lambda)^T (clip(x + sigma n) - mu): the Jacobian is (1 - lambda)^T where the clip is inactive.
    adp = ADP(gaussian64, steps=4, lam=0.05, sigma=0.1)
    x = images(n=2).requires_grad_(True)
    out = adp(x, generator=gen(3))
    grad, = torch.autograd.grad(out.sum(), x)
    noisy = x.detach() + 0.1 * torch.randn(x.shape, generator=gen(3), dtype=x.dtype)
    inside = ((noisy > 0) & (noisy < 1)).to(x.dtype)
    torch.testing.assert_close(grad, 0.95**4 * inside)


def test_median_heuristic_matches_a_direct_computation():
    x = images(n=5, low=0.0, high=1.0)
    flat = x.reshape(5, -1)
    distances = [float((flat[i] - flat[j]).norm()) for i in range(5) for j in range(i + 1, 5)]
    assert median_heuristic_sigma(x) == pytest.approx(np.median(distances) / SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# exact gradients == central finite differences through the tiny U-Net, fixed noise, float64

def _finite_difference_check(adp, x, seed=1, directions=3, h=1e-6):
    weights = torch.randn(x.shape, generator=gen(7), dtype=x.dtype)
    xg = x.clone().requires_grad_(True)
    out = adp(xg, generator=gen(seed))
    grad, = torch.autograd.grad((weights * out).sum(), xg)
    assert grad.abs().sum() > 0
    with torch.no_grad():
        for k in range(directions):
            v = torch.randn(x.shape, generator=gen(100 + k), dtype=x.dtype)
            plus = (weights * adp(x + h * v, generator=gen(seed))).sum()
            minus = (weights * adp(x - h * v, generator=gen(seed))).sum()
            fd = float((plus - minus) / (2 * h))
            assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("conditioning", ["running", "tracked"])
def test_exact_gradient_with_differentiated_step_sizes_matches_finite_differences(prior64, conditioning):
    adp = ADP(prior64, steps=3, conditioning=conditioning, step_size_gradient=True)
    _finite_difference_check(adp, images())


def test_exact_gradient_with_constant_step_sizes_matches_finite_differences_where_they_are_constant(prior64):
    # Croce et al.'s gradient holds alpha fixed; it is the true derivative where alpha does not move with x: here
    # alpha sits at the reference rule's upper clamp 0.1 (lambda = 0.9 asks for far more).
    adp = ADP(prior64, steps=3, lam=0.9, step_rule="reference", conditioning="injected")
    x = images()
    x0 = (x + 0.25 * torch.randn(x.shape, generator=gen(1), dtype=x.dtype)).clamp(0, 1)
    one_step = ADP(prior64, steps=1, lam=0.9, step_rule="reference", conditioning="injected")
    sigma = torch.full((2,), 0.25, dtype=x.dtype)
    torch.testing.assert_close(one_step.update(x0, sigma), (x0 + 0.1 * adp_score(prior64, x0, sigma)).clamp(0, 1))
    _finite_difference_check(adp, x)


def test_checkpointing_leaves_the_exact_gradient_unchanged(prior64):
    x = images().requires_grad_(True)
    grads = []
    for checkpoint_steps in (True, False):
        adp = ADP(prior64, steps=3, checkpoint_steps=checkpoint_steps)
        grads.append(torch.autograd.grad(adp(x, generator=gen(2)).pow(2).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------------------------
# the ART wrapper: BPDA, EOT, ART's attacks and randomized smoothing

def test_bpda_gradient_is_the_classifier_gradient_at_the_purified_point(prior32):
    check_bpda_gradient(ADPPyTorch(prior32, steps=2, gradient="bpda", seed=2, device_type="cpu"), linear_classifier(),
                        min_move=1e-2)


@pytest.mark.parametrize("gradient", ["bpda", "exact"])
def test_eot_gradient_is_the_mean_of_single_sample_gradients(prior32, gradient):
    # With eot_samples=k the batch becomes x repeated k times (row-interleaved) in one call; the same rows passed
    # without EOT draw the same noise, and their per-row gradients (each scaled by 1/k by the mean loss) sum to the
    # mean of the k single-sample gradients.
    k, classifier = 3, linear_classifier()
    purifier = ADPPyTorch(prior32, steps=2, gradient=gradient, eot_samples=k, seed=5, device_type="cpu")
    x, y = images(n=2, dtype=torch.float32).numpy(), np.eye(10)[[3, 8]]
    eot_grad = art_classifier(classifier, [purifier]).loss_gradient(x, y)
    purifier.reset_generator()
    purifier.set_params(eot_samples=1)
    rows = art_classifier(classifier, [purifier]).loss_gradient(np.repeat(x, k, axis=0), np.repeat(y, k, axis=0))
    single = k * rows.reshape(2, k, 1, SIZE, SIZE)
    np.testing.assert_allclose(eot_grad, single.mean(axis=1), rtol=1e-4, atol=1e-7)
    assert not np.allclose(single[:, 0], single[:, 1])  # the samples differ: the average is not trivial


@pytest.mark.parametrize("gradient", ["bpda", "exact"])
def test_art_pgd_and_apgd_run_through_each_gradient_mode(prior32, gradient):
    # APGD attacks only the points the stochastic defense still classifies as y when it starts (else it returns x);
    # with this tiny random prior that is a matter of the noise, so the seed is one where some point is.
    purifier = ADPPyTorch(prior32, steps=2, gradient=gradient, eot_samples=2, seed=1, device_type="cpu")
    classifier = art_classifier(linear_classifier(), [purifier])
    x = images(n=3, dtype=torch.float32).numpy()
    prediction = classifier.predict(x)
    assert prediction.shape == (3, 10)  # predict keeps N rows even with EOT
    y = prediction.argmax(1)  # APGD only attacks correctly classified points
    check_art_attacks_run(classifier, x, y)


def test_exact_pgd_increases_the_defended_loss(prior32):
    purifier = ADPPyTorch(prior32, steps=2, gradient="exact", seed=0, device_type="cpu")
    check_exact_pgd_increases_the_defended_loss(purifier, linear_classifier(), nb_classes=10, eps_step=0.02, max_iter=5)


class _Brightness(nn.Module):
    """Class 1 if the mean pixel is above 0.5, else class 0 (confidently)."""

    def forward(self, x):
        m = 50 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-m, m], dim=1)


def test_randomized_smoothing_around_adp_predicts_and_certifies():
    # Randomized smoothing adds its noise before the preprocessing defences (values leave [0, 1]): noisy_inputs.
    purifier = ADPPyTorch(GaussianPrior(MU, 0.3), steps=2, sigma=0.1, noisy_inputs=True, seed=0, device_type="cpu")
    x = np.concatenate([np.full((1, 1, SIZE, SIZE), 0.2), np.full((1, 1, SIZE, SIZE), 0.8)]).astype(np.float32)
    smoothed = NumpyRandomizedSmoothing(art_classifier(_Brightness(), [purifier], nb_classes=2), sample_size=16,
                                        scale=0.1, alpha=0.001)
    np.testing.assert_array_equal(smoothed.predict(x), [[1, 0], [0, 1]])
    prediction, radius = smoothed.certify(x, n=32)
    np.testing.assert_array_equal(prediction, [0, 1])
    assert (radius > 0).all()


def test_purified_classifier_runs_the_ensemble_in_one_batch_and_counts_network_evaluations(prior32):
    purifier = ADPPyTorch(prior32, steps=3, tau=0.0, seed=0, device_type="cpu")
    defended = PurifiedClassifier(purifier, linear_classifier(), runs=4)
    defended.reset_counters()  # the module-scoped prior has counted earlier tests' evaluations
    with torch.no_grad():
        scores = defended(images(n=2, dtype=torch.float32))
    assert scores.shape == (2, 10)
    torch.testing.assert_close(scores.exp().sum(1), torch.ones(2))
    # two score evaluations (the point and the probe of eq. 17) per step and run
    assert defended.nfe_per_image() == {"prior_forward": 4 * 3 * 2, "prior_backward": 0.0, "classifier": 4}


def test_seeded_purification_is_deterministic_and_noise_dependent(prior32):
    purifier = ADPPyTorch(prior32, steps=2, seed=3, device_type="cpu")
    x = images(n=2, dtype=torch.float32).numpy()
    first, _ = purifier(x)
    second, _ = purifier(x)
    purifier.reset_generator()
    again, _ = purifier(x)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, second)
    assert first.dtype == np.float32 and first.min() >= 0 and first.max() <= 1


def test_channels_last_input_gives_the_channels_first_result(prior32):
    x = images(n=2, dtype=torch.float32).numpy()
    first, _ = ADPPyTorch(prior32, steps=2, seed=1, device_type="cpu")(x)
    last, _ = ADPPyTorch(prior32, steps=2, seed=1, channels_first=False, device_type="cpu")(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(last.transpose(0, 3, 1, 2), first, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the detection gate of App. F

def test_detection_gate_injects_sigma_on_flagged_inputs_and_beta_sigma_on_the_others(prior64):
    natural = images(n=6)
    threshold = detection_threshold_from_natural(prior64, natural, detection_sigma=0.1, quantile=0.5)
    norms = score_norm(prior64, natural, 0.1)
    assert ((norms > threshold).sum(), (norms <= threshold).sum()) == (3, 3)  # the median splits six images
    adp = ADP(prior64, sigma=0.3, detection_threshold=threshold, beta=0.2, detection_sigma=0.1)
    expected = torch.where(norms > threshold, 0.3, 0.06).to(natural.dtype)
    torch.testing.assert_close(adp.injection_sigma(natural), expected)


def test_detection_gate_flags_perturbed_images_more_often_than_natural_ones(gaussian64):
    # Under the Gaussian prior the score norm is |x - mu| c/(std^2+c^2): perturbed images sit farther from mu.
    natural = MU + STD * torch.randn(200, 1, SIZE, SIZE, generator=gen(4), dtype=torch.float64)
    threshold = detection_threshold_from_natural(gaussian64, natural.clamp(0, 1), quantile=0.95)
    sign = torch.sign(torch.randn(natural.shape, generator=gen(5), dtype=torch.float64))
    attacked = (natural + 0.3 * sign).clamp(0, 1)
    adp = ADP(gaussian64, detection_threshold=threshold)
    assert adp.flagged(attacked).double().mean() > 0.9 > 0.1 > adp.flagged(natural.clamp(0, 1)).double().mean()


# ---------------------------------------------------------------------------------------------------------------------
# bad input and bad settings

@pytest.mark.parametrize("bad, message", [
    (np.full((2, 1, SIZE, SIZE), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((1, SIZE, SIZE), dtype=np.float32), "4-D"),
    (np.full((2, 1, SIZE, SIZE), 200.0, dtype=np.float32), "255"),
    (np.zeros((2, 1, SIZE, SIZE), dtype=np.uint8), "dtype"),
    (np.zeros((0, 1, SIZE, SIZE), dtype=np.float32), "empty"),
    (np.zeros((2, SIZE, SIZE, 1), dtype=np.float32), "channels"),
    (np.zeros((2, 3, SIZE, SIZE), dtype=np.float32), "channels"),
    (np.full((2, 1, SIZE, SIZE), 1.2, dtype=np.float32), "outside")])
def test_bad_input_raises_a_clear_value_error(prior32, bad, message):
    purifier = ADPPyTorch(prior32, device_type="cpu")
    with pytest.raises(ValueError, match=message):
        purifier(bad)
    with pytest.raises(ValueError, match=message):
        purifier.forward(torch.from_numpy(bad))


def test_noisy_inputs_accept_values_outside_the_unit_interval_but_not_0_255images(prior32):
    purifier = ADPPyTorch(prior32, steps=1, noisy_inputs=True, device_type="cpu")
    out, _ = purifier(np.full((2, 1, SIZE, SIZE), 1.2, dtype=np.float32))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="255"):
        purifier(np.full((2, 1, SIZE, SIZE), 200.0, dtype=np.float32))


class _AwayFromHalf(nn.Module):
    """A "denoiser" whose score points away from 0.5: eq. (17) finds no decrease and the updates run off."""

    def forward(self, x, sigma):
        return x + 3.0 * (x - 0.5)


def test_diverging_updates_raise_a_clear_error_instead_of_feeding_the_prior_garbage():
    adp = ADP(DenoiserPrior(_AwayFromHalf()), steps=20, lam=0.5, sigma=0.05)
    with pytest.raises(ADPDivergedError, match="diverged"):
        adp(images(n=2), generator=gen(0))


@pytest.mark.parametrize("settings, message", [
    (dict(sigma=0.0), "sigma"), (dict(steps=0), "steps"), (dict(lam=1.5), "lam"), (dict(delta=-1e-3), "delta"),
    (dict(tau=-1.0), "tau"), (dict(step_rule="code"), "step_rule"), (dict(conditioning="fixed"), "conditioning"),
    (dict(sigma_range=(0.5, 0.1)), "sigma_range"), (dict(detection_threshold=-2.0), "detection_threshold"),
    (dict(beta=0.0), "beta"), (dict(step_size_gradient="yes"), "step_size_gradient"),
    (dict(gradient="full"), "gradient"), (dict(eot_samples=0), "eot_samples"), (dict(clip_values=(0, 255)), "clip"),
    (dict(noisy_inputs=1), "noisy_inputs")])
def test_bad_settings_raise_a_clear_value_error(prior32, settings, message):
    with pytest.raises(ValueError, match=message):
        ADPPyTorch(prior32, **settings)


def test_set_params_reaches_the_algorithm_and_is_checked(prior32):
    purifier = ADPPyTorch(prior32)
    assert (purifier.sigma, purifier.steps, purifier.lam, purifier.tau) == (0.25, 10, 0.05, 1e-3)  # the paper's
    assert purifier.algorithm.probe_delta == 1e-5
    purifier.set_params(step_rule="reference", sigma=0.3)
    assert purifier.algorithm.step_rule == "reference" and purifier.algorithm.sigma == 0.3
    assert purifier.algorithm.probe_delta == 1e-3
    with pytest.raises(ValueError, match="conditioning"):
        purifier.set_params(conditioning="fixed")
    with pytest.raises(ValueError, match="Prior"):
        ADP(linear_classifier())
