"""Scoring protocols: how an adversarial example is judged on a randomized defense. Every result names one.

A randomized defense answers differently on every pass, so "robust" needs a rule. The papers use several, under names
that do not always say which; ours say what is counted (the table "paper's protocol -> our scoring" is in
``docs/attacks.md``). ``N`` is the runner's ``n_eval`` (10, as DiffHammer and DiffBreak use), ``draws`` its
``draws``; a draw is one independent forward pass of the deployed defense (its ensemble, e.g. ADP's 10 purifications).

On the final adversarial example:

* ``single_shot``: one draw; robust if correct. AutoAttack's final check and most papers' tables.
* ``multi_draw``: the fraction of ``draws`` draws that are correct (a fractional robust flag); the robust accuracy is
  its mean. Fixed-AutoAttack (Liu et al., ICLR 2025) is this rule with 20 draws, see :func:`multi_draw`.
* ``majority_vote``: robust if the true class is strictly the most frequent of the ``N`` predicted labels (DiffBreak's
  majority vote, Kassis et al., NeurIPS 2025); a tie counts as broken, see :func:`majority_vote`.
* ``all_draws``: robust if all ``N`` draws are correct (one misclassified resubmission breaks it). Called
  ``n_evaluation`` before; DiffHammer's code scores the per-iterate rules below, not this one.

On every iterate of the attack (the attack must track them, :class:`attacks_adaptive.base.Attack`):

* ``any_iteration``: broken if one draw at any iterate, or one draw of the final example, is misclassified (the rule of
  the DiffPure and ScoreOpt BPDA+EOT code: "evaluate while optimising").
* ``all_draws_all_iterates``: robust if all ``N`` draws at every iterate (the clean input included) are correct:
  DiffHammer's "Rob Wor" (Wang et al., NeurIPS 2024), see :func:`all_draws_all_iterates`.
* ``min_fraction_over_iterates``: the fraction of the ``N`` draws correct at the iterate where it is lowest; its mean
  is DiffHammer's "Rob Avg", see :func:`min_fraction_over_iterates`.

The ``*_from_draws`` functions compute a protocol from a table of per-draw correctness (draws, examples), the table
:func:`correct_draws` measures; the per-iterate ones from an (iterates, draws, examples) table or from its running
maximum per example (what an attack keeps, :func:`broken_fraction_from_iterates`). :func:`score_batch` computes every
requested protocol of a batch, as the worst-case runner does.
"""

from __future__ import annotations

import torch

from attacks_adaptive.defended import DefendedModel

Tensor = torch.Tensor

#: The per-iterate N-draw protocols (DiffHammer's metrics): the attack must run with ``iterate_draws = N``.
ITERATE_DRAW_SCORINGS = ("all_draws_all_iterates", "min_fraction_over_iterates")
#: What :func:`attacks_adaptive.run_worst_case` scores unless told: all but :data:`ITERATE_DRAW_SCORINGS`, which cost
#: ``N`` draws of the deployed defense at every iterate of every attack.
SCORINGS = ("single_shot", "multi_draw", "majority_vote", "all_draws", "any_iteration")
#: Every scoring a results row may name.
ALL_SCORINGS = SCORINGS + ITERATE_DRAW_SCORINGS
#: The protocols whose draws number ``N`` (the runner's ``n_eval``); ``multi_draw`` uses ``draws``.
N_DRAW_SCORINGS = ("majority_vote", "all_draws", "all_draws_all_iterates", "min_fraction_over_iterates")
#: The two scorings of randomized smoothing's rows (``python -m benchmarks certify``): ``certified``, Cohen et al.'s
#: (2019) certificate of the smoothed classifier at a radius, and ``smoothed_prediction``, the smoothed classifier's
#: Monte-Carlo prediction at an attacked point. Row vocabulary only: they score no attack run of :func:`score_batch`.
SMOOTHING_SCORINGS = ("certified", "smoothed_prediction")
#: Former names of scorings, as results files written before may hold them: the one place they are translated.
SCORING_ALIASES = {"n_evaluation": "all_draws"}
N_EVALUATION = 10  # N of the N-draw protocols: DiffHammer's n_eval (config.py ATTACK.N_EVAL) and DiffBreak's copies


def scoring_name(name: str) -> str:
    """The current name of a scoring (a former name, e.g. ``n_evaluation``, becomes ``all_draws``); unknown names
    raise."""
    name = SCORING_ALIASES.get(name, name)
    if name not in ALL_SCORINGS:
        raise ValueError(f"scoring must be one of {ALL_SCORINGS} (or a former name {sorted(SCORING_ALIASES)}), "
                         f"got {name!r}.")
    return name


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def predicted_draws(model, x: Tensor, draws: int, max_rows: int = 256) -> Tensor:
    """The (draws, examples) table of the labels ``draws`` independent passes of the deployed defense predict (all
    draws in one batched call, chunked to ``max_rows``). A deterministic model is queried once and its answer repeated
    (every draw would agree)."""
    _check_count("draws", draws)
    model = DefendedModel.from_target(model)
    queried = draws if model.stochastic else 1
    labels = model.deployed_logits(x.repeat(queried, *([1] * (x.ndim - 1))), max_rows).argmax(1)
    return labels.view(queried, x.shape[0]).expand(draws, x.shape[0])


def correct_draws(model, x: Tensor, y: Tensor, draws: int, max_rows: int = 256) -> Tensor:
    """The (draws, examples) boolean table of whether each of ``draws`` independent passes of the deployed defense
    classifies each example correctly (see :func:`predicted_draws`)."""
    return predicted_draws(model, x, draws, max_rows) == y


def _check_table(table: Tensor, ndim: int = 2) -> Tensor:
    table = torch.as_tensor(table)
    if table.ndim != ndim or table.shape[ndim - 2] < 1:
        shape = "(draws >= 1, examples)" if ndim == 2 else "(iterates, draws >= 1, examples)"
        raise ValueError(f"a draw table must have shape {shape}, got {tuple(table.shape)}.")
    return table


def single_shot_from_draws(correct: Tensor) -> Tensor:
    """Per example, 1.0 if the first draw is correct."""
    return _check_table(correct)[0].float()


def multi_draw_from_draws(correct: Tensor) -> Tensor:
    """Per example, the fraction of correct draws."""
    return _check_table(correct).float().mean(0)


def all_draws_from_draws(correct: Tensor) -> Tensor:
    """Per example, 1.0 if every draw (resubmission) is correct, 0.0 if any is misclassified."""
    return _check_table(correct).bool().all(0).float()


def majority_vote_from_draws(labels: Tensor, y: Tensor) -> Tensor:
    """Per example, 1.0 if the true label ``y`` is strictly the most frequent of the predicted ``labels`` (draws,
    examples), 0.0 otherwise (a tie included)."""
    labels = _check_table(labels).long()
    y = torch.as_tensor(y, device=labels.device).long()
    classes = int(max(labels.max().item(), y.max().item())) + 1
    counts = torch.zeros(labels.shape[1], classes, device=labels.device).scatter_add_(
        1, labels.t(), torch.ones(labels.t().shape, device=labels.device))
    true = counts.gather(1, y[:, None]).squeeze(1)
    other = counts.scatter(1, y[:, None], -1.0).max(1).values
    return (true > other).float()


def broken_fraction_from_iterates(correct: Tensor) -> Tensor:
    """Per example, the largest fraction of misclassified draws over the iterates of an (iterates, draws, examples)
    correctness table: what an attack run with ``iterate_draws`` keeps (``AttackResult.broken_fraction``), the running
    maximum that both of DiffHammer's metrics need."""
    return (~_check_table(correct, 3).bool()).float().mean(1).max(0).values


def all_draws_all_iterates(broken_fraction: Tensor | None) -> Tensor:
    """Per example, 1.0 if no draw at any iterate was misclassified (``broken_fraction`` 0), else 0.0.

    DiffHammer's "Rob Wor" (Wang et al., NeurIPS 2024; reference code ``attacker.py``, ``Attacker.update_batch_metrics``
    keeps per point the maximum over iterations and restarts of "any of the ``n_eval`` draws misclassified", and
    ``rob_metrics`` reports one minus its mean; the clean input's draws count as an iterate, as the reference logs
    them before the first step). ``broken_fraction``: :attr:`attacks_adaptive.base.AttackResult.broken_fraction` (or
    :func:`broken_fraction_from_iterates` of a table)."""
    if broken_fraction is None:
        raise ValueError("all_draws_all_iterates scoring needs the attack to run with iterate_draws >= 1.")
    return (broken_fraction == 0).float()


def min_fraction_over_iterates(broken_fraction: Tensor | None) -> Tensor:
    """Per example, one minus the largest fraction of misclassified draws at any iterate: the fraction of correct draws
    at the iterate where it is lowest.

    Its mean is DiffHammer's "Rob Avg" (reference ``Attacker.update_batch_metrics``: per point the maximum over
    iterations and restarts of the misclassified fraction of the ``n_eval`` draws; ``rob_metrics``: one minus its
    mean)."""
    if broken_fraction is None:
        raise ValueError("min_fraction_over_iterates scoring needs the attack to run with iterate_draws >= 1.")
    return 1.0 - broken_fraction


def single_shot(model, x: Tensor, y: Tensor, max_rows: int = 256) -> Tensor:
    """Per example, 1.0 if one pass of the deployed defense classifies it correctly, else 0.0."""
    return single_shot_from_draws(correct_draws(model, x, y, 1, max_rows))


def multi_draw(model, x: Tensor, y: Tensor, draws: int = 20, max_rows: int = 256) -> Tensor:
    """Per example, the fraction of ``draws`` independent passes of the deployed defense that are correct.

    Fixed-AutoAttack (Liu et al., "Towards Understanding the Robustness of Diffusion-Based Purification: A Stochastic
    Perspective", ICLR 2025; AutoAttack pull request 105, branch ``Buntender/auto-attack``, and the authors' copy
    ``LYMDLUT/ADDT``, ``Fixed-AutoAttack/autoattack/autoattack.py``, ``AutoAttack.run_standard_evaluation``) keeps
    exactly this per point: ``robust_flags`` is the count of correct passes out of ``eval_iter`` (20 for a randomized
    defense) divided by ``eval_iter``, an attack's example replaces the point's flag only where its fraction is
    smaller, and the robust accuracy is the flags' mean. It is fractional, not "broken if any of 20 passes fails" (that
    is :func:`all_draws`). Its per-point minimum also runs over the clean input's fraction; the runner's worst case
    takes the minimum over the attacks only."""
    return multi_draw_from_draws(correct_draws(model, x, y, draws, max_rows))


def all_draws(model, x: Tensor, y: Tensor, n: int = N_EVALUATION, max_rows: int = 256) -> Tensor:
    """Per example, 1.0 if all ``n`` independent passes (resubmissions) of the deployed defense classify it correctly,
    else 0.0. With ``n = 1`` it is :func:`single_shot`."""
    _check_count("n", n)
    return all_draws_from_draws(correct_draws(model, x, y, n, max_rows))



def majority_vote(model, x: Tensor, y: Tensor, n: int = N_EVALUATION, max_rows: int = 256) -> Tensor:
    """Per example, 1.0 if the true class is strictly the most frequent label of ``n`` independent passes of the
    deployed defense, else 0.0.

    DiffBreak's majority vote (Kassis et al., "DiffBreak: Is Diffusion-Based Purification Robust?", NeurIPS 2025,
    https://arxiv.org/abs/2411.16598; ``n`` = 10 purified copies in its tables): its code
    (``DiffBreak/utils/wrapper.py``, ``eval_attack`` with ``eval_mode="batch"``) takes the most frequent predicted label
    of the copies (``torch.unique`` counts, then their argmax) as the defense's answer; a plurality, so with many
    classes it can be fewer than half the draws. A tie counts as broken: the vote then does not single out the true
    class, and DiffBreak's argmax settles it by the lowest class index, an accident of label numbering that a
    robustness claim should not rest on. DiffBreak applies the vote at every iterate and stops at the first failure;
    this function scores one example (the final one)."""
    _check_count("n", n)
    return majority_vote_from_draws(predicted_draws(model, x, n, max_rows), y)


def any_iteration(broken: Tensor | None, final_single_shot: Tensor) -> Tensor:
    """Per example, 1.0 if no iterate was misclassified (``broken`` from an attack run with ``track_iterates``) and
    the final example is classified correctly (``final_single_shot``)."""
    if broken is None:
        raise ValueError("any_iteration scoring needs the attack to run with track_iterates=True.")
    return (~broken).float() * final_single_shot


def score_batch(model, x: Tensor, y: Tensor, scorings, *, draws: int, n_eval: int = N_EVALUATION,
                iterates: tuple[Tensor | None, Tensor | None] | None = None, max_rows: int = 256) -> dict:
    """Per example, every protocol of ``scorings`` (and ``single_shot``, always) for the examples ``x``.

    :param draws: passes of ``multi_draw``.
    :param n_eval: passes of the N-draw protocols; ``majority_vote`` and ``all_draws`` share one table of them.
    :param iterates: ``(broken, broken_fraction)`` of the attack that made ``x`` (its
        :class:`attacks_adaptive.base.AttackResult`), for the per-iterate protocols; ``None``: ``x`` is not attacked
        (the clean input), its own only iterate, judged by the same draws.
    :return: ``{scoring: tensor of per-example values}``.
    """
    scores = {"single_shot": single_shot(model, x, y, max_rows)}
    if "multi_draw" in scorings:
        scores["multi_draw"] = multi_draw(model, x, y, draws, max_rows)
    wanted, correct = set(scorings), None
    # the N-draw table: for the final-example protocols, and for the per-iterate ones of an unattacked input
    if wanted & {"majority_vote", "all_draws"} or (iterates is None and wanted & set(ITERATE_DRAW_SCORINGS)):
        labels = predicted_draws(model, x, n_eval, max_rows)
        correct = labels == y
        if "majority_vote" in wanted:
            scores["majority_vote"] = majority_vote_from_draws(labels, y)
        if "all_draws" in wanted:
            scores["all_draws"] = all_draws_from_draws(correct)
    if iterates is None:
        fraction = None if correct is None else broken_fraction_from_iterates(correct[None])
        iterates = (scores["single_shot"] == 0, fraction)
    broken, fraction = iterates
    if "any_iteration" in wanted:
        scores["any_iteration"] = any_iteration(broken, scores["single_shot"])
    if "all_draws_all_iterates" in wanted:
        scores["all_draws_all_iterates"] = all_draws_all_iterates(fraction)
    if "min_fraction_over_iterates" in wanted:
        scores["min_fraction_over_iterates"] = min_fraction_over_iterates(fraction)
    return scores
