"""DiffHammer (attacks_adaptive.diffhammer) and the N-evaluation protocol (attacks_adaptive.scoring).

Against independent facts: PGD+EOT on a deterministic purifier (where the selection has nothing to select), PGD+EOT at
equal purifications and gradients on a tiny prior, a toy "gradient dilemma" (half the purifications need the opposite
step of the other half), hand-computed E-step weights, hand-made per-draw correctness tables for every scoring
protocol, and autograd for the grafted pull-back.
"""

import math

import pytest
import torch
from test_attacks import (BlankWithProbability, Brightness, Identity, NoisyDenoise, ToyPurifier, clean_labels,
                          tiny_classifier, tiny_prior_defended, toy_defended, toy_images)
from torch import nn

import attacks_adaptive as aa
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.losses import ce_loss
from attacks_adaptive.scoring import (correct_draws, multi_draw_from_draws, n_evaluation_from_draws,
                                      single_shot_from_draws)
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


def _iterates(attack, x, y):
    """The attack's result and the iterates it visited (recorded where the any-iteration tracker looks)."""
    seen = []
    original = attack._note_iterate
    attack._note_iterate = lambda x_i: seen.append(x_i.clone()) or original(x_i)
    return attack(x, y), seen


# --------------------------------------------------------------------------------------------------------------------
# DiffHammer
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grafting", [True, False])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_through_a_deterministic_identity_purifier_it_is_pgd(grafting, norm, eps):
    # Every purification is the same: equal weights, the M-step gradient is EOT's, grafting pulls back by J = I. Without
    # the accumulation (em_alpha=0) and the best-iterate choice the iterates are PGD+EOT's.
    classifier = tiny_classifier()
    x = toy_images(8, low=0.2, high=0.8)
    y = clean_labels(classifier, x)
    defended = PurifiedClassifier(ToyPurifier(Identity(), gradient="exact", device_type="cpu"), classifier)
    pgd, pgd_iterates = _iterates(aa.PGDEOT(defended, eps=eps, norm=norm, steps=6, eot=3, step=eps / 4), x, y)
    hammer, hammer_iterates = _iterates(
        aa.DiffHammer(defended, eps=eps, norm=norm, steps=6, eot=3, step=eps / 4, loss="ce", grafting=grafting,
                      em_alpha=0.0, keep_best=False), x, y)
    assert len(hammer_iterates) == len(pgd_iterates) == 7  # the start and 6 steps
    for ours, theirs in zip(hammer_iterates, pgd_iterates):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(hammer, pgd)
    assert (pgd - x).abs().max() > 0


def test_at_least_as_strong_as_pgd_eot_at_equal_queries_on_a_tiny_prior():
    defended = tiny_prior_defended()
    model = DefendedModel.from_target(defended)
    x = toy_images(8, low=0.2, high=0.8, seed=4)
    y = clean_labels(defended.classifier, x)
    settings = dict(eps=0.05, steps=8, eot=4)
    attacks = {"pgd": aa.PGDEOT(defended, **settings),
               # the same purifications and full gradients per iteration as PGD+EOT
               "equal": aa.DiffHammer(defended, grafting=False, keep_best=False, **settings),
               # PGD+EOT's loss (CE) rather than the margin, so the selection alone makes the difference
               "equal-ce": aa.DiffHammer(defended, grafting=False, keep_best=False, loss="ce", **settings),
               # the defaults: one full gradient per iteration (grafting) and the best iterate
               "default": aa.DiffHammer(defended, **settings)}
    acc, cost = {}, {}
    for name, attack in attacks.items():
        defended.purifier.reset_generator()
        with model.count() as meter:
            x_adv = attack(x, y)
        cost[name] = (meter.prior_forward, meter.prior_backward)
        defended.purifier.reset_generator()
        acc[name] = (aa.multi_draw(defended, x_adv, y, draws=32).mean().item(),
                     aa.n_evaluation(defended, x_adv, y, 10).mean().item())
    assert cost["equal"] == cost["pgd"] == (8 * 4 * 8, 8 * 4 * 8)  # 8 images x 4 copies x 8 iterations
    assert cost["default"][1] == 8 * 8  # one backward through the purifier per image and iteration
    defended.purifier.reset_generator()
    assert aa.multi_draw(defended, x, y, draws=32).mean().item() > acc["pgd"][0] + 0.2, acc  # PGD+EOT does something
    for name in ("equal", "equal-ce", "default"):
        assert acc[name][0] <= acc["pgd"][0] and acc[name][1] <= acc["pgd"][1], acc


@pytest.mark.parametrize("grafting", [True, False])
def test_it_breaks_the_purifications_eot_averaging_cancels(grafting):
    # Half the purifications break when the image brightens, half when it darkens: the EOT average of their gradients
    # points nowhere in particular, DiffHammer picks one population and breaks it (same loss, same queries).
    defended = PurifiedClassifier(ToyPurifier(ShiftUpOrDown(), gradient="exact", seed=0, device_type="cpu"), MidGray())
    x = 0.5 + 0.02 * torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.ones(16, dtype=torch.long)
    settings = dict(eps=0.1, steps=10, eot=4, loss="margin")
    assert aa.multi_draw(defended, x, y, draws=32).min() == 1
    pgd = aa.PGDEOT(defended, **settings)(x, y)
    hammer = aa.DiffHammer(defended, grafting=grafting, keep_best=False, **settings)(x, y)
    acc = {name: (aa.multi_draw(defended, v, y, draws=32).mean().item(),
                  aa.n_evaluation(defended, v, y, 10).mean().item()) for name, v in (("pgd", pgd), ("dh", hammer))}
    assert acc["dh"][0] < acc["pgd"][0] - 0.15, acc
    assert acc["dh"][1] == 0 and acc["pgd"][1] >= 0.25, acc  # every input broken under N-evaluation
    assert 0.3 < acc["dh"][0] < 0.7, acc  # one population of the two broken, not both


def test_e_step_weights_by_hand():
    # Three copies of one input, eps 0.1, l_inf, all at loss -0.1: copies 0 and 1 break by brightening, copy 2 by
    # darkening. Selection: sum_b elu(l_b + eps <sign(g_a), g_b>) is 0.1 + 0.05 + (e^-0.3 - 1) for a = 0 and 1,
    # (e^-0.3 - 1) + (e^-0.25 - 1) + 0.1 for a = 2, so r = g_0 (first of the tie).
    grads = torch.tensor([[[1.0, 1.0], [1.0, 0.5], [-1.0, -1.0]]])
    losses = torch.full((1, 3), -0.1)
    target = aa.DiffHammer(tiny_classifier(), eps=0.1)

    def normalised(*z):
        w = [1 / (1 + math.exp(-v)) for v in z]
        return torch.tensor([[v / sum(w) for v in w]])

    # Code's E-step: w_j = sigmoid(5 (l_j + <sign(g_0), g_j>)), gains 2, 1.5, -2, the same in every round.
    target.set_params(variant="code", em_steps=3)
    torch.testing.assert_close(target.e_step(grads, losses), normalised(5 * 1.9, 5 * 1.4, 5 * -2.1))
    # Paper's first E-step: the gain scaled by eps.
    target.set_params(variant="paper", em_steps=1)
    first = normalised(5 * 0.1, 5 * 0.05, 5 * -0.3)
    torch.testing.assert_close(target.e_step(grads, losses), first)
    # Its second round starts from r = sum_j w_j g_j, whose sign is (+, +): the same gains, the same weights.
    target.set_params(em_steps=2)
    torch.testing.assert_close(target.e_step(grads, losses), first)
    # Every copy alike: equal weights. Every sigmoid underflowing: still finite, normalised weights.
    same = grads[:, :1].expand(1, 4, 2)
    torch.testing.assert_close(target.e_step(same, torch.zeros(1, 4)), torch.full((1, 4), 0.25))
    far = target.e_step(grads, torch.tensor([[-500.0, -400.0, -600.0]]))
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


@pytest.mark.parametrize("mode", ["bpda", "exact", "adjoint", "surrogate"])
def test_runs_through_every_gradient_mode_of_diffpure(prior32, mode):
    purifier = DiffPurePyTorch(prior32, t_star=0.01, dt=2.5e-3, gradient=mode, surrogate_steps=2, seed=0)
    defended = PurifiedClassifier(purifier, tiny_classifier())
    x = toy_images(2, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    attack = aa.DiffHammer(defended, eps=0.05, steps=2, eot=2)
    x_adv = attack(x, y)
    assert torch.isfinite(x_adv).all() and 0 < (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert attack.describe()["gradient"] == (mode if mode == "bpda" else f"{mode}, grafted")
    assert purifier.gradient == mode  # the E-step's bpda pass leaves the purifier's mode as it was


def test_settings_and_bad_input():
    defended = toy_defended()
    described = aa.DiffHammer(defended, eps=0.1).describe()
    assert described["attack"] == "DiffHammer" and described["eot"] == 10 and described["iterations"] == 100
    assert described["gradient"] == "exact, grafted" and described["variant"] == "paper"
    assert aa.DiffHammer(defended, eps=0.1, grafting=False).describe()["gradient"] == "exact"
    assert aa.DiffHammer(tiny_classifier(), eps=0.1).describe()["gradient"] == "none"
    for kwargs, match in ((dict(variant="mine"), "variant"), (dict(eot=0), "eot"), (dict(em_lam=0), "em_lam"),
                          (dict(em_alpha=-1), "em_alpha"), (dict(em_steps=0), "em_steps"), (dict(loss="l1"), "loss"),
                          (dict(grafting=1), "grafting"), (dict(gradient="adjoint"), "gradient mode")):
        with pytest.raises(ValueError, match=match):
            aa.DiffHammer(defended, eps=0.1, **kwargs)


def test_keep_best_returns_an_iterate_at_least_as_broken_and_undefended_models_break():
    classifier = tiny_classifier()
    x = toy_images(8, low=0.3, high=0.7)
    y = clean_labels(classifier, x)
    x_adv = aa.DiffHammer(classifier, eps=0.3, steps=10, eot=3, random_start=True, seed=1)(x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert aa.single_shot(classifier, x_adv, y).max() == 0
    result = aa.DiffHammer(classifier, eps=0.05, steps=6, track_iterates=True).perturb(x, y)
    # The best iterate is misclassified wherever any iterate was (one deterministic copy per iterate).
    assert torch.equal(aa.single_shot(classifier, result.x_adv, y) == 0, result.broken)


# --------------------------------------------------------------------------------------------------------------------
# Scoring protocols on hand-made draw tables
# --------------------------------------------------------------------------------------------------------------------

# Per-draw correctness of 4 examples over 3 draws (rows: draws).
TABLE = torch.tensor([[1, 1, 0, 1],
                      [1, 0, 0, 1],
                      [1, 1, 0, 0]], dtype=torch.bool)


def test_scorings_of_a_hand_made_draw_table():
    torch.testing.assert_close(single_shot_from_draws(TABLE), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(multi_draw_from_draws(TABLE), torch.tensor([1.0, 2 / 3, 0.0, 2 / 3]))
    torch.testing.assert_close(n_evaluation_from_draws(TABLE), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(n_evaluation_from_draws(TABLE[:1]), single_shot_from_draws(TABLE))  # N = 1
    torch.testing.assert_close(n_evaluation_from_draws(TABLE[:2]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # any-iteration: the attack's iterates broke example 1 on the way; the final example is the table's first draw.
    broken = torch.tensor([False, True, False, False])
    torch.testing.assert_close(aa.any_iteration(broken, single_shot_from_draws(TABLE)),
                               torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="draw table"):
        n_evaluation_from_draws(torch.ones(4, dtype=torch.bool))


def test_n_evaluation_with_one_resubmission_is_single_shot():
    defended = PurifiedClassifier(ToyPurifier(BlankWithProbability(0.3), seed=0, device_type="cpu"), Brightness())
    x, y = torch.full((200, 1, 4, 4), 0.8), torch.ones(200, dtype=torch.long)
    defended.purifier.reset_generator()
    once = aa.n_evaluation(defended, x, y, n=1)
    defended.purifier.reset_generator()
    torch.testing.assert_close(once, aa.single_shot(defended, x, y))
    assert 0 < once.mean() < 1
    # n resubmissions: all n draws of the same table correct; each draw is correct with probability 0.7.
    defended.purifier.reset_generator()
    table = correct_draws(defended, x, y, 3)
    defended.purifier.reset_generator()
    torch.testing.assert_close(aa.n_evaluation(defended, x, y, n=3), table.all(0).float())
    assert abs(aa.n_evaluation(defended, x, y, n=3).mean().item() - 0.7 ** 3) < 0.12  # std 0.034
    assert aa.n_evaluation(Brightness(), x, y, n=10).eq(1).all()  # deterministic: every resubmission agrees
    with pytest.raises(ValueError, match="n must be"):
        aa.n_evaluation(defended, x, y, n=0)


def test_runner_reports_n_evaluation_for_every_attack_and_keys_its_state_by_n(tmp_path):
    defended = toy_defended()
    x = toy_images(6, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    out = str(tmp_path / "state")

    def attacks():
        return [aa.BPDAEOT(defended, eps=0.05, steps=2, eot=2), aa.DiffHammer(defended, eps=0.05, steps=2, eot=2)]

    report = aa.run_worst_case(attacks(), x, y, state_dir=out, defense="toy", draws=3, n_eval=4, batch_size=3,
                               verbose=False)
    rows = [r for r in report["rows"] if r["scoring"] == "n_evaluation"]
    assert [r["attack"] for r in rows] == ["BPDA+EOT", "DiffHammer", "worst-case(BPDA+EOT, DiffHammer)"]
    assert all(r["n_eval"] == 4 and r["draws"] == 4 for r in rows)
    assert rows[2]["robust_acc"] <= min(rows[0]["robust_acc"], rows[1]["robust_acc"]) + 1e-12
    with pytest.raises(ValueError, match="other settings"):  # another N is another setting, never mixed in
        aa.run_worst_case(attacks(), x, y, state_dir=out, defense="toy", draws=3, n_eval=5, batch_size=3, verbose=False)
    with pytest.raises(ValueError, match="n_eval"):
        aa.run_worst_case(attacks(), x, y, state_dir=out, defense="toy", n_eval=0, verbose=False)
