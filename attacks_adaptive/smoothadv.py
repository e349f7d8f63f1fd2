"""SmoothAdv: PGD on a smoothed classifier, the attack side of the certified bracket.

Salman, Yang, Li, Zhang, Zhang, Razenshteyn, Bubeck, "Provably Robust Deep Learning via Adversarially Trained
Smoothed Classifiers" (NeurIPS 2019, https://arxiv.org/abs/1906.04584), section 3, eq. (S) and its Monte-Carlo form:
the smoothed soft classifier ``G(x)_y = E_delta softmax(f(x + delta))_y``, ``delta ~ N(0, sigma^2 I)``, is attacked by
``l_2`` PGD on::

    J(x') = -log( (1/m) sum_{i=1..m} softmax(f(x' + delta_i))_y ),

``m`` noise draws per step (drawn afresh at every step), steps ``x' <- P(x' + alpha grad J / ||grad J||_2)`` with
``alpha = 2 eps / T`` unless given (Salman et al.'s step rule), no random start. Here ``f`` is the denoised-smoothing
base classifier ``classifier(purifier(.))`` (Salman et al., NeurIPS 2020, https://arxiv.org/abs/2003.01908): the noise
goes in front of the purifier, as ART's ``certify`` and ``predict`` put it
(``RandomizedSmoothingMixin._noisy_samples`` before the preprocessing defences), and the gradient passes through the
purifier's gradient mode (``exact`` through the denoiser, ``bpda``, a surrogate). ART's own sampled loss gradient
(``PyTorchRandomizedSmoothing.loss_gradient(sampling=True)``) adds its noise after the preprocessing defences, the
other order, so it is not used.
"""

from __future__ import annotations

import math

import torch

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction


class SmoothAdv(Attack):
    """SmoothAdv-PGD (Salman et al. 2019) on the smoothed classifier of a denoised-smoothing pipeline.

    :param target: the smoothed classifier, an ART ``PyTorchRandomizedSmoothing`` whose first preprocessing defence is
        a :class:`purifiers.PurifierPyTorch` (or any target of :class:`attacks_adaptive.base.Attack`, with ``sigma``).
    :param sigma: the smoothing noise level (pixel units); ``None`` takes the target's ``scale`` (ART's).
    :param samples: ``m``, noise draws per step.
    :param step: the ``l_2`` step; ``None`` is ``2 eps / steps``.
    :param gradient: the purifier's gradient mode (``None``: its current one).

    ``norm`` must be ``"l2"``: Gaussian smoothing certifies ``l_2`` radii. (The other parameters are
    :class:`attacks_adaptive.base.Attack`'s.)
    """

    name = "SmoothAdv"
    attack_params = Attack.attack_params + ["sigma", "samples", "step", "gradient"]
    default_step_text = "2 eps / steps"

    def __init__(self, target, *, eps: float, sigma: float | None = None, norm: str = "l2", steps: int = 20,
                 samples: int = 8, step: float | None = None, gradient: str | None = None, **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.sigma = getattr(target, "scale", None) if sigma is None else sigma
        self.samples = samples
        self.step = step
        self.gradient = gradient
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        if self.norm != "l2":
            raise ValueError(f"SmoothAdv attacks an l_2 threat model (Gaussian smoothing certifies l_2 radii), got "
                             f"norm={self.norm!r}.")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) \
                or not math.isfinite(self.sigma) or self.sigma <= 0:
            raise ValueError(f"sigma must be a positive number (the smoothing noise level; the target has no "
                             f"'scale' to take it from), got {self.sigma!r}.")
        self._check_positive_int("samples", self.samples)
        self._check_step()
        self.model.check_gradient_mode(self.gradient)

    @property
    def step_size(self) -> float:
        return self.step or 2.0 * self.eps / self.steps

    def gradient_description(self) -> str:
        return self.gradient or self.model.gradient

    def smoothed_loss_gradient(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``grad J`` at ``x`` (one row per input): ``m`` noisy copies of each input in one batched pass through the
        purifier's gradient mode and the classifier, chunked to ``max_rows`` rows."""
        m = self.samples
        per_chunk = max(1, self.max_rows // m)
        grads = []
        for i in range(0, x.shape[0], per_chunk):
            x_i = x[i:i + per_chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                rows = x_i.repeat_interleave(m, dim=0)
                noise = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
                logits = self.model.purified_logits(rows + self.sigma * noise, True, self.gradient)
                soft = logits.softmax(-1).view(x_i.shape[0], m, -1).mean(1)
                loss = -soft.gather(1, y[i:i + per_chunk, None]).clamp_min(1e-20).log().sum()
                (g,) = torch.autograd.grad(loss, x_i)
            grads.append(g)
        return torch.cat(grads)

    def _attack(self, x, y):
        generator = self._generator(x.device)
        return self._ascend(x, x, self.step_size,
                            lambda x_i: ascent_direction(self.smoothed_loss_gradient(x_i, y, generator), "l2"))
