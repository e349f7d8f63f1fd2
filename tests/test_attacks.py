"""Adaptive attacks (attacks_adaptive) against independent facts: finite differences, ART's own gradients and PGD,
hand-computed schedules, known undefended results, and Carlini et al.'s gradient-masking checklist
(https://arxiv.org/abs/1902.06705 §5): identity purifier, unbounded budget, monotonicity in eps, gradient >= SPSA.

Built against toy randomized purifiers defined here (Gaussian noise + an exact Gaussian denoiser, with ``bpda`` and
``exact`` gradient modes; a tiny random EDM prior for the SPSA comparison), so the file runs without the real purifiers.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import attacks_adaptive as aa
from attacks_adaptive.apgd_eot import apgd_checkpoints
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.geometry import project
from attacks_adaptive.losses import ce_loss, dlr_loss, margin_loss
from purifiers import EDMDenoiser, GaussianPrior, PurifiedClassifier, PurifierPyTorch, gradient_mode
from purifiers.nets.unet import SmallUNet
from purifiers.priors.speed import SpeedOptions

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------------
# Toy purifiers and models
# --------------------------------------------------------------------------------------------------------------------

class NoisyDenoise(nn.Module):
    """Add N(0, sigma^2) noise, then denoise with the prior at sigma (a one-step randomized purifier)."""

    def __init__(self, prior, sigma=0.1):
        super().__init__()
        self.prior, self.sigma = prior, sigma

    def forward(self, x, generator=None):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.prior.denoise(x + self.sigma * noise, self.sigma).clamp(0, 1)


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.prior = GaussianPrior(0.5, 0.3)

    def forward(self, x, generator=None):
        return x


class ToyPurifier(PurifierPyTorch):
    """A PurifierPyTorch with ``bpda`` and ``exact`` (autograd through the algorithm, noise fixed) gradient modes."""

    @gradient_mode("exact")
    def _exact(self, x, generator):
        return self.algorithm(x, generator=generator)


def tiny_classifier(seed=0, size=8, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, 10))
    return net.to(dtype).eval()


def toy_images(n=16, size=8, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 1, size, size, generator=g)


def toy_defended(sigma=0.1, seed=1, runs=1, classifier=None, gradient="exact"):
    purifier = ToyPurifier(NoisyDenoise(GaussianPrior(0.5, 0.3), sigma), gradient=gradient, seed=seed,
                           device_type="cpu")
    return PurifiedClassifier(purifier, classifier or tiny_classifier(), runs=runs)


def clean_labels(classifier, x):
    with torch.no_grad():
        return classifier(x).argmax(1)


@pytest.fixture(scope="module")
def mnist():
    from benchmarks.data import load_mnist
    from benchmarks.models import MODELS_DIR, load_classifier

    x, y = load_mnist("test", n=100)
    return load_classifier(os.path.join(MODELS_DIR, "mnist_classifier.safetensors")), torch.tensor(x), torch.tensor(y)


# --------------------------------------------------------------------------------------------------------------------
# Known undefended result
# --------------------------------------------------------------------------------------------------------------------

def test_pgd_and_apgd_break_the_undefended_mnist_classifier(mnist):
    classifier, x, y = mnist
    assert aa.single_shot(classifier, x, y).mean() >= 0.95
    for attack in (aa.BlindPGD(classifier, eps=0.3, steps=10),
                   aa.APGDEOT(classifier, eps=0.3, steps=10, eot=1, loss="ce")):
        x_adv = attack(x, y)
        assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert aa.single_shot(classifier, x_adv, y).mean() <= 0.01, attack.name


# --------------------------------------------------------------------------------------------------------------------
# The building blocks against independent computations
# --------------------------------------------------------------------------------------------------------------------

def test_eot_gradient_matches_central_finite_differences():
    # Exact mode with the noise fixed (generator restarted before every evaluation): the EOT gradient is the gradient
    # of the mean loss over the k noise draws; float64 central differences check it coordinate by coordinate.
    classifier = tiny_classifier(dtype=torch.float64)
    purifier = ToyPurifier(NoisyDenoise(GaussianPrior(0.5, 0.3), 0.1), gradient="exact", seed=3, device_type="cpu")
    model = DefendedModel(classifier, purifier)
    x = toy_images(2, low=0.2, high=0.8).double()
    y = torch.tensor([3, 7])
    k = 4

    def mean_loss(x_eval):
        purifier.reset_generator()
        _, loss, _ = model.loss_gradient(x_eval, y, ce_loss, k, max_rows=64)
        return loss

    purifier.reset_generator()
    grad, _, _ = model.loss_gradient(x, y, ce_loss, k, max_rows=64)
    h = 1e-6
    for idx in [(0, 0, 1, 2), (0, 0, 5, 5), (1, 0, 3, 7), (1, 0, 0, 0)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (mean_loss(x + e) - mean_loss(x - e))[idx[0]] / (2 * h)
        assert torch.isclose(grad[idx], fd, rtol=1e-5, atol=1e-8), (idx, grad[idx], fd)


def test_eot_gradient_is_chunk_invariant_and_sign_vote_counts_signs():
    classifier = tiny_classifier()
    purifier = ToyPurifier(Identity(), device_type="cpu")
    model = DefendedModel(classifier, purifier)
    x, y = toy_images(5), torch.arange(5)
    g_one, loss_one, p_one = model.loss_gradient(x, y, ce_loss, 6, max_rows=1000)
    g_chunked, loss_chunked, p_chunked = model.loss_gradient(x, y, ce_loss, 6, max_rows=4)  # splits the copies too
    torch.testing.assert_close(g_chunked, g_one)
    torch.testing.assert_close(loss_chunked, loss_one)
    torch.testing.assert_close(p_chunked, p_one)
    votes, _, _ = model.loss_gradient(x, y, ce_loss, 6, reduce="sign_vote")
    torch.testing.assert_close(votes, 6 * g_one.sign())  # identity copies agree: every vote has the same sign


def test_art_classifier_gradient_equals_arts_own_loss_gradient():
    from art.estimators.classification import PyTorchClassifier

    classifier = tiny_classifier()
    k = 3
    purifier = ToyPurifier(NoisyDenoise(GaussianPrior(0.5, 0.3), 0.1), gradient="exact", eot_samples=k, seed=5,
                           device_type="cpu")
    art = PyTorchClassifier(classifier, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                            clip_values=(0.0, 1.0), preprocessing_defences=[purifier], device_type="cpu")
    x, y = toy_images(4, low=0.1, high=0.9), torch.tensor([1, 2, 3, 4])
    purifier.reset_generator()
    art_grad = art.loss_gradient(x.numpy(), np.eye(10, dtype=np.float32)[y.numpy()])
    model = DefendedModel.from_target(art)
    assert model.purifier is purifier
    purifier.reset_generator()
    grad, _, _ = model.loss_gradient(x, y, ce_loss, k, max_rows=64)
    # ART averages the cross-entropy over the N * k rows; the EOT gradient averages over the k copies only.
    np.testing.assert_allclose(grad.numpy() / x.shape[0], art_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norm", ["inf", 2])
def test_undefended_pgd_equals_arts_projected_gradient_descent(norm):
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    classifier = tiny_classifier()
    x = toy_images(6, low=0.2, high=0.8)
    y = clean_labels(classifier, x)
    eps, step = (0.1, 0.02) if norm == "inf" else (0.5, 0.1)
    art = PyTorchClassifier(classifier, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    art_adv = ProjectedGradientDescent(art, norm=np.inf if norm == "inf" else 2, eps=eps, eps_step=step, max_iter=5,
                                       num_random_init=0, batch_size=6, verbose=False).generate(x.numpy(), y.numpy())
    ours = aa.BlindPGD(classifier, eps=eps, norm="linf" if norm == "inf" else "l2", steps=5, step=step,
                       random_start=False)(x, y)
    np.testing.assert_allclose(ours.numpy(), art_adv, atol=1e-5)


def test_spsa_estimate_approaches_the_true_gradient():
    # On a deterministic smooth model the SPSA estimate is unbiased up to O(delta^2): with many queries it points
    # along the autograd gradient of the same loss.
    classifier = tiny_classifier()
    x = toy_images(2, low=0.3, high=0.7)
    y = torch.tensor([1, 2])
    attack = aa.SPSA(classifier, eps=0.1, queries=8000, delta=1e-3)
    estimate = attack.estimate_gradient(x, y, torch.Generator().manual_seed(0))
    xg = x.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(margin_loss(classifier(xg), y).sum(), xg)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(1), true.flatten(1))
    assert (cosine > 0.95).all(), cosine


def test_spsa_adam_update_breaks_an_undefended_model_at_large_eps():
    classifier = tiny_classifier()
    x = toy_images(8, low=0.3, high=0.7)
    y = clean_labels(classifier, x)
    x_adv = aa.SPSA(classifier, eps=1.0, steps=20, queries=256, update="adam", lr=0.1)(x, y)
    assert aa.single_shot(classifier, x_adv, y).max() == 0


def test_losses_and_projection_match_their_definitions():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.0, 5.0, 4.0, 1.0]])
    y = torch.tensor([0, 2])
    # DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3); margin: max_{i != y} z_i - z_y.
    torch.testing.assert_close(dlr_loss(logits, y), torch.tensor([-(3 - 2) / (3 - 1), -(4 - 5) / (5 - 1)]))
    torch.testing.assert_close(margin_loss(logits, y), torch.tensor([2 - 3.0, 5 - 4.0]))
    x0 = torch.full((2, 1, 4, 4), 0.5)
    far = x0 + torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p_inf, p_2 = project(far, x0, 0.1, "linf"), project(far, x0, 0.3, "l2")
    assert (p_inf - x0).abs().max() <= 0.1 + 1e-7
    assert ((p_2 - x0).flatten(1).norm(dim=1) <= 0.3 + 1e-6).all()
    assert p_2.min() >= 0 and p_2.max() <= 1


def test_apgd_checkpoints_follow_the_papers_schedule():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (increments shrink by 0.03 down to 0.06), w_j = ceil(p_j N).
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


# --------------------------------------------------------------------------------------------------------------------
# Carlini et al.'s checklist
# --------------------------------------------------------------------------------------------------------------------

def test_bpda_eot_through_an_identity_purifier_equals_plain_pgd():
    classifier = tiny_classifier()
    x = toy_images(8, low=0.2, high=0.8)
    y = clean_labels(classifier, x)
    defended = PurifiedClassifier(ToyPurifier(Identity(), device_type="cpu"), classifier)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        pgd = aa.BlindPGD(classifier, eps=eps, norm=norm, steps=6, random_start=False)(x, y)
        bpda = aa.BPDAEOT(defended, eps=eps, norm=norm, steps=6, eot=3)(x, y)
        full = aa.PGDEOT(defended, eps=eps, norm=norm, steps=6, eot=3, step=eps / 4)(x, y)
        torch.testing.assert_close(bpda, pgd)
        torch.testing.assert_close(full, pgd)


def _every_attack(target, eps, norm):
    settings = dict(eps=eps, norm=norm, steps=10)
    return [aa.BlindPGD(target, **settings), aa.BPDAEOT(target, eot=4, **settings),
            aa.JointAttack(target, mode="score", eot=4, **settings),
            aa.JointAttack(target, mode="full", eot=4, **settings),
            aa.JointAttack(target, mode="full", classifier_gradient="bpda", eot=4, **settings),
            aa.SPSA(target, eps=eps, norm=norm, steps=20, queries=1024), aa.PGDEOT(target, eot=4, **settings),
            aa.APGDEOT(target, eot=4, loss="ce", **settings), aa.APGDEOT(target, eot=4, loss="dlr", **settings),
            aa.DiffHammer(target, eot=4, **settings), aa.DiffHammer(target, eot=4, grafting=False, **settings)]


@pytest.mark.parametrize("norm,eps", [("linf", 1.0), ("l2", 8.0)])  # l2 8 covers the 8x8 unit cube's diagonal
def test_unbounded_budget_every_attack_succeeds(norm, eps):
    defended = toy_defended()
    x = toy_images(8)
    y = clean_labels(defended.classifier, x)
    for attack in _every_attack(defended, eps, norm):
        x_adv = attack(x, y)
        assert aa.multi_draw(defended, x_adv, y, draws=4).max() == 0, (attack.name, attack.describe())


def test_robustness_does_not_rise_with_eps():
    defended = toy_defended(sigma=0.05)
    x = toy_images(24, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    accuracies = []
    for eps in (0.0, 0.02, 0.05, 0.1, 0.2):
        if eps == 0:
            x_adv = x
        else:
            x_adv = aa.PGDEOT(defended, eps=eps, steps=10, eot=4)(x, y)
        defended.purifier.reset_generator()
        accuracies.append(aa.multi_draw(defended, x_adv, y, draws=8).mean().item())
    assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[0] > 0.5 and accuracies[-1] < accuracies[0]


def tiny_prior_defended():
    """A random tiny U-Net prior's one-shot denoiser (noise 0.1) in front of a tiny classifier."""
    torch.manual_seed(0)
    net = SmallUNet(1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    purifier = ToyPurifier(NoisyDenoise(EDMDenoiser(net), 0.1), gradient="exact", seed=0, device_type="cpu")
    return PurifiedClassifier(purifier, tiny_classifier(seed=2))


def test_runner_refuses_to_resume_with_other_speed_options(tmp_path):
    # channels_last / compile change a prior's outputs at float rounding: batches saved without them are not mixed in.
    defended = tiny_prior_defended()
    x = toy_images(2, low=0.2, high=0.8, seed=4)
    y = clean_labels(defended.classifier, x)
    out = str(tmp_path / "state")
    run = lambda: aa.run_worst_case([aa.BlindPGD(defended, eps=0.05, steps=1)], x, y, state_dir=out,  # noqa: E731
                                    defense="tiny", draws=2, batch_size=2, verbose=False)
    first = run()
    assert run()["rows"] == first["rows"]  # the same options resume
    defended.purifier.algorithm.prior.set_speed_options(SpeedOptions(channels_last=True))
    with pytest.raises(ValueError, match="other settings"):
        run()


def test_gradient_attacks_are_at_least_as_strong_as_spsa_on_a_tiny_prior():
    defended = tiny_prior_defended()
    x = toy_images(8, low=0.2, high=0.8, seed=4)
    y = clean_labels(defended.classifier, x)
    eps = 0.1
    spsa = aa.SPSA(defended, eps=eps, steps=8, queries=64)(x, y)
    pgd = aa.PGDEOT(defended, eps=eps, steps=8, eot=4)(x, y)
    apgd = aa.APGDEOT(defended, eps=eps, steps=8, eot=4)(x, y)
    acc = {name: aa.multi_draw(defended, v, y, draws=16).mean().item()
           for name, v in (("clean", x), ("spsa", spsa), ("pgd", pgd), ("apgd", apgd))}
    assert acc["spsa"] < acc["clean"], acc  # SPSA does something, so the comparison means something
    assert acc["pgd"] <= acc["spsa"] and acc["apgd"] <= acc["spsa"], acc


# --------------------------------------------------------------------------------------------------------------------
# Scoring protocols
# --------------------------------------------------------------------------------------------------------------------

class BlankWithProbability(nn.Module):
    """Replaces the image by black with probability p (a purifier whose error rate is known)."""

    def __init__(self, p):
        super().__init__()
        self.p, self.prior = p, GaussianPrior(0.5, 0.3)

    def forward(self, x, generator=None):
        keep = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device) >= self.p
        return x * keep


class Brightness(nn.Module):
    """Class 1 if the mean pixel exceeds 0.25, else class 0."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.25 - m, m - 0.25], 1) * 100


def test_multi_draw_is_the_fraction_of_correct_draws():
    defended = PurifiedClassifier(ToyPurifier(BlankWithProbability(0.3), seed=0, device_type="cpu"), Brightness())
    x, y = torch.full((50, 1, 4, 4), 0.8), torch.ones(50, dtype=torch.long)
    fraction = aa.multi_draw(defended, x, y, draws=40)
    assert set(np.unique(fraction.numpy() * 40).astype(int)) <= set(range(41))
    assert abs(fraction.mean().item() - 0.7) < 0.03  # 2,000 Bernoulli(0.7) draws: std 0.01
    assert set(aa.single_shot(defended, x, y).unique().tolist()) == {0.0, 1.0}
    assert aa.multi_draw(Brightness(), x, y, draws=40).eq(1).all()  # deterministic model: every draw agrees


def test_any_iteration_flags_equal_the_or_over_iterates():
    # Deterministic attack and model: run 1, 2, 3 steps by hand and OR their misclassifications.
    classifier = tiny_classifier()
    x = toy_images(16, low=0.3, high=0.7)
    y = clean_labels(classifier, x)
    kwargs = dict(eps=0.15, random_start=False, step=0.03)
    result = aa.BlindPGD(classifier, steps=3, track_iterates=True, **kwargs).perturb(x, y)
    expected = torch.zeros(16, dtype=torch.bool)
    for steps in (1, 2, 3):
        x_i = aa.BlindPGD(classifier, steps=steps, **kwargs)(x, y)
        expected |= clean_labels(classifier, x_i) != y
    assert torch.equal(result.broken, expected)
    assert expected.any()
    final = aa.single_shot(classifier, result.x_adv, y)
    assert torch.equal(aa.any_iteration(result.broken, final), (~expected).float() * final)


# --------------------------------------------------------------------------------------------------------------------
# The worst-case runner
# --------------------------------------------------------------------------------------------------------------------

def _runner_attacks(defended):
    return [aa.BPDAEOT(defended, eps=0.05, steps=3, eot=2), aa.SPSA(defended, eps=0.05, steps=3, queries=16),
            aa.BlindPGD(defended, eps=0.05, steps=3)]


def test_runner_writes_rows_keeps_the_worst_case_and_resumes(tmp_path):
    defended = toy_defended()
    x = toy_images(10, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    out = str(tmp_path / "state")
    report = aa.run_worst_case(_runner_attacks(defended), x, y, state_dir=out, defense="toy", draws=4, batch_size=4,
                               verbose=False)
    rows = report["rows"]
    assert len(rows) == 4 * len(aa.SCORINGS)  # 3 attacks + worst case, every protocol each
    for row in rows:
        assert {"attack", "gradient", "scoring", "eps", "norm", "n", "seed", "robust_acc", "eot", "iterations",
                "nfe_per_image", "seconds"} <= set(row)
    for scoring in aa.SCORINGS:
        per_attack = [r["robust_acc"] for r in rows if r["scoring"] == scoring and not r["attack"].startswith("worst")]
        worst = [r["robust_acc"] for r in rows if r["scoring"] == scoring and r["attack"].startswith("worst")][0]
        assert worst <= min(per_attack) + 1e-12
    bpda = [r for r in rows if r["attack"] == "BPDA+EOT" and r["scoring"] == "single_shot"][0]
    assert bpda["gradient"] == "bpda" and bpda["eot"] == 2 and bpda["iterations"] == 3
    assert bpda["nfe_per_image"]["prior_forward"] >= 3 * 2  # 3 steps x 2 EOT purifications per image at least
    assert report["x_worst"].shape == x.shape
    # The strongest example per input comes from the attack with the lowest multi-draw robustness there.
    state = out
    multi = np.stack([np.concatenate([np.load(os.path.join(state, folder, f))["multi_draw"]
                                      for f in sorted(os.listdir(os.path.join(state, folder)))])
                      for folder in ("BPDA_EOT", "SPSA", "BlindPGD")])
    np.testing.assert_array_equal(multi[report["worst_attack"], np.arange(10)], multi.min(0))

    # Resume: every batch is saved, so a second run attacks nothing ...
    attacks = _runner_attacks(defended)
    calls = []
    for attack in attacks:
        original = attack.perturb
        attack.perturb = lambda xb, yb, _o=original: calls.append(xb.shape[0]) or _o(xb, yb)
    again = aa.run_worst_case(attacks, x, y, state_dir=out, defense="toy", draws=4, batch_size=4, verbose=False)
    assert calls == [] and again["rows"] == report["rows"]
    # ... and after losing one batch (an interrupted run) only that batch is recomputed.
    os.remove(os.path.join(out, "SPSA", "b000004-000008.npz"))
    aa.run_worst_case(attacks, x, y, state_dir=out, defense="toy", draws=4, batch_size=4, verbose=False)
    assert calls == [4]
    # Other settings in the same folder are refused rather than mixed.
    with pytest.raises(ValueError, match="other settings"):
        aa.run_worst_case([aa.BPDAEOT(defended, eps=0.05, steps=4, eot=2)], x, y, state_dir=out, defense="toy", draws=4,
                          batch_size=4, verbose=False)
    # An attack with no saved batch left nothing to disagree with: it runs under its new settings, which the folder
    # then holds (a changed attack with saved batches is still refused).
    shutil.rmtree(os.path.join(out, "SPSA"))
    spsa = aa.SPSA(defended, eps=0.05, steps=2, queries=16)
    aa.run_worst_case([spsa], x, y, state_dir=out, defense="toy", draws=4, batch_size=4, verbose=False)
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["configs"]["SPSA"].startswith(spsa.config_key())
    with pytest.raises(ValueError, match="other settings"):
        aa.run_worst_case([aa.SPSA(defended, eps=0.05, steps=3, queries=16)], x, y, state_dir=out, defense="toy",
                          draws=4, batch_size=4, verbose=False)
    # So are a changed purifier setting and changed weights, with the attacks' own settings unchanged.
    defended.purifier.set_params(eot_samples=3)
    with pytest.raises(ValueError, match="other settings"):
        aa.run_worst_case(_runner_attacks(defended), x, y, state_dir=out, defense="toy", draws=4, batch_size=4,
                          verbose=False)
    defended.purifier.set_params(eot_samples=1)
    with torch.no_grad():
        next(defended.classifier.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="other settings"):
        aa.run_worst_case(_runner_attacks(defended), x, y, state_dir=out, defense="toy", draws=4, batch_size=4,
                          verbose=False)


# --------------------------------------------------------------------------------------------------------------------
# ART-style use and bad input
# --------------------------------------------------------------------------------------------------------------------

def test_generate_on_an_art_classifier_with_a_purifier_and_channels_last():
    from art.estimators.classification import PyTorchClassifier

    class ChannelsLast(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.permute(0, 3, 1, 2))

    classifier = tiny_classifier()
    purifier = ToyPurifier(NoisyDenoise(GaussianPrior(0.5, 0.3), 0.1), channels_first=False, seed=0,
                           device_type="cpu")
    art = PyTorchClassifier(ChannelsLast(classifier), loss=nn.CrossEntropyLoss(), input_shape=(8, 8, 1),
                            nb_classes=10, clip_values=(0.0, 1.0), channels_first=False,
                            preprocessing_defences=[purifier], device_type="cpu")
    x = toy_images(6, low=0.2, high=0.8).permute(0, 2, 3, 1).numpy()
    y = art.predict(x).argmax(1)
    x_adv = aa.BPDAEOT(art, eps=1.0, steps=10, eot=2).generate(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert (art.predict(x_adv).argmax(1) != y).all()


def test_bad_input_gets_a_clear_value_error():
    defended = toy_defended()
    x, y = toy_images(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps"):
        aa.BPDAEOT(defended, eps=-0.1)
    with pytest.raises(ValueError, match="norm"):
        aa.PGDEOT(defended, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="gradient mode 'surrogate'"):
        aa.PGDEOT(defended, eps=0.1, gradient="surrogate")
    with pytest.raises(ValueError, match="even"):
        aa.SPSA(defended, eps=0.1, queries=3)
    with pytest.raises(ValueError, match="eot"):
        aa.APGDEOT(defended, eps=0.1, eot=0)
    with pytest.raises(ValueError, match="needs the purifier's prior"):
        aa.JointAttack(tiny_classifier(), eps=0.1, mode="score")
    with pytest.raises(ValueError, match="target"):
        aa.BPDAEOT("not a model", eps=0.1)
    attack = aa.BPDAEOT(defended, eps=0.1, steps=1, eot=1)
    with pytest.raises(ValueError, match="NaN"):
        attack(torch.full((2, 1, 8, 8), float("nan")), y)
    with pytest.raises(ValueError, match="0-255"):
        attack(x * 255, y)
    with pytest.raises(ValueError, match="labels"):
        attack(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="4-D"):
        attack(x[0], y)


def test_benchmark_suite_holds_every_attack_of_the_issue():
    from benchmarks.harness.adaptive import PRESETS, attack_suite

    suite = attack_suite(toy_defended(), 0.1, "linf", PRESETS["cpu"])
    assert set(suite) == {"BlindPGD", "BPDA+EOT", "Joint(score)+EOT", "Joint(full)+EOT", "SPSA", "PGD+EOT[exact]",
                          "APGD-CE+EOT[exact]", "APGD-DLR+EOT[exact]", "DiffHammer[exact]", "Square+EOT"}
    assert suite["SPSA"].query == "single" and suite["PGD+EOT[exact]"].gradient == "exact"
    assert (suite["Square+EOT"].steps, suite["Square+EOT"].eot) == PRESETS["cpu"]["square"]
    assert set(attack_suite(tiny_classifier(), 0.1, "linf", PRESETS["cpu"])) == {"PGD", "APGD-CE", "APGD-DLR", "Square"}


def test_attacks_command_runs_a_named_subset_and_rejects_unknown_names(tmp_path):
    from benchmarks.harness.adaptive import run_attacks

    result = run_attacks(str(tmp_path), defenses=["none"], preset_name="smoke", attacks=["PGD"], verbose=False)
    assert {row["attack"] for row in result["rows"]} == {"PGD", "worst-case(PGD)"}
    with pytest.raises(ValueError, match="none of the attacks \\['Nope'\\] is in the suite of 'none'"):
        run_attacks(str(tmp_path / "other"), defenses=["none"], preset_name="smoke", attacks=["Nope"], verbose=False)


def test_spsa_single_queries_cost_one_purification_per_query():
    defended = toy_defended(runs=5)
    x, y = toy_images(2), torch.tensor([0, 1])
    model = DefendedModel.from_target(defended)
    for query, purifications in (("single", 1), ("deployed", 5)):
        with model.count() as meter:
            aa.SPSA(defended, eps=0.1, steps=1, queries=8, query=query)(x, y)
        assert meter.prior_forward == 2 * 8 * purifications  # 2 images x 8 queries, one denoise per purification


def test_rows_name_the_gradient_mode_actually_used():
    defended = toy_defended(gradient="exact")
    assert aa.APGDEOT(defended, eps=0.1).describe()["gradient"] == "exact"  # gradient=None: the purifier's mode
    assert aa.APGDEOT(defended, eps=0.1, gradient="bpda").describe()["gradient"] == "bpda"
    assert aa.BPDAEOT(defended, eps=0.1).describe()["gradient"] == "bpda"
    assert aa.BlindPGD(defended, eps=0.1).describe()["gradient"] == "none (classifier only)"
    assert aa.JointAttack(defended, eps=0.1, mode="score").describe()["eot"] == 1  # nothing stochastic to average
