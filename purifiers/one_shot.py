"""One-shot denoising, the denoiser of denoised smoothing, and its ART wrapper.

| Paper link (one-shot diffusion denoiser): https://arxiv.org/abs/2206.10550 (Carlini, Tramer, Dvijotham, Rice, Sun,
  Kolter, "(Certified!!) Adversarial Robustness for Free!", ICLR 2023)
| Paper link (denoised smoothing): https://arxiv.org/abs/2003.01908 (Salman, Sun, Yang, Kapoor, Kolter, NeurIPS 2020)

Denoised smoothing (Salman et al. 2020, section 3) puts a denoiser in front of an off-the-shelf classifier ``f`` and
smooths the composition: ``g(x) = argmax_c P(f(D(x + delta)) = c)``, ``delta ~ N(0, sigma^2 I)`` (Cohen et al. 2019's
randomized smoothing, https://arxiv.org/abs/1902.02918). Carlini et al. (2023, section 3, Algorithm 1) take ``D`` to
be one step of a diffusion model at the time ``t`` whose noise level equals the smoothing ``sigma``: with
``x_t = sqrt(a_t) (x + delta)`` and ``sigma^2 = (1 - a_t) / a_t`` the model's one-step estimate of the clean image is
the posterior mean. Every prior of this package already is that posterior-mean denoiser ``D(x, sigma)`` on [0, 1]
images at a pixel ``sigma`` (:mod:`purifiers.priors.backends`; the [-1, 1] networks double sigma internally, the
factor 2 of Carlini et al.'s section 3), so the one-shot denoiser at smoothing ``sigma`` is ``x -> D(x, sigma)``,
applied to the noisy ``x + delta`` that ART's randomized smoothing hands its preprocessing defences
(``art.estimators.certification.randomized_smoothing.RandomizedSmoothingMixin._noisy_samples``: Gaussian noise of
std ``scale`` on the classifier's input scale, [0, 1] here, added before the defences run).

What a certificate of such a pipeline covers is the smoothed classifier ``g``, not a purifier deployed without the
smoothing noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from purifiers.art_base import AlgorithmSetting, PurifierPyTorch, gradient_mode
from purifiers.priors.backends import Prior
from purifiers.validation import check_images

Tensor = torch.Tensor

#: The input range the one-shot denoiser accepts is [0, 1] widened by this many smoothing sigmas on each side: the
#: noisy images of randomized smoothing (a pixel of ``N(0, 1)`` noise leaves 8 sigmas with probability ~1e-15), while
#: 0-255 images are still refused.
NOISE_SIGMAS = 8.0


class OneShotDenoiser(nn.Module):
    """``x -> clamp(D(x, sigma), 0, 1)``: one denoiser call at the smoothing noise level (Carlini et al. 2023,
    Algorithm 1, with the prior's own ``D``); deterministic, so the ``generator`` argument is unused.

    :param prior: the denoiser ``D(x, sigma)`` (:func:`purifiers.load_prior`).
    :param sigma: the smoothing noise level in [0, 1] pixel units (ART's ``scale``).
    """

    def __init__(self, prior: Prior, sigma: float = 0.25):
        super().__init__()
        self.prior = prior
        self.sigma = sigma
        self.check_params()

    def check_params(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not math.isfinite(self.sigma) \
                or self.sigma <= 0:
            raise ValueError(f"sigma must be a positive finite number (the smoothing noise level in [0, 1] pixel "
                             f"units), got {self.sigma!r}.")

    @property
    def input_range(self) -> tuple[float, float]:
        """[0, 1] widened by :data:`NOISE_SIGMAS` smoothing sigmas."""
        return -NOISE_SIGMAS * self.sigma, 1.0 + NOISE_SIGMAS * self.sigma

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_images(x, name="one-shot denoiser input", value_range=self.input_range)
        return self.purify_unchecked(x, generator)

    def purify_unchecked(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.denoise_unchecked(x, float(self.sigma)).clamp(0.0, 1.0)


class OneShotPyTorch(PurifierPyTorch):
    """One-shot denoising (:class:`OneShotDenoiser`) as an ART ``PreprocessorPyTorch``, the denoiser of denoised
    smoothing: ``PyTorchRandomizedSmoothing(model, ..., scale=sigma, preprocessing_defences=[OneShotPyTorch(prior,
    sigma=sigma)])`` is Carlini et al.'s (2023) certified classifier, certified with ART's ``certify``.

    Gradient modes (``gradient``):

    * ``"exact"``: backpropagation through the denoiser network (the purification is one deterministic call);
    * ``"bpda"``: the value is the denoised image, the backward pass the identity (Athalye et al. 2018).

    It accepts the noisy inputs of randomized smoothing: [0, 1] widened by :data:`NOISE_SIGMAS` sigmas.

    | Please keep in mind the limitations of defences (see :mod:`purifiers.art_base`): a certificate of the smoothed
      classifier is not a robustness statement about the denoiser used without the smoothing noise.

    :param prior: the denoiser ``D(x, sigma)`` (:func:`purifiers.load_prior`).
    :param sigma: the smoothing noise level in [0, 1] pixel units; must equal the smoothing's ``scale``.
    :param wrapper-options: ``gradient``, ``eot_samples``, ``clip_values``, ``channels_first``, ``batch_size``,
        ``verbose``, ``seed``, ``device_type``, ``channels_last``, ``compile``, ``amp``, ``batch_invariant``: see
        :class:`purifiers.PurifierPyTorch`.
    """

    params = PurifierPyTorch.params + ["sigma"]

    sigma = AlgorithmSetting("the smoothing noise level in [0, 1] pixel units")

    def __init__(self, prior: Prior, sigma: float = 0.25, *, gradient: str = "exact", **kwargs):
        super().__init__(OneShotDenoiser(prior, sigma=sigma), gradient=gradient, **kwargs)

    @property
    def input_range(self) -> tuple[float, float]:
        return self.algorithm.input_range

    @gradient_mode("exact")
    def _exact(self, x: Tensor, generator) -> Tensor:
        return self.algorithm.purify_unchecked(x, generator)
