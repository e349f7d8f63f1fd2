"""Square+EOT (attacks_adaptive.square_eot) against independent facts: pyautoattack's own ``p_selection`` and ``eta``,
the margin bound of a linear classifier computed by hand, and a toy randomized model whose per-draw outputs the test
sets, so that following one draw and following the EOT mean lead to opposite answers."""

import pytest
import torch
from pyautoattack.square import SquareAttack
from tiny import SIZE, images, linear_classifier
from torch import nn

from attacks_adaptive import SquareEOT
from attacks_adaptive.losses import margin_loss
from attacks_adaptive.square_eot import p_selection, square_pattern
from purifiers import PurifiedClassifier, PurifierPyTorch

torch.set_num_threads(1)


def setup():
    classifier = linear_classifier()
    x = images(8, dtype=torch.float32)  # in [0.3, 0.7]: an l_inf step of 0.3 never leaves the [0, 1] box
    with torch.no_grad():
        y = classifier(x).argmax(1)
    return classifier, x, y


def smallest_flipping_eps(classifier, x, y, norm):
    """Per input, the smallest perturbation of the given norm that can flip the linear model (box ignored):
    ``min_k (z_y - z_k) / ||w_y - w_k||_*`` with the dual norm (``l_1`` for ``l_inf``, ``l_2`` for ``l_2``)."""
    weight = classifier[1].weight.detach()
    with torch.no_grad():
        z = classifier(x)
    margins = z.gather(1, y[:, None]) - z
    dual = (weight[y][:, None, :] - weight[None]).norm(p=1 if norm == "linf" else 2, dim=2)
    return torch.where(margins > 0, margins / dual.clamp_min(1e-12), torch.full_like(margins, torch.inf)).min(1).values


def distance(x_adv, x, norm):
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def test_schedule_and_l2_pattern_equal_autoattacks():
    reference = SquareAttack(None, norm="L2", eps=1.0, device="cpu")
    for steps in (7, 100, 5000):
        reference.n_queries = steps
        assert [p_selection(0.8, i, steps) for i in range(steps)] == [reference.p_selection(i) for i in range(steps)]
    torch.manual_seed(0)
    for side in (1, 2, 3, 5, 8, 11):
        eta = reference.eta(side).double()  # transposed at random
        assert any(torch.allclose(e, square_pattern(side), atol=1e-6) for e in (eta, eta.T))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_accepted_query_raises_the_loss_and_stays_in_the_ball(norm):
    classifier, x, y = setup()
    eps = 0.5 * smallest_flipping_eps(classifier, x, y, norm).min().item()  # no input breaks, so none stops
    attack = SquareEOT(classifier, eps=eps, norm=norm, steps=60, eot=1)
    accepted = [[] for _ in range(x.shape[0])]
    note = attack._note_iterate

    def record(x_i, index=None):
        rows = range(x.shape[0]) if index is None else index.tolist()
        for row, point in zip(rows, x_i):
            accepted[row].append(point.clone())
        note(x_i, index)

    attack._note_iterate = record
    x_adv = attack(x, y)
    for row, points in enumerate(accepted):
        assert len(points) >= 3, "the clean input, the start and at least one improving candidate"
        points = torch.stack(points)
        with torch.no_grad():
            losses = margin_loss(classifier(points[1:]), y[row].repeat(len(points) - 1))
        assert (losses.diff() > 0).all()  # after the clean input: strictly increasing
        assert (distance(points, x[row:row + 1].expand_as(points), norm) <= eps + 1e-5).all()
        assert points.min() >= 0 and points.max() <= 1
        torch.testing.assert_close(x_adv[row], points[-1])


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_a_budget_above_the_margin_bound_breaks_every_input_and_stops_early(norm, eps):
    classifier, x, y = setup()
    assert (smallest_flipping_eps(classifier, x, y, norm) < eps / 1.5).all()  # the bound leaves room to find it
    rows, steps = [], 300
    handle = classifier.register_forward_hook(lambda module, inputs, out: rows.append(out.shape[0]))
    x_adv = SquareEOT(classifier, eps=eps, norm=norm, steps=steps, eot=4)(x, y)
    handle.remove()
    with torch.no_grad():
        assert (classifier(x_adv).argmax(1) != y).all()
    assert (distance(x_adv, x, norm) <= eps + 1e-5).all()
    assert sum(rows) < steps * x.shape[0]  # broken inputs are no longer queried; a deterministic model: one pass
    assert max(rows) <= x.shape[0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_a_budget_below_the_margin_bound_leaves_every_input_correct(norm):
    classifier, x, y = setup()
    eps = 0.5 * smallest_flipping_eps(classifier, x, y, norm).min().item()
    x_adv = SquareEOT(classifier, eps=eps, norm=norm, steps=100, eot=1)(x, y)
    assert (distance(x_adv, x, norm) <= eps + 1e-6).all() and (x_adv != x).any()
    with torch.no_grad():
        assert (classifier(x_adv).argmax(1) == y).all()


# --------------------------------------------------------------------------------------------------------------------
# A toy randomized model: an identity purifier and a classifier whose k-th row of each call is "draw" k mod len(slopes)
# --------------------------------------------------------------------------------------------------------------------

class Identity(nn.Module):
    def forward(self, x, generator=None):
        return x


class Draws(nn.Module):
    """Two classes; draw ``j`` scores class 1 at ``offsets[j] + slopes[j] * s(x)``, ``s(x) = sum(x - 0.5)``, class 0
    at 0: with label 0 the margin loss of draw ``j`` is that score."""

    def __init__(self, offsets, slopes):
        super().__init__()
        self.offsets, self.slopes = torch.tensor(offsets), torch.tensor(slopes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        draw = torch.arange(x.shape[0]) % len(self.offsets)
        score = self.offsets[draw] + self.slopes[draw] * (x - 0.5).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(score), score], 1)


def toy(offsets, slopes):
    purifier = PurifierPyTorch(Identity(), device_type="cpu")
    return PurifiedClassifier(purifier, Draws(offsets, slopes))


def test_accepted_points_follow_the_eot_mean_not_one_draw():
    # Draw 0 gains from raising s(x), the three others lose five times as much: the mean margin is -100 - 1.25 s(x).
    offsets, slopes = [-100.0, -100.0, -100.0, -100.0], [10.0, -5.0, -5.0, -5.0]
    x, y = torch.full((1, 1, SIZE, SIZE), 0.5), torch.tensor([0])
    mean = SquareEOT(toy(offsets, slopes), eps=0.1, steps=40, eot=4, track_iterates=True, iterate_draws=2)
    one_draw = SquareEOT(toy(offsets, slopes), eps=0.1, steps=40, eot=1)  # every query sees draw 0 only
    s_mean, s_one = ((attack(x, y) - 0.5).sum().item() for attack in (mean, one_draw))
    assert s_mean < -2.0 and s_one > 2.0
    result = mean.perturb(x, y)
    assert result.broken.tolist() == [False] and result.broken_fraction.tolist() == [0.0]


@pytest.mark.parametrize("wrong_draws,queries", [(1, 25), (3, 1)])
def test_an_input_stops_once_the_eot_mean_prediction_is_wrong(wrong_draws, queries):
    # One wrong draw of four (mean softmax still on the label): no stop; three of four: the first query stops it.
    offsets = [5.0] * wrong_draws + [-5.0] * (4 - wrong_draws)
    model = toy(offsets, [0.0] * 4)
    SquareEOT(model, eps=0.1, steps=25, eot=4)(torch.full((1, 1, SIZE, SIZE), 0.5), torch.tensor([0]))
    assert model.classifier.calls == queries


@pytest.mark.parametrize("query,images_per_query", [("deployed", 4 * 3), ("single", 4)])
def test_a_query_runs_the_ensemble_or_one_purification(query, images_per_query):
    # eot = 4 passes per query; a deployed pass of a 3-run ensemble classifies 3 purifications, a single pass 1.
    classifier = Draws([-5.0], [0.0])
    seen = []
    classifier.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    model = PurifiedClassifier(PurifierPyTorch(Identity(), device_type="cpu"), classifier, runs=3)
    SquareEOT(model, eps=0.1, steps=3, eot=4, query=query)(torch.full((1, 1, SIZE, SIZE), 0.5), torch.tensor([0]))
    assert sum(seen) == 3 * images_per_query
    with pytest.raises(ValueError, match="query"):
        SquareEOT(model, eps=0.1, query="ensemble")


def test_describe_and_bad_parameters():
    classifier, _, _ = setup()
    settings = SquareEOT(toy([0.0], [0.0]), eps=0.1, steps=30, eot=5, p_init=0.4).describe()
    assert {key: settings[key] for key in ("attack", "gradient", "eot", "iterations", "p_init", "loss")} == {
        "attack": "Square+EOT", "gradient": "none (black-box)", "eot": 5, "iterations": 30, "p_init": 0.4,
        "loss": "margin"}
    assert SquareEOT(classifier, eps=0.1, eot=5).describe()["eot"] == 1  # a deterministic model is queried once
    for bad, match in ((dict(eot=0), "eot"), (dict(p_init=0.0), "p_init"), (dict(p_init=1.5), "p_init"),
                       (dict(loss="hinge"), "loss"), (dict(steps=0), "steps"), (dict(norm="l1"), "norm"),
                       (dict(eps=-0.1), "eps")):
        with pytest.raises(ValueError, match=match):
            SquareEOT(classifier, **{"eps": 0.1, **bad})
