"""Preprocessor-blind PGD: PGD on the classifier alone, scored on the defended model (a transfer attack).

ADP (Yoon et al. 2021, https://arxiv.org/abs/2106.06041) §5.1 and Table 1, "Classifier PGD":
``x_{i+1} = P_B(x_i + alpha sign grad_x L(g(x), y)|_{x = x_i})``, the PGD of Madry et al. (2018,
https://arxiv.org/abs/1706.06083) on the classifier ``g`` without the purifier ``f``. The reference code (ADP's and
ScoreOpt's ``clf_pgd``) runs foolbox's ``LinfPGD``: 40 steps of ``eps/4`` from a random start, the defaults here.
This is the weakest attack of the list: it ignores the purifier, so it only measures what transfers.
"""

from __future__ import annotations

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction, random_start
from attacks_adaptive.losses import LOSSES


class BlindPGD(Attack):
    """PGD on the classifier alone (the purifier is neither differentiated nor queried while attacking).

    :param step: step size; ``None`` is ``eps / 4`` (foolbox ``rel_stepsize=0.25`` as the reference code uses).
    :param random_start: start from a uniform point of the ball (Madry et al.; foolbox's default).
    :param loss: ``"ce"``, ``"dlr"`` or ``"margin"``.

    (The other parameters are :class:`attacks_adaptive.base.Attack`'s.)
    """

    name = "BlindPGD"
    attack_params = Attack.attack_params + ["step", "random_start", "loss"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 40, step: float | None = None,
                 random_start: bool = True, loss: str = "ce", **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.step = step
        self.random_start = random_start
        self.loss = loss
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_step()
        self._check_loss(self.loss)

    def gradient_description(self) -> str:
        return "none (classifier only)"

    def _attack(self, x, y):
        start = random_start(x, self.eps, self.norm, self._generator(x.device)) if self.random_start else x

        def direction(x_i):
            grad, _, _ = self.model.loss_gradient(x_i, y, LOSSES[self.loss], max_rows=self.max_rows,
                                                  through_purifier=False)
            return ascent_direction(grad, self.norm)

        return self._ascend(x, start, self.step_size, direction)
