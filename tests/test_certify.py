"""Certified lower bounds by denoised smoothing (ART's ``certify``), the SmoothAdv bracket and ``python -m benchmarks
certify``.

The reference point is a linear classifier ``f(x) = [0, w.x + b]`` (class 1 iff ``w.x + b > 0``): under
``delta ~ N(0, sigma^2 I)`` it says class 1 with probability ``Phi((w.x + b) / (sigma ||w||))`` and its smoothed
classifier is ``f`` itself, robust exactly to the distance ``|w.x + b| / ||w||`` to the hyperplane (Cohen et al. 2019,
section 3.1's linear example). With the exact Gaussian denoiser (an affine map) in front, the pipeline stays linear.
"""

import json
import os

import numpy as np
import pytest
import torch
from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
from scipy.stats import beta, norm
from tiny import SIZE, images, tiny_prior
from torch import nn

from attacks_adaptive import SmoothAdv
from benchmarks.__main__ import main
from benchmarks.harness.certification import CertifySettings, certified_accuracy, reseed, smoothed_classifier
from purifiers import GaussianPrior, OneShotPyTorch

SHAPE = (1, SIZE, SIZE)
SIGMA = 0.25
DISTANCE = 0.3  # of the test image x = 0.5 to the linear classifier's hyperplane (||w|| = 1)


class Linear2(nn.Module):
    """Logits ``[0, scale (w.x - w.0.5) + distance]`` with ``w = 1/8`` per pixel (``||w|| = 1``): the image ``x = 0.5``
    lies ``distance`` inside class 1 in ``l_2``; ``scale`` is the Gaussian denoiser's shrink, so that
    ``f(D(x))`` has its hyperplane at the same place as ``f(x)`` with ``scale = 1``."""

    def __init__(self, distance=DISTANCE, scale=1.0):
        super().__init__()
        self.register_buffer("w", torch.full((SIZE * SIZE,), 1.0 / SIZE))
        self.distance, self.scale = distance, scale

    def forward(self, x):
        z = (x.flatten(1) - 0.5) @ self.w.to(x.dtype) + self.scale * self.distance
        return torch.stack([torch.zeros_like(z), z], 1)


def clopper_pearson_lower(count, n, alpha):
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    return 0.0 if count == 0 else float(beta.ppf(alpha, count, n - count + 1))


def art_smoothing(model, n0=50, alpha=0.001, sigma=SIGMA):
    """ART's smoothed classifier of ``model`` alone (no preprocessing defence)."""
    return PyTorchRandomizedSmoothing(model, loss=nn.CrossEntropyLoss(), input_shape=SHAPE, nb_classes=2,
                                      clip_values=(0.0, 1.0), device_type="cpu", sample_size=n0, scale=sigma,
                                      alpha=alpha)


def art_noise(seed, n0, n, sigma=SIGMA):
    """The noise ART's ``certify`` draws after ``np.random.seed(seed)``: ``n0`` selection draws, then ``n``."""
    np.random.seed(seed)
    first = np.random.normal(scale=sigma, size=(n0, *SHAPE)).astype(np.float32)
    return first, np.random.normal(scale=sigma, size=(n, *SHAPE)).astype(np.float32)


def class_one_count(model, x, noise, denoise=lambda v: v, noise_first=True):
    """Class-1 votes of ``f(D(x + noise))`` (``noise_first``) or of the wrong order ``f(D(x) + noise)``."""
    x = torch.as_tensor(x)
    inputs = denoise(x + torch.as_tensor(noise)) if noise_first else denoise(x) + torch.as_tensor(noise)
    with torch.no_grad():
        return int((model(inputs).argmax(1) == 1).sum())


def x_half(n=1):
    return np.full((n, *SHAPE), 0.5, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------------
# (a) ART's certify against the hand computation on the linear classifier

def test_art_certify_is_cohen_certify_with_clopper_pearson():
    n0, n, alpha, seed = 50, 2000, 0.001, 3
    model = Linear2()
    smoothed = art_smoothing(model, n0=n0, alpha=alpha)
    np.random.seed(seed)
    prediction, radius = smoothed.certify(x_half(), n=n, batch_size=500)
    _, noise = art_noise(seed, n0, n)
    count = class_one_count(model, x_half(), noise)
    p_true = norm.cdf(DISTANCE / SIGMA)  # closed form: P(w.(x + delta) + b > 0)
    assert abs(count / n - p_true) < 4 * np.sqrt(p_true * (1 - p_true) / n)
    p_lower = clopper_pearson_lower(count, n, alpha)
    by_hand = SIGMA * norm.ppf(p_lower)
    assert prediction[0] == 1
    np.testing.assert_allclose(radius[0], by_hand, rtol=1e-9)
    assert 0 < radius[0] <= DISTANCE  # never beyond the smoothed classifier's exact robust radius
    # Deliberately wrong certificates fail the same comparison.
    point_estimate = SIGMA * norm.ppf(count / n)
    wrong_scale = 2 * SIGMA * norm.ppf(p_lower)  # sigma on the [-1, 1] scale
    assert abs(point_estimate - radius[0]) > 1e-3
    assert abs(wrong_scale - radius[0]) > 1e-3 and wrong_scale > DISTANCE


def test_art_certify_abstains_on_the_hyperplane():
    np.random.seed(0)
    prediction, radius = art_smoothing(Linear2(distance=0.0), n0=20).certify(x_half(), n=400, batch_size=400)
    assert prediction[0] == -1 and radius[0] == 0.0


def test_the_noise_goes_before_the_denoiser():
    """ART's ``certify`` over ``preprocessing_defences=[D]`` counts ``f(D(x + delta))``, denoised smoothing's order;
    the other order ``f(D(x) + delta)`` gives other counts, so the comparison can fail."""
    n0, n, alpha, seed = 20, 1000, 0.001, 5
    prior = GaussianPrior(mean=0.5, std=0.2)
    shrink = 0.2**2 / (0.2**2 + SIGMA**2)
    model = Linear2(scale=shrink)
    denoiser = OneShotPyTorch(prior, sigma=SIGMA, device_type="cpu")
    smoothed = smoothed_classifier(denoiser, model, SIGMA, n0, alpha, SHAPE, 2, "cpu")
    np.random.seed(seed)
    _, radius = smoothed.certify(x_half(), n=n, batch_size=500)
    _, noise = art_noise(seed, n0, n)
    denoise = lambda v: prior.denoise(v, SIGMA).clamp(0, 1)  # noqa: E731
    right = class_one_count(model, x_half(), noise, denoise)
    wrong = class_one_count(model, x_half(), noise, denoise, noise_first=False)
    np.testing.assert_allclose(radius[0], SIGMA * norm.ppf(clopper_pearson_lower(right, n, alpha)), rtol=1e-9)
    assert abs(wrong - right) > 50  # P(class 1) = Phi(0.3 / 0.25) = 0.88 against Phi(0.39 * 0.3 / 0.25) = 0.68


# --------------------------------------------------------------------------------------------------------------------
# (b) the bracket: certified accuracy at r <= SmoothAdv-attacked accuracy at r

def certify_all(smoothed, x, n, seed=0):
    """ART's ``certify`` per image (each with its own seed): predictions and radii."""
    out = []
    for i in range(x.shape[0]):
        reseed(smoothed, seed + i)
        out.append(smoothed.certify(x[i:i + 1], n=n, batch_size=512))
    return np.array([int(p[0]) for p, _ in out]), np.array([float(r[0]) for _, r in out])


def not_broken(predictor, x, labels, eps, step=None, seed=0):
    """Per image: whether SmoothAdv's point in the l_2 ball of ``eps`` fails to break the smoothed classifier: its
    PREDICT returns the label or abstains (an abstention proves nothing, Cohen et al.'s Theorem 2)."""
    correct = []
    for i in range(x.shape[0]):
        reseed(predictor, seed + i)
        attack = SmoothAdv(predictor, eps=eps, steps=5, samples=16, step=step, seed=seed + i)
        x_adv = attack.perturb(torch.as_tensor(x[i:i + 1]), torch.tensor([int(labels[i])])).x_adv.numpy()
        row = predictor.predict(x_adv, batch_size=512, is_abstain=True)[0]
        correct.append(bool(row.sum() == 0 or row.argmax() == labels[i]))
    return np.array(correct)


@pytest.mark.slow
def test_bracket_on_the_tiny_prior():
    """One-shot denoising with the tiny U-Net prior and a linear classifier (the exact gradient through D): at each
    certified radius r (where an attack at eps r meets the edge of a certificate), the certified accuracy at r is at
    most the SmoothAdv-attacked accuracy at eps r."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2)).eval().requires_grad_(False)
    denoiser = OneShotPyTorch(tiny_prior(torch.float32), sigma=SIGMA, device_type="cpu")
    smoothed = smoothed_classifier(denoiser, model, SIGMA, 20, 0.001, SHAPE, 2, "cpu")
    predictor = smoothed_classifier(denoiser, model, SIGMA, 1000, 0.001, SHAPE, 2, "cpu")
    x = images(n=4, low=0.1, high=0.9, dtype=torch.float32).numpy()
    np.random.seed(0)
    labels = predictor.predict(x, batch_size=512, is_abstain=False).argmax(1)
    pred, radius = certify_all(smoothed, x, n=1000)
    certified_radii = sorted(set(radius[(radius > 0) & (pred == labels)]))
    assert len(certified_radii) >= 2, radius  # certificates to bracket
    for r in certified_radii:
        assert certified_accuracy(labels, pred, radius, r) <= not_broken(predictor, x, labels, r).mean()


@pytest.fixture(scope="module")
def linear_pipeline():
    """The exact Gaussian denoiser and a linear classifier: the smoothed classifier is linear, robust exactly to
    ``DISTANCE`` at ``x = 0.5``; PREDICT with 10,000 draws."""
    prior = GaussianPrior(mean=0.5, std=0.2)
    model = Linear2(scale=0.2**2 / (0.2**2 + SIGMA**2))
    denoiser = OneShotPyTorch(prior, sigma=SIGMA, device_type="cpu")
    return (smoothed_classifier(denoiser, model, SIGMA, 50, 0.001, SHAPE, 2, "cpu"),
            smoothed_classifier(denoiser, model, SIGMA, 10_000, 0.001, SHAPE, 2, "cpu"))


def test_bracket_holds_and_a_wrong_radius_or_a_broken_attack_fails_it(linear_pipeline):
    smoothed, predictor = linear_pipeline
    x, labels = x_half(), np.array([1])
    pred, radius = certify_all(smoothed, x, n=2000)
    r = float(radius[0])
    assert pred[0] == 1 and 0 < r <= DISTANCE
    assert certified_accuracy(labels, pred, radius, r) <= not_broken(predictor, x, labels, r).mean()  # 1 <= 1
    # A radius scaled by 2 claims robustness beyond the hyperplane: SmoothAdv crosses it and the bracket fails.
    assert certified_accuracy(labels, pred, 2 * radius, 2 * r) > not_broken(predictor, x, labels, 2 * r).mean()
    # Beyond the exact radius the attack must succeed; with a (near) zero step it does not, and that check fails.
    assert not not_broken(predictor, x, labels, 1.5 * DISTANCE)[0]
    assert not_broken(predictor, x, labels, 1.5 * DISTANCE, step=1e-12)[0]


# --------------------------------------------------------------------------------------------------------------------
# (c) the command end to end: resume, refusal, files

def _run(out, *extra):
    main(["certify", "--n-images", "2", "--n0", "8", "--n", "32", "--sigmas", "0.5", "--radii", "0.25", "0.5",
          "--bracket", "--bracket-n", "32", "--attack-steps", "1", "--attack-samples", "2", "--out", str(out),
          "--threads", "1", "--quiet", *extra])
    with open(os.path.join(out, "certify_one-shot.json")) as f:
        return json.load(f)["rows"]


def _without_times(rows):
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


@pytest.mark.slow
def test_command_resumes_with_identical_rows_and_refuses_other_settings(tmp_path):
    rows = _run(tmp_path)
    assert (tmp_path / "certify_one-shot.png").stat().st_size > 0
    kinds = {(r["scoring"], r["norm"], r["eps"]) for r in rows}
    assert kinds == {("certified", "L2", 0.25), ("certified", "L2", 0.5), ("certified", "Linf", 8 / 255),
                     ("smoothed_prediction", "L2", 0.25), ("smoothed_prediction", "L2", 0.5)}
    for row in rows:
        assert row["n"] == 2 and row["sigma"] == 0.5 and row["n0"] == 8 and row["n_noise"] == 32
        if row["scoring"] == "smoothed_prediction":
            assert row["bracket"][0] <= row["bracket"][1] and row["violations"] == 0
    state = tmp_path / "certify_state" / "one-shot" / "sigma_0.5"
    os.remove(tmp_path / "certify_one-shot.json")
    os.remove(state / "img_000001.json")
    os.remove(state / "bracket_000001.json")
    assert _without_times(_run(tmp_path)) == _without_times(rows)
    with pytest.raises(ValueError, match="other settings"):
        _run(tmp_path, "--alpha", "0.01")


def test_estimate_prints_the_cost_and_leaves_no_state(tmp_path, capsys):
    main(["certify", "--n-images", "2", "--n0", "8", "--n", "32", "--sigmas", "0.5", "--out", str(tmp_path),
          "--threads", "1", "--estimate"])
    assert "Estimated cost" in capsys.readouterr().out
    assert not (tmp_path / "certify_state").exists()


# --------------------------------------------------------------------------------------------------------------------
# (d) bad arguments

@pytest.mark.parametrize("change, message", [
    (dict(denoiser="full"), "name one"),
    (dict(defense="adp"), "leave --defense out"),
    (dict(alpha=0.7), "alpha"),
    (dict(sigmas=(0.0,)), "sigmas"),
    (dict(sigmas=(0.5, 0.5)), "distinct"),
    (dict(n0=0), "n0"),
    (dict(denoiser="two-shot"), "denoiser"),
    (dict(dataset="cifar10"), "dataset"),
])
def test_bad_settings_raise_clear_value_errors(change, message):
    with pytest.raises(ValueError, match=message):
        CertifySettings(**change).check()


def test_bad_denoiser_and_attack_arguments():
    prior = GaussianPrior()
    with pytest.raises(ValueError, match="sigma must be a positive"):
        OneShotPyTorch(prior, sigma=0.0)
    denoiser = OneShotPyTorch(prior, sigma=SIGMA, device_type="cpu")
    smoothed = smoothed_classifier(denoiser, Linear2(), SIGMA, 10, 0.001, SHAPE, 2, "cpu")
    with pytest.raises(ValueError, match="l_2"):
        SmoothAdv(smoothed, eps=0.5, norm="linf")
    with pytest.raises(ValueError, match="sigma must be a positive"):
        SmoothAdv(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2)), eps=0.5)
    with pytest.raises(ValueError, match="0-255"):
        denoiser.purify(torch.full((1, *SHAPE), 255.0), with_gradient=False)
    with pytest.raises(SystemExit):
        main(["certify", "--alpha", "0.7"])
