"""Scoring protocols (attacks_adaptive.scoring), their names in results rows, the attacks' iterate tracking and the
runner's wiring, against hand-made draw tables whose expected values are worked out in the comments."""

import pytest
import torch
from test_attacks import BlankWithProbability, Brightness, ToyPurifier, clean_labels, toy_defended, toy_images
from torch import nn

import attacks_adaptive as aa
from attacks_adaptive.base import Attack
from attacks_adaptive.rows import make_row
from attacks_adaptive.scoring import (ALL_SCORINGS, SCORINGS, all_draws_from_draws, broken_fraction_from_iterates,
                                      correct_draws, majority_vote_from_draws, multi_draw_from_draws, predicted_draws,
                                      score_batch, scoring_name, single_shot_from_draws)
from purifiers import GaussianPrior, PurifiedClassifier

torch.set_num_threads(1)

# Per-draw correctness of 4 examples over 3 draws (rows: draws).
TABLE = torch.tensor([[1, 1, 0, 1],
                      [1, 0, 0, 1],
                      [1, 1, 0, 0]], dtype=torch.bool)


def test_final_example_protocols_of_a_hand_made_draw_table():
    torch.testing.assert_close(single_shot_from_draws(TABLE), torch.tensor([1.0, 1.0, 0.0, 1.0]))  # the first row
    # Fractions of correct draws (Fixed-AutoAttack's flags): 3/3, 2/3, 0/3, 2/3.
    torch.testing.assert_close(multi_draw_from_draws(TABLE), torch.tensor([1.0, 2 / 3, 0.0, 2 / 3]))
    # All draws correct: only the first column.
    torch.testing.assert_close(all_draws_from_draws(TABLE), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(all_draws_from_draws(TABLE[:1]), single_shot_from_draws(TABLE))  # N = 1: single shot
    torch.testing.assert_close(all_draws_from_draws(TABLE[:2]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # any-iteration: the attack's iterates broke example 1 on the way; the final example is the table's first draw.
    broken = torch.tensor([False, True, False, False])
    torch.testing.assert_close(aa.any_iteration(broken, single_shot_from_draws(TABLE)),
                               torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="draw table"):
        all_draws_from_draws(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="track_iterates"):
        aa.any_iteration(None, single_shot_from_draws(TABLE))


def test_majority_vote_of_a_hand_made_label_table():
    # Predicted labels of 6 examples over 4 draws (rows: draws); the true labels are 0 but for the last (3).
    labels = torch.tensor([[0, 0, 0, 0, 1, 3],
                           [0, 0, 1, 0, 1, 1],
                           [0, 1, 2, 1, 1, 3],
                           [1, 1, 3, 2, 1, 2]])
    y = torch.tensor([0, 0, 0, 0, 0, 3])
    # Counts of the true label against the most frequent other label, per example:
    #   0: 3 vs 1 -> robust;  1: 2 vs 2, a tie -> broken;  2: 1 vs 1 (four labels once each), a tie -> broken;
    #   3: 2 vs 1 -> robust, a plurality though only half the draws (a strict majority of 4 would need 3);
    #   4: 0 vs 4 -> broken;  5: 2 vs 1 -> robust.
    torch.testing.assert_close(majority_vote_from_draws(labels, y), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]))
    # One draw: the vote is that draw's verdict.
    torch.testing.assert_close(majority_vote_from_draws(labels[:1], y), (labels[0] == y).float())


def test_diffhammers_two_metrics_of_a_hand_made_per_iterate_table():
    # Correctness of 3 examples at 3 iterates (the first is the clean input) over N = 4 draws: (iterates, draws, ex.).
    correct = torch.tensor([[[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]],    # iterate 0: 4/4, 4/4, 1/4 correct
                            [[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]],    # iterate 1: 4/4, 3/4, 4/4
                            [[1, 0, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]]],   # iterate 2: 4/4, 2/4, 3/4
                           dtype=torch.bool)
    # Largest misclassified fraction over the iterates: 0, max(0, 1/4, 2/4) = 1/2, max(3/4, 0, 1/4) = 3/4.
    fraction = broken_fraction_from_iterates(correct)
    torch.testing.assert_close(fraction, torch.tensor([0.0, 0.5, 0.75]))
    # Rob Wor: a point is broken if any draw at any iterate is misclassified: [1, 0, 0], mean 1/3.
    worst = aa.all_draws_all_iterates(fraction)
    torch.testing.assert_close(worst, torch.tensor([1.0, 0.0, 0.0]))
    assert worst.mean().item() == pytest.approx(1 / 3)
    # Rob Avg: 1 - mean of the largest fractions = 1 - (0 + 0.5 + 0.75) / 3 = 7/12.
    average = aa.min_fraction_over_iterates(fraction)
    torch.testing.assert_close(average, torch.tensor([1.0, 0.5, 0.25]))
    assert average.mean().item() == pytest.approx(7 / 12)
    for protocol in (aa.all_draws_all_iterates, aa.min_fraction_over_iterates):
        with pytest.raises(ValueError, match="iterate_draws"):
            protocol(None)


def test_rows_name_todays_scorings_and_read_former_names():
    assert SCORINGS == ("single_shot", "multi_draw", "majority_vote", "all_draws", "any_iteration")
    assert set(ALL_SCORINGS) - set(SCORINGS) == {"all_draws_all_iterates", "min_fraction_over_iterates"}
    assert scoring_name("n_evaluation") == "all_draws" and scoring_name("majority_vote") == "majority_vote"
    assert make_row(scoring="n_evaluation", robust_acc=0.5)["scoring"] == "all_draws"  # an old row, remade
    assert make_row(scoring=None)["scoring"] is None
    with pytest.raises(ValueError, match="scoring must be one of"):
        make_row(scoring="rob_wor")


class Scripted(nn.Module):
    """A purifier whose k-th call keeps or blanks each row as ``script[k]`` says (1 keep, 0 blank): with
    :class:`Brightness` and bright inputs of class 1, a kept row is classified correctly, a blank one is not."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls, self.prior = script, 0, GaussianPrior(0.5, 0.3)

    def forward(self, x, generator=None):
        keep = torch.tensor(self.script[self.calls], dtype=x.dtype).view(-1, 1, 1, 1)
        self.calls += 1
        return x * keep


class Visit(Attack):
    """Visits the input ``steps`` times, the last visit for the second input only (a restart on a subset)."""

    def _attack(self, x, y):
        for _ in range(self.steps - 1):
            self._note_iterate(x)
        self._note_iterate(x[1:], torch.tensor([1]))
        return x


def test_iterate_tracking_keeps_the_running_maxima_of_the_draws():
    # Two inputs, N = 2 draws, one call per iterate: rows are (draw 0: input 0, input 1, draw 1: input 0, input 1).
    script = [[1, 1, 1, 1],   # clean input: every draw correct
              [1, 0, 0, 0],   # iterate 1: input 0 broken in draw 1 (1/2), input 1 in both draws (2/2)
              [0, 1, 1, 1],   # iterate 2: input 0 broken in draw 0 (1/2)
              [1, 1]]         # iterate 3, input 1 only: both draws correct
    defended = PurifiedClassifier(ToyPurifier(Scripted(script), device_type="cpu"), Brightness())
    x, y = torch.full((2, 1, 4, 4), 0.8), torch.ones(2, dtype=torch.long)
    result = Visit(defended, eps=0.1, steps=3, track_iterates=True, iterate_draws=2).perturb(x, y)
    assert defended.purifier.algorithm.calls == 4
    # Largest misclassified fraction: input 0 max(0, 1/2, 1/2) = 1/2, input 1 max(0, 1, 0) = 1.
    torch.testing.assert_close(result.broken_fraction, torch.tensor([0.5, 1.0]))
    # One pass per iterate (the first draw of the table): input 0 broken at iterate 2, input 1 at iterate 1.
    assert result.broken.tolist() == [True, True]
    untracked = Visit(defended, eps=0.1, steps=3).perturb(x, y)
    assert untracked.broken is None and untracked.broken_fraction is None
    assert defended.purifier.algorithm.calls == 4  # nothing tracked, nothing queried
    with pytest.raises(ValueError, match="iterate_draws"):
        Visit(defended, eps=0.1, iterate_draws=-1).perturb(x, y)


def test_score_batch_takes_every_n_draw_protocol_from_one_table():
    defended = PurifiedClassifier(ToyPurifier(BlankWithProbability(0.3), seed=0, device_type="cpu"), Brightness())
    x, y = torch.full((40, 1, 4, 4), 0.8), torch.ones(40, dtype=torch.long)
    defended.purifier.reset_generator()
    scores = score_batch(defended, x, y, ALL_SCORINGS, draws=3, n_eval=5)
    assert set(scores) == set(ALL_SCORINGS)
    # The same stream by hand: one pass, 3 multi-draw passes, then one table of 5 passes for the N-draw protocols.
    defended.purifier.reset_generator()
    first = correct_draws(defended, x, y, 1)
    multi = correct_draws(defended, x, y, 3)
    labels = predicted_draws(defended, x, 5)
    torch.testing.assert_close(scores["single_shot"], single_shot_from_draws(first))
    torch.testing.assert_close(scores["multi_draw"], multi_draw_from_draws(multi))
    torch.testing.assert_close(scores["majority_vote"], majority_vote_from_draws(labels, y))
    torch.testing.assert_close(scores["all_draws"], all_draws_from_draws(labels == y))
    # The clean input is its own only iterate: DiffHammer's metrics read the same table, any-iteration the one pass.
    torch.testing.assert_close(scores["all_draws_all_iterates"], scores["all_draws"])
    torch.testing.assert_close(scores["min_fraction_over_iterates"], multi_draw_from_draws(labels == y))
    torch.testing.assert_close(scores["any_iteration"], scores["single_shot"])
    assert 0 < scores["all_draws"].mean() < scores["majority_vote"].mean() < 1
    # An attacked example: the per-iterate protocols come from the attack's tracked iterates.
    tracked = score_batch(defended, x[:2], y[:2], ALL_SCORINGS, draws=1, n_eval=2,
                          iterates=(torch.tensor([True, False]), torch.tensor([0.25, 0.0])))
    assert tracked["all_draws_all_iterates"].tolist() == [0.0, 1.0]
    assert tracked["min_fraction_over_iterates"].tolist() == [0.75, 1.0]
    assert tracked["any_iteration"][0] == 0.0


def test_all_draws_with_one_resubmission_is_single_shot():
    defended = PurifiedClassifier(ToyPurifier(BlankWithProbability(0.3), seed=0, device_type="cpu"), Brightness())
    x, y = torch.full((200, 1, 4, 4), 0.8), torch.ones(200, dtype=torch.long)
    defended.purifier.reset_generator()
    once = aa.all_draws(defended, x, y, n=1)
    defended.purifier.reset_generator()
    torch.testing.assert_close(once, aa.single_shot(defended, x, y))
    assert 0 < once.mean() < 1
    # n resubmissions, each correct with probability 0.7: all correct with probability 0.7^3 (std 0.034 here); the
    # vote of 3 is correct when at least 2 are: 0.7^3 + 3 * 0.7^2 * 0.3 = 0.784 (std 0.029).
    assert abs(aa.all_draws(defended, x, y, n=3).mean().item() - 0.7 ** 3) < 0.12
    assert abs(aa.majority_vote(defended, x, y, n=3).mean().item() - 0.784) < 0.1
    assert aa.all_draws(Brightness(), x, y, n=10).eq(1).all()  # deterministic: every resubmission agrees
    assert aa.majority_vote(Brightness(), x, y, n=10).eq(1).all()
    with pytest.raises(ValueError, match="n must be"):
        aa.all_draws(defended, x, y, n=0)


def test_runner_scores_every_protocol_and_reads_the_former_name(tmp_path):
    defended = toy_defended()
    x = toy_images(6, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    out = str(tmp_path / "state")

    def attacks():
        return [aa.BPDAEOT(defended, eps=0.05, steps=2, eot=2),
                aa.DiffHammer(defended, eps=0.05, steps=2, eot=2, restarts=1, loss="margin")]

    scorings = ("single_shot", "multi_draw", "majority_vote", "n_evaluation", "any_iteration",
                "all_draws_all_iterates", "min_fraction_over_iterates")
    run = attacks()
    report = aa.run_worst_case(run, x, y, state_dir=out, defense="toy", scorings=scorings, draws=3, n_eval=4,
                               batch_size=3, verbose=False)
    assert all(attack.iterate_draws == 4 and attack.track_iterates for attack in run)
    rows = report["rows"]
    assert {r["scoring"] for r in rows} == set(ALL_SCORINGS)  # n_evaluation is read as all_draws
    assert report["settings"]["scorings"] == list(ALL_SCORINGS)
    for scoring in ALL_SCORINGS:
        mine = [r for r in rows if r["scoring"] == scoring]
        assert [r["attack"] for r in mine] == ["BPDA+EOT", "DiffHammer", "worst-case(BPDA+EOT, DiffHammer)"]
        assert mine[2]["robust_acc"] <= min(mine[0]["robust_acc"], mine[1]["robust_acc"]) + 1e-12
        n_draws = {"multi_draw": 3, "single_shot": None, "any_iteration": None}.get(scoring, 4)
        assert all(r["draws"] == n_draws and r.get("n_eval") == (None if n_draws in (3, None) else 4) for r in mine)
    by = {(r["attack"], r["scoring"]): r for r in rows}
    # The clean input judged once by its own table of N draws: DiffHammer's worst case is all_draws there.
    assert by["BPDA+EOT", "all_draws_all_iterates"]["clean_acc"] == by["BPDA+EOT", "all_draws"]["clean_acc"]
    # Rob Wor <= Rob Avg, as in DiffHammer's tables: a point robust in every draw has fraction 1.
    for attack in ("BPDA+EOT", "DiffHammer", "worst-case(BPDA+EOT, DiffHammer)"):
        worst, average = (by[attack, s]["robust_acc"] for s in ("all_draws_all_iterates", "min_fraction_over_iterates"))
        assert worst <= average
    with pytest.raises(ValueError, match="other settings"):  # another N is another setting, never mixed in
        aa.run_worst_case(attacks(), x, y, state_dir=out, defense="toy", scorings=scorings, draws=3, n_eval=5,
                          batch_size=3, verbose=False)
    with pytest.raises(ValueError, match="n_eval"):
        aa.run_worst_case(attacks(), x, y, state_dir=str(tmp_path / "other"), defense="toy", n_eval=0, verbose=False)
    with pytest.raises(ValueError, match="scoring must be one of"):
        aa.run_worst_case(attacks(), x, y, state_dir=str(tmp_path / "other"), defense="toy", scorings=["rob_wor"],
                          verbose=False)


def test_only_the_chosen_attacks_record_the_per_iterate_draws(tmp_path):
    defended = toy_defended()
    x = toy_images(6, low=0.3, high=0.7)
    y = clean_labels(defended.classifier, x)
    run = [aa.BPDAEOT(defended, eps=0.05, steps=2, eot=2),
           aa.DiffHammer(defended, eps=0.05, steps=2, eot=2, restarts=1, loss="margin")]
    report = aa.run_worst_case(run, x, y, state_dir=str(tmp_path / "state"), defense="toy", scorings=ALL_SCORINGS,
                               draws=3, n_eval=4, batch_size=3, verbose=False, iterate_draw_attacks=["DiffHammer"])
    assert [attack.iterate_draws for attack in run] == [0, 4]
    by = {(r["attack"], r["scoring"]): r for r in report["rows"]}
    for scoring in ("all_draws_all_iterates", "min_fraction_over_iterates"):
        assert ("BPDA+EOT", scoring) not in by and ("DiffHammer", scoring) in by
        # the worst case of a per-iterate metric is over the attacks that recorded it, and says which
        assert by["worst-case(DiffHammer)", scoring]["robust_acc"] == by["DiffHammer", scoring]["robust_acc"]
    assert ("worst-case(BPDA+EOT, DiffHammer)", "majority_vote") in by
    # CPU seconds of the process beside the wall time (on a shared machine the wall time counts the neighbours too)
    cpu = [by[a, "majority_vote"]["cpu_seconds"]
           for a in ("BPDA+EOT", "DiffHammer", "worst-case(BPDA+EOT, DiffHammer)")]
    assert cpu[0] > 0 and cpu[1] > 0 and cpu[2] == pytest.approx(cpu[0] + cpu[1])
    # recording is part of the attack's config, so a later run of a subset (without DiffHammer) resumes the folder
    again = aa.run_worst_case(run[:1], x, y, state_dir=str(tmp_path / "state"), defense="toy", scorings=ALL_SCORINGS,
                              draws=3, n_eval=4, batch_size=3, verbose=False, iterate_draw_attacks=[])
    bpda_rows = [[r for r in rows if r["attack"] == "BPDA+EOT"] for rows in (again["rows"], report["rows"])]
    assert bpda_rows[0] == bpda_rows[1]
    with pytest.raises(ValueError, match="not among the attacks"):
        aa.run_worst_case(run, x, y, state_dir=str(tmp_path / "other"), defense="toy", scorings=ALL_SCORINGS,
                          verbose=False, iterate_draw_attacks=["Square"])
