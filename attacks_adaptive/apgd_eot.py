"""APGD with EOT: Auto-PGD (Croce & Hein 2020) on EOT-averaged gradients, through any purifier gradient mode.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks"
(ICML 2020, https://arxiv.org/abs/2003.01690), Algorithm 1, implemented here (not pyautoattack's ``APGDAttack``, whose
``eot_iter`` loop runs one forward/backward per EOT sample; here the ``eot`` copies go through one batched pass):

* step size ``eta = 2 eps``; ``z = P(x_k + eta sign(grad f(x_k)))`` (``l_2``: the normalised gradient);
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` with momentum ``alpha = 0.75`` (1 at k = 0);
* checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``;
  at each, ``eta`` halves and the iterate restarts from the best point where (1) the loss rose in fewer than
  ``rho = 0.75`` of the steps since the last checkpoint, or (2) the step was not halved there and the best loss has
  not improved since;
* losses CE and DLR (eq. 6 of the paper, ``loss="dlr"``); AutoAttack's 'rand' version runs both with ``eot = 20``
  and 100 iterations from a random start.

With a randomized defense ``f`` is the EOT mean loss and "misclassified" means the EOT mean softmax of the gradient
pass is wrong (stock APGD judges one sample and keeps the first such iterate). The result is the misclassified iterate
of highest loss (a larger margin survives more purification draws), else the iterate of highest loss. In a gradient
mode whose value is a surrogate's output (not the purification) this selection sees the surrogate; the scoring
protocols always query the deployed defense.
``gradient`` picks the purifier's gradient mode (``None`` keeps its current one), as Croce et al. (2022) attacked ADP
with a full-gradient re-implementation.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction, project, random_start
from attacks_adaptive.losses import LOSSES

Tensor = torch.Tensor


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j = ceil(p_j N)`` (j >= 1) at which APGD may halve its step (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]})  # 1e-9: 0.22 * 100 is 22.000000000000004


class APGDEOT(Attack):
    """APGD (CE or DLR loss) on EOT-averaged gradients.

    :param loss: ``"ce"`` or ``"dlr"`` (``"margin"`` is accepted too).
    :param eot: stochastic copies per gradient (20 in AutoAttack 'rand').
    :param gradient: the purifier's gradient mode for this attack, or ``None`` to keep its current one.
    :param rho: the checkpoint's success fraction (0.75).
    :param momentum: ``alpha`` (0.75).
    :param random_start: start from a uniform point of the ball (as AutoAttack does).
    """

    attack_params = Attack.attack_params + ["loss", "eot", "gradient", "rho", "momentum", "random_start"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 100, loss: str = "ce", eot: int = 20,
                 gradient: str | None = None, rho: float = 0.75, momentum: float = 0.75, random_start: bool = True,
                 **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.loss = loss
        self.eot = eot
        self.gradient = gradient
        self.rho = rho
        self.momentum = momentum
        self.random_start = random_start
        self._check_params()

    @property
    def name(self) -> str:
        return f"APGD-{self.loss.upper()}+EOT"

    def _check_params(self) -> None:
        super()._check_params()
        self._check_loss(self.loss)
        self._check_positive_int("eot", self.eot)
        if not 0 < self.rho < 1 or not 0 < self.momentum <= 1:
            raise ValueError(f"rho must be in (0, 1) and momentum in (0, 1], got {self.rho!r}, {self.momentum!r}.")
        self.model.check_gradient_mode(self.gradient)

    def gradient_description(self) -> str:
        if not self.model.stochastic:
            return "none"
        return self.gradient or self.model.gradient

    def _loss_gradient(self, x_i: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(gradient, loss, softmax)`` of the EOT mean loss at the iterate ``x_i`` (what APGD ascends)."""
        return self.model.loss_gradient(x_i, y, LOSSES[self.loss], self.eot, max_rows=self.max_rows,
                                        gradient=self.gradient)

    def _attack(self, x, y):
        evaluate = partial(self._loss_gradient, y=y)
        shape = (-1, *([1] * (x.ndim - 1)))
        x_cur = random_start(x, self.eps, self.norm, self._generator(x.device)) if self.random_start else x
        grad, loss, probs = evaluate(x_cur)
        x_max, loss_max, grad_max = x_cur.clone(), loss.clone(), grad.clone()
        fooled = probs.argmax(1) != y
        x_fooled, loss_fooled = x_cur.clone(), torch.where(fooled, loss, torch.full_like(loss, -torch.inf))
        eta = torch.full((x.shape[0],), 2.0 * self.eps, device=x.device)
        x_prev = x_cur
        increases = torch.zeros_like(loss)
        checkpoints, last_checkpoint = apgd_checkpoints(self.steps), 0
        reduced_last = torch.ones_like(fooled)  # no "unchanged step" condition at the first checkpoint
        loss_max_last = loss_max.clone()
        for k in self._iterations():
            a = 1.0 if k == 0 else self.momentum
            z = project(x_cur + eta.view(shape) * ascent_direction(grad, self.norm), x, self.eps, self.norm)
            x_next = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, self.eps, self.norm)
            x_prev, x_cur = x_cur, x_next
            self._note_iterate(x_cur)
            grad, loss_new, probs = evaluate(x_cur)
            increases += (loss_new > loss).float()
            loss = loss_new
            better_fooled = (probs.argmax(1) != y) & (loss > loss_fooled)
            x_fooled[better_fooled], loss_fooled[better_fooled] = x_cur[better_fooled], loss[better_fooled]
            fooled |= better_fooled
            better = loss > loss_max
            x_max[better], loss_max[better], grad_max[better] = x_cur[better], loss[better], grad[better]
            if k + 1 in checkpoints:
                since = k + 1 - last_checkpoint
                oscillating = increases < self.rho * since
                stalled = ~reduced_last & (loss_max <= loss_max_last)
                reduce = oscillating | stalled
                eta[reduce] /= 2
                x_cur, grad = torch.where(reduce.view(shape), x_max, x_cur), torch.where(reduce.view(shape), grad_max,
                                                                                           grad)
                reduced_last, loss_max_last = reduce, loss_max.clone()
                increases.zero_()
                last_checkpoint = k + 1
        return torch.where(fooled.view(shape), x_fooled, x_max)
