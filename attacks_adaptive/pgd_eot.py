"""Full-gradient PGD+EOT: the evaluation of Lee & Kim (2023) that halved the robustness claimed for diffusion
purifiers.

Lee & Kim, "Robust Evaluation of Diffusion-Based Adversarial Purification" (ICCV 2023,
https://arxiv.org/abs/2303.09051): PGD with the gradient of the whole stochastic purification (ADP Table 1, "Full
gradient": ``grad_x L((g o f)(x), y)|_{x = x_i}``), averaged over 20 EOT samples, then ``sign``; 200 iterations of
step 0.007 at ``l_inf`` 8/255, no random start. Here the step scales with ``eps`` (``0.007 * eps / (8/255)``), so the
same protocol applies to MNIST's 0.3.

The purifier's ``gradient`` mode says how the gradient goes through it: ``exact`` backpropagates through the actual
computation with its noise fixed per EOT sample; a ``surrogate`` mode backpropagates through a cheaper stand-in (Lee &
Kim's coarse solver, ScoreOpt's one-shot denoiser), which is often the stronger attack. ``gradient=None`` keeps the
purifier's current mode.
"""

from __future__ import annotations

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction
from attacks_adaptive.losses import LOSSES

LEE_KIM_STEP_PER_EPS = 0.007 / (8 / 255)


class PGDEOT(Attack):
    """PGD on the EOT-averaged gradient through the purifier's ``gradient`` mode (Lee & Kim 2023).

    :param gradient: the purifier's gradient mode (``"exact"``, a surrogate mode, or ``None`` to keep its current one).
    :param eot: stochastic purifications per gradient (20 in Lee & Kim).
    :param step: step size; ``None`` is ``0.007 * eps / (8/255)``.
    :param loss: ``"ce"`` (Lee & Kim), ``"dlr"`` or ``"margin"``.

    (The other parameters are :class:`attacks_adaptive.base.Attack`'s; there is no random start, as in the protocol.)
    """

    name = "PGD+EOT"
    default_step_per_eps = LEE_KIM_STEP_PER_EPS
    default_step_text = "Lee & Kim's 0.007 at 8/255, scaled"
    attack_params = Attack.attack_params + ["gradient", "eot", "step", "loss"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 200, eot: int = 20,
                 gradient: str | None = "exact", step: float | None = None, loss: str = "ce", **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.gradient = gradient
        self.eot = eot
        self.step = step
        self.loss = loss
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("eot", self.eot)
        self._check_step()
        self._check_loss(self.loss)
        self.model.check_gradient_mode(self.gradient)

    def gradient_description(self) -> str:
        if not self.model.stochastic:
            return "none"
        return self.gradient or self.model.gradient


    def _attack(self, x, y):
        def direction(x_i):
            grad, _, _ = self.model.loss_gradient(x_i, y, LOSSES[self.loss], self.eot, max_rows=self.max_rows,
                                                  gradient=self.gradient)
            return ascent_direction(grad, self.norm)

        return self._ascend(x, x, self.step_size, direction)
