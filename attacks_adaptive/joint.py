"""Joint attacks of ADP (Yoon et al. 2021, https://arxiv.org/abs/2106.06041, §5.1 and Table 1).

They push the adversarial example towards points the purifier leaves alone while fooling the classifier:

* Joint (score): ``x_{i+1} = P_B(x_i + alpha (w sign(s(x_i)) + (1 - w) sign(grad_x L(g(x), y))))``: "if an attacked
  image has low score norm, then it will not be purified".
* Joint (full): ``x_{i+1} = P_B(x_i + alpha (w sign(f(x_i) - x_i) + (1 - w) sign(grad_x L(g(x), y))))``.

with weight ``w = 0.5`` and ``alpha = 2/255`` at 8/255 (``eps / 4``); the paper runs them "+EOT" with 15 samples.
``s`` is the prior's score at a noise level ``score_sigma``; only its sign enters, which is the sign of
``D(x, sigma) - x`` at any sigma's normalisation, so the pixel sigma only picks the denoiser's noise level (ADP's
score network has no sigma input; 0.25 is ADP's noise level). ``f(x_i) - x_i`` is averaged over ``eot``
purifications (its sign is the majority direction of the stochastic purifier).

Paper versus reference code: Table 1 takes the classifier gradient at ``x = x_i`` (``classifier_gradient="input"``,
the default), where only Joint (full)'s purification term is stochastic. ADP's ``bpda_total.py`` instead uses the
BPDA+EOT gradient (the classifier's gradient at the purified images, summed over 15 purifications):
``classifier_gradient="bpda"``; the paper's Joint numbers (70.61% next to BPDA's 70.01%) suggest that variant ran.
Under ``l_2`` every ``sign`` becomes an ``l_2``-normalised direction.
"""

from __future__ import annotations

import torch

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction
from attacks_adaptive.losses import LOSSES

JOINT_MODES = ("score", "full")
CLASSIFIER_GRADIENTS = ("input", "bpda")


class JointAttack(Attack):
    """ADP's Joint (score) / Joint (full) attack.

    :param mode: ``"score"`` (the score's direction) or ``"full"`` (the purification's displacement).
    :param weight: ``w``, the weight of the score / purification direction (0.5 in ADP).
    :param eot: purifications averaged per step (for ``f(x_i) - x_i`` and, with ``classifier_gradient="bpda"``, for
        the gradient).
    :param step: step size; ``None`` is ``eps / 4``.
    :param classifier_gradient: ``"input"`` (Table 1: at ``x_i``) or ``"bpda"`` (ADP's code: BPDA+EOT).
    :param score_sigma: pixel noise level of the score in ``mode="score"``.
    :param loss: ``"ce"``, ``"dlr"`` or ``"margin"``.
    """

    attack_params = Attack.attack_params + ["mode", "weight", "eot", "step", "classifier_gradient", "score_sigma",
                                            "loss"]

    def __init__(self, target, *, eps: float, mode: str = "score", norm: str = "linf", steps: int = 40,
                 weight: float = 0.5, eot: int = 15, step: float | None = None, classifier_gradient: str = "input",
                 score_sigma: float = 0.25, loss: str = "ce", **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.mode = mode
        self.weight = weight
        self.eot = eot
        self.step = step
        self.classifier_gradient = classifier_gradient
        self.score_sigma = score_sigma
        self.loss = loss
        self._check_params()

    @property
    def name(self) -> str:
        return f"Joint({self.mode})+EOT"

    def _check_params(self) -> None:
        super()._check_params()
        if self.mode not in JOINT_MODES:
            raise ValueError(f"mode must be one of {JOINT_MODES}, got {self.mode!r}.")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {self.weight!r}.")
        self._check_positive_int("eot", self.eot)
        self._check_step()
        if self.classifier_gradient not in CLASSIFIER_GRADIENTS:
            raise ValueError(f"classifier_gradient must be one of {CLASSIFIER_GRADIENTS}, got "
                             f"{self.classifier_gradient!r}.")
        if not self.score_sigma > 0:
            raise ValueError(f"score_sigma must be positive, got {self.score_sigma!r}.")
        self._check_loss(self.loss)
        if self.mode == "score":
            self.model.prior  # noqa: B018 -- raises a clear ValueError on an undefended target

    def describe(self) -> dict:
        stochastic = self.mode == "full" or self.classifier_gradient == "bpda"
        return {**super().describe(), "eot": self.eot if stochastic else 1}

    def gradient_description(self) -> str:
        return "bpda" if self.classifier_gradient == "bpda" else "none (classifier only)"

    @torch.no_grad()
    def _purifier_direction(self, x_i):
        """``s(x_i)`` (as ``D(x_i, sigma) - x_i``, same sign) or the EOT mean of ``f(x_i) - x_i``."""
        if self.mode == "score":
            return torch.cat([self.model.prior.denoise(x_i[j:j + self.max_rows], self.score_sigma)
                              for j in range(0, x_i.shape[0], self.max_rows)]) - x_i
        if not self.model.stochastic:
            return torch.zeros_like(x_i)
        copies = x_i.repeat_interleave(self.eot, dim=0)
        purified = torch.cat([self.model.purify(copies[j:j + self.max_rows], False)
                              for j in range(0, copies.shape[0], self.max_rows)])
        return purified.view(x_i.shape[0], self.eot, *x_i.shape[1:]).mean(1) - x_i

    def _attack(self, x, y):
        through = self.classifier_gradient == "bpda"

        def direction(x_i):
            grad, _, _ = self.model.loss_gradient(x_i, y, LOSSES[self.loss], self.eot, max_rows=self.max_rows,
                                                  through_purifier=through, gradient="bpda" if through else None)
            return (self.weight * ascent_direction(self._purifier_direction(x_i), self.norm)
                    + (1 - self.weight) * ascent_direction(grad, self.norm))

        return self._ascend(x, x, self.step_size, direction)
