"""DiffHammer (attacks_adaptive.diffhammer): the reference variant against its code's defaults and a one-pixel toy
whose steps, step sizes and best iterate are worked out by hand, its restart and early-stop rules, hand-computed E-step
weights of both variants, and the "iterated_em" reading against PGD+EOT (on a deterministic purifier, at equal
purifications and gradients on a tiny prior, on a toy "gradient dilemma"), plus autograd for the grafted pull-back.
"""

import math

import pytest
import torch
from test_attacks import (Identity, NoisyDenoise, ToyPurifier, clean_labels, tiny_classifier, tiny_prior_defended,
                          toy_defended, toy_images)
from torch import nn

import attacks_adaptive as aa
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.diffhammer import REFERENCE_MOMENTUM, REFERENCE_RHO, reference_checkpoints
from attacks_adaptive.losses import ce_loss
from purifiers import DiffPurePyTorch, GaussianPrior, PurifiedClassifier

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------------
# Toys
# --------------------------------------------------------------------------------------------------------------------

class ShiftUpOrDown(nn.Module):
    """Brightens or darkens the whole image by ``shift``, each with probability 1/2: a purifier with two populations
    of purifications whose vulnerabilities lie in opposite directions (the paper's gradient dilemma)."""

    def __init__(self, shift=0.15):
        super().__init__()
        self.shift, self.prior = shift, GaussianPrior(0.5, 0.3)

    def forward(self, x, generator=None):
        up = torch.rand((x.shape[0], 1, 1, 1), generator=generator, device=x.device) < 0.5
        return x + torch.where(up, self.shift, -self.shift)


class MidGray(nn.Module):
    """Class 1 if the mean pixel lies in (0.3, 0.7), else class 0."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 50 * torch.minimum(m - 0.3, 0.7 - m)], 1)


class Peak(nn.Module):
    """One-pixel images; logits ``(0, -1 - 10 |p - 0.62|, -100)``: class 0 everywhere, its CW loss (the margin
    ``z_1 - z_0``) peaks at 0.62 with slope 10."""

    def forward(self, x):
        p = x.flatten(1)[:, 0]
        return torch.stack([torch.zeros_like(p), -1 - 10 * (p - 0.62).abs(), torch.full_like(p, -100.0)], 1)


def _iterates(attack, x, y):
    """The attack's result and the iterates it visited, with the rows each holds (recorded where the iterate tracker
    looks)."""
    seen = []
    original = attack._note_iterate
    attack._note_iterate = lambda x_i, index=None: seen.append((x_i.clone(), index)) or original(x_i, index)
    return attack(x, y), seen


# --------------------------------------------------------------------------------------------------------------------
# The reference variant
# --------------------------------------------------------------------------------------------------------------------

def test_the_reference_variant_has_the_reference_codes_defaults():
    # Ka1b0/DiffHammer config.py: N_ITERS [50, 50, 50], N_RESTART 3, LOSS_NAMES ['CW', 'CE', 'DLR'], RESTART_THR 0.5,
    # N_EVAL 10, EM_LAM 5.0, EM_ALPHA 0.5, EM_STEPS 5; attacker.py APGD: step 2 eps, rho 0.75, momentum 0.75,
    # checkpoints int(p * 50) for p in (0, 0.22, 0.41, 0.57, 0.7, 0.8, 0.87, 0.93); initialize: a random start.
    eps = 8 / 255
    described = aa.DiffHammer(toy_defended(), eps=eps).describe()
    assert described["variant"] == "reference"
    expected = {"steps": 50, "iterations": 50, "restarts": 3, "loss": ("margin", "ce", "dlr"),
                "restart_threshold": 0.5, "eot": 10, "em_lam": 5.0, "em_alpha": 0.5, "em_steps": 5,
                "random_start": True, "grafting": True, "keep_best": True}
    assert {key: described[key] for key in expected} == expected
    assert described["step"] == pytest.approx(2 * eps)
    assert (REFERENCE_RHO, REFERENCE_MOMENTUM) == (0.75, 0.75)
    assert reference_checkpoints(50) == [0, 11, 20, 28, 35, 40, 43, 46]
    assert reference_checkpoints(100) == [0, 22, 41, 56, 70, 80, 87, 93]  # int(0.57 * 100) is 56 in floating point
    assert reference_checkpoints(5) == [0, 1, 2, 3, 4]


def test_reference_steps_step_sizes_and_best_iterate_by_hand():
    # One input p = 0.5 of class 0, eps 0.2 (the ball [0.3, 0.7]), no random start, one restart of 5 iterations, CW.
    # Deterministic: one copy per evaluation, weight 1, so the M-step direction is the last evaluation's gradient
    # dL/dp = +10 below 0.62, -10 above. Checkpoints after iterations 1, 2, 3, 4 (int(p * 5)), each one iteration
    # after the last, so the step halves where the largest loss did not rise at that iteration (fewer than 0.75 rises
    # in 1), or where it stayed equal with the step unchanged. The averaged gradient d_t = v d + (1 - v) d_{t-1},
    # v = (t + 1)^-0.5, keeps the new gradient's sign throughout: +10; -4.14; +4.02; -2.99; +2.82.
    # t=0: eta 0.4, a = 1: z = P(0.5 + 0.4) = 0.7, x1 = 0.7, loss -1.8 (from -2.2 at the clean input): a rise; the
    #      mean-loss record rises from -inf: best 0.7. Checkpoint 1: no halving; restart from the best, 0.7.
    # t=1: z = P(0.7 - 0.4) = 0.3, x2 = 0.7 + 0.75 (0.3 - 0.7) + 0.25 (0.7 - 0.5) = 0.45 (the 0.25 term runs from the
    #      restart's start 0.5: the code never updates its x_adv_last), loss -2.7: no rise. Checkpoint 2: eta halves to
    #      0.2; back to the best, 0.7.
    # t=2: z = P(0.7 + 0.2) = 0.7, x3 = 0.7 + 0 + 0.25 (0.2) = 0.75 -> 0.7, loss -1.8: a rise (from -2.7); not above
    #      the record. Checkpoint 3: no halving (a rise; the step changed at the last checkpoint); back to 0.7.
    # t=3: z = P(0.7 - 0.2) = 0.5, x4 = 0.7 - 0.15 + 0.05 = 0.6, loss -1.2: a rise and a new record, best 0.6.
    #      Checkpoint 4: no halving (a rise; -1.2 differs from -1.8); back to 0.6.
    # t=4: z = P(0.6 + 0.2) = 0.7, x5 = 0.6 + 0.075 + 0.25 (0.1) = 0.7, loss -1.8. Returned: the best, 0.6.
    attack = aa.DiffHammer(Peak(), eps=0.2, steps=5, restarts=1, loss="margin", random_start=False)
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    x_adv, seen = _iterates(attack, x, y)
    torch.testing.assert_close(torch.stack([v.flatten() for v, _ in seen]).flatten(),
                               torch.tensor([0.5, 0.7, 0.45, 0.7, 0.6, 0.7]))
    torch.testing.assert_close(x_adv.flatten(), torch.tensor([0.6]))
    # Without the halving at checkpoint 2, x4 would be 0.7 + 0.75 (0.3 - 0.7) + 0.05 = 0.45; with a momentum from the
    # previous iterate (0.7 after the restart to the best), 0.55.


def test_reference_restarts_only_inputs_at_most_half_broken_and_stops_when_all_are_broken():
    # Input 0 (class 0) is never broken; input 1 (labelled 1, classified 0) is broken in every draw from the start,
    # so after restart 0 (CW) only input 0 is restarted, with CE, then DLR.
    x, y = torch.full((2, 1, 1, 1), 0.5), torch.tensor([0, 1])
    attack = aa.DiffHammer(Peak(), eps=0.2, steps=2, random_start=False)
    losses = []
    original = attack._weighted_direction
    attack._weighted_direction = lambda x_i, y_i, loss_fn: losses.append(loss_fn.__name__) or original(x_i, y_i,
                                                                                                        loss_fn)
    _, seen = _iterates(attack, x, y)
    rows = [None if index is None else index.tolist() for _, index in seen]
    assert rows == [None, [0, 1], [0, 1], [0], [0], [0], [0]]  # the clean input, then 2 iterates per restart
    # per restart: the clean input's draws, then one evaluation per iterate
    assert losses == ["margin_loss"] * 3 + ["ce_loss"] * 3 + ["dlr_loss"] * 3
    # Every draw of every input broken at the clean input: no step, no restart; the best is the start.
    x_adv, seen = _iterates(attack, x[1:], y[1:])
    assert len(seen) == 1 and torch.equal(x_adv, x[1:])


def test_reference_breaks_the_purifications_eot_averaging_cancels():
    defended = PurifiedClassifier(ToyPurifier(ShiftUpOrDown(), gradient="exact", seed=0, device_type="cpu"), MidGray())
    x = 0.5 + 0.02 * torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.ones(16, dtype=torch.long)
    result = aa.DiffHammer(defended, eps=0.1, steps=10, eot=4, iterate_draws=10).perturb(x, y)
    assert aa.all_draws(defended, result.x_adv, y, 10).max() == 0  # every input broken in one of 10 draws at least
    assert aa.all_draws_all_iterates(result.broken_fraction).max() == 0


# --------------------------------------------------------------------------------------------------------------------
# The E-step
# --------------------------------------------------------------------------------------------------------------------

def test_e_step_weights_by_hand():
    # Three copies of one input, eps 0.1, l_inf, all at loss -0.1: copies 0 and 1 break by brightening, copy 2 by
    # darkening. Selection: sum_b elu(l_b + eps <sign(g_a), g_b>) is 0.1 + 0.05 + (e^-0.3 - 1) for a = 0 and 1,
    # (e^-0.3 - 1) + (e^-0.25 - 1) + 0.1 for a = 2, so r = g_0 (first of the tie).
    grads = torch.tensor([[[1.0, 1.0], [1.0, 0.5], [-1.0, -1.0]]])
    losses = torch.full((1, 3), -0.1)

    def normalised(*z):
        w = [1 / (1 + math.exp(-v)) for v in z]
        return torch.tensor([[v / sum(w) for v in w]])

    # The reference's E-step: w_j = sigmoid(5 (l_j + <sign(g_0), g_j>)), gains 2, 1.5, -2 without eps; its rounds
    # recompute the same weights (r stays g_0).
    reference = aa.DiffHammer(tiny_classifier(), eps=0.1, em_steps=3)
    torch.testing.assert_close(reference.e_step(grads, losses), normalised(5 * 1.9, 5 * 1.4, 5 * -2.1))
    # iterated_em's first round: the gain scaled by eps.
    first = normalised(5 * 0.1, 5 * 0.05, 5 * -0.3)
    iterated = aa.DiffHammer(tiny_classifier(), eps=0.1, variant="iterated_em", em_steps=1)
    torch.testing.assert_close(iterated.e_step(grads, losses), first)
    # Its second round starts from r = sum_j w_j g_j, whose sign is (+, +): the same gains, the same weights.
    iterated.set_params(em_steps=2)
    torch.testing.assert_close(iterated.e_step(grads, losses), first)
    # Every copy alike: equal weights. Every sigmoid underflowing: still finite, normalised weights.
    same = grads[:, :1].expand(1, 4, 2)
    torch.testing.assert_close(iterated.e_step(same, torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    far = iterated.e_step(grads, torch.tensor([[-500.0, -400.0, -600.0]]))
    assert torch.isfinite(far).all() and far.sum().item() == pytest.approx(1.0) and far.argmax() == 1


def test_grafting_pulls_the_output_gradient_back_through_the_same_purification():
    # With the noise replayed, J^T (dL/dphi) is the exact input gradient of that purification.
    classifier = tiny_classifier(dtype=torch.float64)
    purifier = ToyPurifier(NoisyDenoise(GaussianPrior(0.5, 0.3), 0.1), gradient="exact", seed=3, device_type="cpu")
    model = DefendedModel(classifier, purifier)
    x, y = toy_images(3, low=0.2, high=0.8).double(), torch.tensor([1, 5, 9])
    purifier.reset_generator()
    exact, _, _ = model.loss_gradient(x, y, ce_loss, 1)
    purifier.reset_generator()
    purified = purifier.purify(x, False).requires_grad_(True)
    (output_grad,) = torch.autograd.grad(ce_loss(classifier(purified), y).sum(), purified)
    purifier.reset_generator()
    torch.testing.assert_close(model.purifier_vjp(x, output_grad), exact)
    torch.testing.assert_close(model.purifier_vjp(x, output_grad, gradient="bpda"), output_grad)


def test_per_copy_gradients_average_to_the_eot_gradient():
    defended = toy_defended(sigma=0.1, seed=2)
    model = DefendedModel.from_target(defended)
    x, y = toy_images(3), torch.tensor([0, 1, 2])
    defended.purifier.reset_generator()
    grad, loss, probs = model.loss_gradient(x, y, ce_loss, 5, max_rows=4)  # copies split over chunks
    defended.purifier.reset_generator()
    grads, losses, copy_probs = model.loss_gradient(x, y, ce_loss, 5, reduce="none", max_rows=4)
    assert grads.shape == (3, 5, 1, 8, 8) and losses.shape == (3, 5) and copy_probs.shape == (3, 5, 10)
    torch.testing.assert_close(grads.mean(1), grad)
    torch.testing.assert_close(losses.mean(1), loss)
    torch.testing.assert_close(copy_probs.mean(1), probs)
    assert (grads[:, 0] - grads[:, 1]).abs().max() > 0  # the copies differ
    with pytest.raises(ValueError, match="reduce"):
        model.loss_gradient(x, y, ce_loss, 2, reduce="median")


# --------------------------------------------------------------------------------------------------------------------
# The iterated_em reading
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grafting", [True, False])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_iterated_em_through_a_deterministic_identity_purifier_is_pgd(grafting, norm, eps):
    # Every purification is the same: equal weights, the M-step gradient is EOT's, grafting pulls back by J = I. Without
    # the accumulation (em_alpha=0) and the best-iterate choice the iterates are PGD+EOT's.
    classifier = tiny_classifier()
    x = toy_images(8, low=0.2, high=0.8)
    y = clean_labels(classifier, x)
    defended = PurifiedClassifier(ToyPurifier(Identity(), gradient="exact", device_type="cpu"), classifier)
    pgd, pgd_iterates = _iterates(aa.PGDEOT(defended, eps=eps, norm=norm, steps=6, eot=3, step=eps / 4), x, y)
    hammer, hammer_iterates = _iterates(
        aa.DiffHammer(defended, eps=eps, norm=norm, steps=6, eot=3, step=eps / 4, loss="ce", grafting=grafting,
                      variant="iterated_em", em_alpha=0.0, keep_best=False), x, y)
    assert len(hammer_iterates) == len(pgd_iterates) == 7  # the start and 6 steps
    for (ours, _), (theirs, _) in zip(hammer_iterates, pgd_iterates):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(hammer, pgd)
    assert (pgd - x).abs().max() > 0


def test_iterated_em_at_least_as_strong_as_pgd_eot_at_equal_queries_on_a_tiny_prior():
    defended = tiny_prior_defended()
    model = DefendedModel.from_target(defended)
    x = toy_images(8, low=0.2, high=0.8, seed=4)
    y = clean_labels(defended.classifier, x)
    settings = dict(eps=0.05, steps=8, eot=4)
    iterated = dict(variant="iterated_em", **settings)
    attacks = {"pgd": aa.PGDEOT(defended, **settings),
               # the same purifications and full gradients per iteration as PGD+EOT
               "equal": aa.DiffHammer(defended, grafting=False, keep_best=False, **iterated),
               # PGD+EOT's loss (CE) rather than the margin, so the selection alone makes the difference
               "equal-ce": aa.DiffHammer(defended, grafting=False, keep_best=False, loss="ce", **iterated),
               # one full gradient per iteration (grafting) and the best iterate
               "grafted": aa.DiffHammer(defended, **iterated)}
    acc, cost = {}, {}
    for name, attack in attacks.items():
        defended.purifier.reset_generator()
        with model.count() as meter:
            x_adv = attack(x, y)
        cost[name] = (meter.prior_forward, meter.prior_backward)
        defended.purifier.reset_generator()
        acc[name] = (aa.multi_draw(defended, x_adv, y, draws=32).mean().item(),
                     aa.all_draws(defended, x_adv, y, 10).mean().item())
    assert cost["equal"] == cost["pgd"] == (8 * 4 * 8, 8 * 4 * 8)  # 8 images x 4 copies x 8 iterations
    assert cost["grafted"][1] == 8 * 8  # one backward through the purifier per image and iteration
    defended.purifier.reset_generator()
    assert aa.multi_draw(defended, x, y, draws=32).mean().item() > acc["pgd"][0] + 0.2, acc  # PGD+EOT does something
    for name in ("equal", "equal-ce", "grafted"):
        assert acc[name][0] <= acc["pgd"][0] and acc[name][1] <= acc["pgd"][1], acc


@pytest.mark.parametrize("grafting", [True, False])
def test_iterated_em_breaks_the_purifications_eot_averaging_cancels(grafting):
    # Half the purifications break when the image brightens, half when it darkens: the EOT average of their gradients
    # points nowhere in particular, DiffHammer picks one population and breaks it (same loss, same queries).
    defended = PurifiedClassifier(ToyPurifier(ShiftUpOrDown(), gradient="exact", seed=0, device_type="cpu"), MidGray())
    x = 0.5 + 0.02 * torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.ones(16, dtype=torch.long)
    settings = dict(eps=0.1, steps=10, eot=4, loss="margin")
    assert aa.multi_draw(defended, x, y, draws=32).min() == 1
    pgd = aa.PGDEOT(defended, **settings)(x, y)
    hammer = aa.DiffHammer(defended, grafting=grafting, keep_best=False, variant="iterated_em", **settings)(x, y)
    acc = {name: (aa.multi_draw(defended, v, y, draws=32).mean().item(),
                  aa.all_draws(defended, v, y, 10).mean().item()) for name, v in (("pgd", pgd), ("dh", hammer))}
    assert acc["dh"][0] < acc["pgd"][0] - 0.15, acc
    assert acc["dh"][1] == 0 and acc["pgd"][1] >= 0.25, acc  # every input broken in one of 10 draws at least
    assert 0.3 < acc["dh"][0] < 0.7, acc  # one population of the two broken, not both


def test_iterated_em_keep_best_returns_an_iterate_at_least_as_broken_and_undefended_models_break():
    classifier = tiny_classifier()
    x = toy_images(8, low=0.3, high=0.7)
    y = clean_labels(classifier, x)
    x_adv = aa.DiffHammer(classifier, eps=0.3, steps=10, eot=3, variant="iterated_em", random_start=True,
                          seed=1)(x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert aa.single_shot(classifier, x_adv, y).max() == 0
    result = aa.DiffHammer(classifier, eps=0.05, steps=6, variant="iterated_em", track_iterates=True).perturb(x, y)
    # The best iterate is misclassified wherever any iterate was (one deterministic copy per iterate).
    assert torch.equal(aa.single_shot(classifier, result.x_adv, y) == 0, result.broken)


# --------------------------------------------------------------------------------------------------------------------
# Both variants
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["bpda", "exact", "adjoint", "surrogate"])
def test_runs_through_every_gradient_mode_of_diffpure(prior32, mode):
    purifier = DiffPurePyTorch(prior32, t_star=0.01, dt=2.5e-3, gradient=mode, surrogate_steps=2, seed=0)
    defended = PurifiedClassifier(purifier, tiny_classifier())
    x = toy_images(2, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    for variant in ("reference", "iterated_em"):
        attack = aa.DiffHammer(defended, eps=0.05, steps=2, eot=2, variant=variant, random_start=True)
        x_adv = attack(x, y)
        assert torch.isfinite(x_adv).all() and 0 < (x_adv - x).abs().max() <= 0.05 + 1e-6
        assert attack.describe()["gradient"] == (mode if mode == "bpda" else f"{mode}, grafted")
        assert purifier.gradient == mode  # the E-step's bpda pass leaves the purifier's mode as it was


def test_settings_and_bad_input():
    defended = toy_defended()
    described = aa.DiffHammer(defended, eps=0.1).describe()
    assert described["attack"] == "DiffHammer" and described["eot"] == 10 and described["iterations"] == 50
    assert described["gradient"] == "exact, grafted"
    iterated = aa.DiffHammer(defended, eps=0.1, variant="iterated_em").describe()
    assert (iterated["iterations"], iterated["restarts"], iterated["loss"], iterated["random_start"]) == \
        (100, 1, "margin", False)
    assert iterated["step"] == pytest.approx(0.007 * 0.1 / (8 / 255))
    assert aa.DiffHammer(defended, eps=0.1, grafting=False).describe()["gradient"] == "exact"
    assert aa.DiffHammer(tiny_classifier(), eps=0.1).describe()["gradient"] == "none"
    for kwargs, match in ((dict(variant="paper"), "variant"), (dict(eot=0), "eot"), (dict(em_lam=0), "em_lam"),
                          (dict(em_alpha=-1), "em_alpha"), (dict(em_steps=0), "em_steps"), (dict(loss="l1"), "loss"),
                          (dict(loss=()), "loss"), (dict(restarts=0), "restarts"),
                          (dict(restart_threshold=2), "restart_threshold"), (dict(step=0.01), "APGD"),
                          (dict(keep_best=False), "best iterate"), (dict(variant="iterated_em", restarts=2), "one"),
                          (dict(variant="iterated_em", loss=("ce", "dlr")), "one"), (dict(grafting=1), "grafting"),
                          (dict(gradient="adjoint"), "gradient mode")):
        with pytest.raises(ValueError, match=match):
            aa.DiffHammer(defended, eps=0.1, **kwargs)
