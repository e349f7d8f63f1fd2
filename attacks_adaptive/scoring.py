"""Scoring protocols: how an adversarial example is judged on a randomized defense. Every result names one.

* ``single_shot``: one forward pass of the deployed defense (its ensemble, e.g. ADP's 10 purifications); robust if
  correct. What AutoAttack's final check and most papers' tables do.
* ``multi_draw``: ``draws`` independent forward passes of the deployed defense; an example's robustness is the
  fraction of correct draws (fractional robust flags, as Fixed-AutoAttack of Liu et al. 2025,
  https://arxiv.org/abs/2404.14309, does with 20 draws); the robust accuracy is their mean.
* ``any_iteration``: broken if the deployed defense misclassified any iterate of the attack or the final example
  (the rule of the DiffPure and ScoreOpt BPDA+EOT code: "evaluate while optimising"); needs the attack to run with
  ``track_iterates=True``.
* ``n_evaluation``: the example is resubmitted ``n`` times (independent forward passes of the deployed defense) and
  the defense fails on it if any resubmission is misclassified (DiffHammer's N-evaluation, Wang et al., NeurIPS 2024,
  with N = 10; its reference code's "Rob Wor"); robust = all ``n`` correct. With ``n = 1`` it is ``single_shot``.

The ``*_from_draws`` functions compute the draw-based protocols from a table of per-draw correctness (draws, examples),
the table :func:`correct_draws` measures; the model-level functions are these two steps.
"""

from __future__ import annotations

import torch

from attacks_adaptive.base import DefendedModel

SCORINGS = ("single_shot", "multi_draw", "any_iteration", "n_evaluation")
N_EVALUATION = 10  # DiffHammer's default number of resubmissions


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def correct_draws(model, x: torch.Tensor, y: torch.Tensor, draws: int, max_rows: int = 256) -> torch.Tensor:
    """The (draws, examples) boolean table of whether each of ``draws`` independent passes of the deployed defense
    classifies each example correctly (all draws in one batched call, chunked to ``max_rows``). A deterministic model
    is queried once and its answer repeated (every draw would agree)."""
    _check_count("draws", draws)
    model = DefendedModel.from_target(model)
    queried = draws if model.stochastic else 1
    correct = model.deployed_logits(x.repeat(queried, *([1] * (x.ndim - 1))), max_rows).argmax(1) == y.repeat(queried)
    return correct.view(queried, x.shape[0]).expand(draws, x.shape[0])


def _check_table(correct: torch.Tensor) -> torch.Tensor:
    correct = torch.as_tensor(correct)
    if correct.ndim != 2 or correct.shape[0] < 1:
        raise ValueError(f"a draw table must have shape (draws >= 1, examples), got {tuple(correct.shape)}.")
    return correct.bool()


def single_shot_from_draws(correct: torch.Tensor) -> torch.Tensor:
    """Per example, 1.0 if the first draw is correct."""
    return _check_table(correct)[0].float()


def multi_draw_from_draws(correct: torch.Tensor) -> torch.Tensor:
    """Per example, the fraction of correct draws."""
    return _check_table(correct).float().mean(0)


def n_evaluation_from_draws(correct: torch.Tensor) -> torch.Tensor:
    """Per example, 1.0 if every draw (resubmission) is correct, 0.0 if any is misclassified."""
    return _check_table(correct).all(0).float()


def single_shot(model, x: torch.Tensor, y: torch.Tensor, max_rows: int = 256) -> torch.Tensor:
    """Per example, 1.0 if one pass of the deployed defense classifies it correctly, else 0.0."""
    return single_shot_from_draws(correct_draws(model, x, y, 1, max_rows))


def multi_draw(model, x: torch.Tensor, y: torch.Tensor, draws: int = 20, max_rows: int = 256) -> torch.Tensor:
    """Per example, the fraction of ``draws`` independent passes of the deployed defense that are correct."""
    return multi_draw_from_draws(correct_draws(model, x, y, draws, max_rows))


def n_evaluation(model, x: torch.Tensor, y: torch.Tensor, n: int = N_EVALUATION, max_rows: int = 256) -> torch.Tensor:
    """Per example, 1.0 if all ``n`` resubmissions to the deployed defense are classified correctly, else 0.0."""
    _check_count("n", n)
    return n_evaluation_from_draws(correct_draws(model, x, y, n, max_rows))


def any_iteration(broken: torch.Tensor | None, final_single_shot: torch.Tensor) -> torch.Tensor:
    """Per example, 1.0 if no iterate was misclassified (``broken`` from an attack run with ``track_iterates``) and
    the final example is classified correctly (``final_single_shot``)."""
    if broken is None:
        raise ValueError("any_iteration scoring needs the attack to run with track_iterates=True.")
    return (~broken).float() * final_single_shot
