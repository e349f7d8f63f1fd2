"""Scoring protocols: how an adversarial example is judged on a randomized defense. Every result names one.

* ``single_shot``: one forward pass of the deployed defense (its ensemble, e.g. ADP's 10 purifications); robust if
  correct. What AutoAttack's final check and most papers' tables do.
* ``multi_draw``: ``draws`` independent forward passes of the deployed defense; an example's robustness is the
  fraction of correct draws (fractional robust flags, as Fixed-AutoAttack of Liu et al. 2025,
  https://arxiv.org/abs/2404.14309, does with 20 draws); the robust accuracy is their mean.
* ``any_iteration``: broken if the deployed defense misclassified any iterate of the attack or the final example
  (the rule of the DiffPure and ScoreOpt BPDA+EOT code: "evaluate while optimising"); needs the attack to run with
  ``track_iterates=True``.
"""

from __future__ import annotations

import torch

from attacks_adaptive.base import DefendedModel

SCORINGS = ("single_shot", "multi_draw", "any_iteration")


def single_shot(model, x: torch.Tensor, y: torch.Tensor, max_rows: int = 256) -> torch.Tensor:
    """Per example, 1.0 if one pass of the deployed defense classifies it correctly, else 0.0."""
    model = DefendedModel.from_target(model)
    return (model.deployed_logits(x, max_rows).argmax(1) == y).float()


def multi_draw(model, x: torch.Tensor, y: torch.Tensor, draws: int = 20, max_rows: int = 256) -> torch.Tensor:
    """Per example, the fraction of ``draws`` independent passes of the deployed defense that are correct (all draws
    in one batched call, chunked to ``max_rows``)."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}.")
    model = DefendedModel.from_target(model)
    if not model.stochastic:
        draws = 1  # a deterministic model gives every draw the same answer
    correct = model.deployed_logits(x.repeat(draws, *([1] * (x.ndim - 1))), max_rows).argmax(1) == y.repeat(draws)
    return correct.view(draws, x.shape[0]).float().mean(0)


def any_iteration(broken: torch.Tensor | None, final_single_shot: torch.Tensor) -> torch.Tensor:
    """Per example, 1.0 if no iterate was misclassified (``broken`` from an attack run with ``track_iterates``) and
    the final example is classified correctly (``final_single_shot``)."""
    if broken is None:
        raise ValueError("any_iteration scoring needs the attack to run with track_iterates=True.")
    return (~broken).float() * final_single_shot
