"""ADP (Yoon, Hwang, Lee, ICML 2021) as an ART preprocessor: ``PyTorchClassifier(..., preprocessing_defences=[ADPPyTorch(...)])``.

| Paper link: https://arxiv.org/abs/2106.06041

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420, https://arxiv.org/abs/1902.06705 and https://arxiv.org/abs/2202.13711.
"""

from __future__ import annotations

import logging

from torch import Tensor

from purifiers.adp import ADP, DEFAULT_CONDITIONING, NOISY_INPUT_RANGE, PAPER_LAMBDA, PAPER_STEPS, PAPER_TAU
from purifiers.art_base import AlgorithmSetting, PurifierPyTorch, gradient_mode
from purifiers.priors.backends import Prior

logger = logging.getLogger(__name__)

ALGORITHM_PARAMS = ("sigma", "steps", "lam", "delta", "tau", "step_rule", "conditioning", "sigma_range",
                    "step_size_gradient", "checkpoint_steps", "detection_threshold", "beta", "detection_sigma")


class ADPPyTorch(PurifierPyTorch):
    """Adaptive Denoising Purification (:class:`purifiers.ADP`, Algorithm 1 of the paper) as an ART
    ``PreprocessorPyTorch``.

    Gradient modes (``gradient``), used inside ``forward`` whenever ART takes a gradient:

    * ``"bpda"``: the value is the purified image, the backward pass is the identity (Athalye et al. 2018);
    * ``"exact"``: backpropagation through every purification step (each score evaluation checkpointed, so memory
      does not grow with ``steps``); step sizes are constants of the backward pass as in Croce et al. (2022), or
      differentiated with ``step_size_gradient=True``.

    ``eot_samples=k`` averages the gradient over k independent purifications (the batch is expanded only while a
    gradient is taken). The S-run ensemble of eq. (13) is :class:`purifiers.PurifiedClassifier` with ``runs=S``.

    | Please keep in mind the limitations of defences (see the module docstring).

    :param prior: the score prior (:func:`purifiers.load_prior`).
    :param hyper-parameters: ``sigma``, ``steps``, ``lam``, ``delta``, ``tau``, ``step_rule``, ``conditioning``,
        ``sigma_range``, ``step_size_gradient``, ``checkpoint_steps``, ``detection_threshold``, ``beta``,
        ``detection_sigma``: the algorithm's hyper-parameters, see :class:`purifiers.ADP`.
    :param noisy_inputs: accept inputs that carry additive noise, outside [0, 1] (as ART's randomized smoothing
        produces: ``NumpyRandomizedSmoothing(PyTorchClassifier(..., preprocessing_defences=[ADPPyTorch(...,
        noisy_inputs=True)]))``); 0-255 images are still rejected. ADP clips ``x + noise`` to [0, 1] first.
    :param wrapper-options: ``gradient``, ``eot_samples``, ``clip_values``, ``channels_first``, ``batch_size``,
        ``verbose``, ``seed``, ``device_type``, ``channels_last``, ``compile``, ``amp``, ``batch_invariant``: see
        :class:`purifiers.PurifierPyTorch`.
    """

    params = PurifierPyTorch.params + list(ALGORITHM_PARAMS) + ["noisy_inputs"]

    sigma = AlgorithmSetting()
    steps = AlgorithmSetting()
    lam = AlgorithmSetting()
    delta = AlgorithmSetting()
    tau = AlgorithmSetting()
    step_rule = AlgorithmSetting()
    conditioning = AlgorithmSetting()
    sigma_range = AlgorithmSetting()
    step_size_gradient = AlgorithmSetting()
    checkpoint_steps = AlgorithmSetting()
    detection_threshold = AlgorithmSetting()
    beta = AlgorithmSetting()
    detection_sigma = AlgorithmSetting()

    def __init__(self, prior: Prior, sigma: float = 0.25, steps: int = PAPER_STEPS, lam: float = PAPER_LAMBDA,
                 delta: float | None = None, tau: float = PAPER_TAU, step_rule: str = "paper",
                 conditioning: str = DEFAULT_CONDITIONING, sigma_range: tuple[float, float] = (0.01, 1.0),
                 step_size_gradient: bool = False, checkpoint_steps: bool = True,
                 detection_threshold: float | None = None, beta: float = 0.2, detection_sigma: float = 0.1,
                 noisy_inputs: bool = False, *, gradient: str = "bpda", eot_samples: int = 1, clip_values: tuple[float, float] = (0.0, 1.0),
                 channels_first: bool = True, batch_size: int = 128, verbose: bool = False, seed: int | None = None,
                 device_type: str | None = None, channels_last: bool = False, compile: bool | dict = False,
                 amp: str | None = None, batch_invariant: bool = False):
        algorithm = ADP(prior, sigma=sigma, steps=steps, lam=lam, delta=delta, tau=tau, step_rule=step_rule,
                        conditioning=conditioning, sigma_range=sigma_range, step_size_gradient=step_size_gradient,
                        checkpoint_steps=checkpoint_steps, detection_threshold=detection_threshold, beta=beta,
                        detection_sigma=detection_sigma)
        super().__init__(algorithm, gradient=gradient, eot_samples=eot_samples, clip_values=clip_values,
                         channels_first=channels_first, batch_size=batch_size, verbose=verbose, seed=seed,
                         device_type=device_type, channels_last=channels_last, compile=compile, amp=amp,
                         batch_invariant=batch_invariant)
        self.noisy_inputs = noisy_inputs

    @property
    def noisy_inputs(self) -> bool:
        return self.input_range == NOISY_INPUT_RANGE

    @noisy_inputs.setter
    def noisy_inputs(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"noisy_inputs must be a bool, got {value!r}.")
        self.input_range = NOISY_INPUT_RANGE if value else PurifierPyTorch.input_range

    @gradient_mode("exact")
    def _exact(self, x: Tensor, generator) -> Tensor:
        return self.algorithm.purify_unchecked(x, generator)
