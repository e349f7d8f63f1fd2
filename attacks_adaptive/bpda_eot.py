"""BPDA+EOT PGD: the adaptive attack of ADP's and Hill et al.'s evaluations.

BPDA (Athalye et al. 2018, https://arxiv.org/abs/1802.00420) replaces the purifier's backward pass by the identity:
the gradient is the classifier's, taken at the purified image (ADP Table 1: ``grad_x L(g(x), y)|_{x = f(x_i)}``).
EOT averages it over ``eot`` stochastic purifications of the iterate. The protocol of ADP (Yoon et al. 2021, §5.1.2)
and Hill et al. (2021): 40 (or 50) iterations of ``sign`` steps of ``eps/4`` (2/255 at 8/255), 15 EOT samples, no
random start.

Paper versus reference code: the paper takes the expected loss over the EOT samples ("get expected loss over them for
each attack step"), i.e. the mean gradient (``eot_reduce="mean"``, the default). ADP's ``bpda_strong.py`` instead
sums one foolbox sign step per EOT sample and takes the sign of the sum, a majority vote of signs
(``eot_reduce="sign_vote"``), which is weaker when the samples disagree.
"""

from __future__ import annotations

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction
from attacks_adaptive.losses import LOSSES

EOT_REDUCTIONS = ("mean", "sign_vote")


class BPDAEOT(Attack):
    """PGD whose gradient passes the purifier as the identity (its ``bpda`` mode), averaged over EOT samples.

    :param eot: stochastic purifications per gradient (15 in ADP's protocol).
    :param step: step size; ``None`` is ``eps / 4``.
    :param eot_reduce: ``"mean"`` (paper: gradient of the expected loss) or ``"sign_vote"`` (ADP's code).
    :param loss: ``"ce"``, ``"dlr"`` or ``"margin"``.

    (The other parameters are :class:`attacks_adaptive.base.Attack`'s; there is no random start, as in the protocol.)
    """

    name = "BPDA+EOT"
    attack_params = Attack.attack_params + ["eot", "step", "eot_reduce", "loss"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 40, eot: int = 15,
                 step: float | None = None, eot_reduce: str = "mean", loss: str = "ce", **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.eot = eot
        self.step = step
        self.eot_reduce = eot_reduce
        self.loss = loss
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("eot", self.eot)
        self._check_step()
        if self.eot_reduce not in EOT_REDUCTIONS:
            raise ValueError(f"eot_reduce must be one of {EOT_REDUCTIONS}, got {self.eot_reduce!r}.")
        self._check_loss(self.loss)

    def gradient_description(self) -> str:
        return "bpda" if self.model.stochastic else "none"

    def _attack(self, x, y):
        def direction(x_i):
            grad, _, _ = self.model.loss_gradient(x_i, y, LOSSES[self.loss], self.eot, reduce=self.eot_reduce,
                                                  max_rows=self.max_rows, gradient="bpda")
            return ascent_direction(grad, self.norm)

        return self._ascend(x, x, self.step_size, direction)
