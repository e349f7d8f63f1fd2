"""ScoreOpt as an ART preprocessor (``PreprocessorPyTorch``), with three ways to take a gradient through it.

| Paper link: https://arxiv.org/abs/2307.04333

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420 (Athalye et al.), https://arxiv.org/abs/1902.06705 (Carlini et al.) and
  https://arxiv.org/abs/2202.13711 (Croce et al.).
"""

from __future__ import annotations

import logging

from torch import Tensor

from purifiers.art_base import AlgorithmSetting, PurifierPyTorch, gradient_mode
from purifiers.priors.backends import Prior
from purifiers.priors.loading import load_prior
from purifiers.scoreopt import ScoreOpt

logger = logging.getLogger(__name__)


class ScoreOptPyTorch(PurifierPyTorch):
    """ScoreOpt-O / ScoreOpt-N purification (Zhang, Luo, Zhang 2023) in front of a classifier, in ART.

    | Paper link: https://arxiv.org/abs/2307.04333

    | Please keep in mind the limitations of defences. While adversarial purification can be effective against
      attacks that ignore it, it can be evaded by adaptive attacks; see https://arxiv.org/abs/1802.00420 and
      https://arxiv.org/abs/1902.06705. The paper's robustness numbers use the ``bpda`` and ``surrogate`` gradients;
      its PGD+EOT numbers fell to about 59% under a stronger evaluation.

    Gradient modes (``gradient=``), used by ``PyTorchClassifier.loss_gradient`` and the attacks built on it:

    * ``"bpda"``: straight-through identity (Athalye et al. 2018): the classifier's gradient at the purified point;
    * ``"surrogate"``: autograd through the one-shot denoiser ``D(x + sigma_0 eps; sigma_0)``, sigma_0 the centre of
      the noise range, the surrogate the authors attacked with PGD+EOT (§4.2.2); its value is that denoised image;
    * ``"exact"``: autograd through the whole unrolled optimisation, every step's gradient taken with
      ``create_graph=True`` and Adam's update differentiated, each step checkpointed (``checkpoint_steps``).

    With ``eot_samples = k`` a gradient call purifies each input ``k`` times with independent noise and averages.
    Prior evaluations are counted in ``algorithm.prior.nfe`` (forward and backward separately; see
    :meth:`purifiers.PurifiedClassifier.nfe_per_image`): per image, ScoreOpt-O with the Diff or MSE loss costs M
    forward and M backward passes (SR: 2M forward); ScoreOpt-N costs M(N + 1) forward (SR: M(2N + 1)) and MN backward.
    An ``exact`` gradient adds the checkpoint recomputation (the forward and backward passes again) and one
    second-order backward per step.

    :param prior: a :class:`purifiers.Prior`, or a source :func:`purifiers.load_prior` accepts (e.g. a path).
    :param variant: ``"O"`` (Algorithm 1) or ``"N"`` (Algorithm 2).
    :param loss: ``"diff"`` (eq. 6), ``"mse"`` (eq. 7, with ``mse_lambda``) or ``"sr"`` (eq. 8).
    :param steps: M; ``None`` for the paper's Table 10 default of the variant (O: 5, N: 1).
    :param inner_steps: N of ScoreOpt-N; ``None`` for Table 10's 5 (ScoreOpt-O: 1).
    :param lr: learning rate on the [-1, 1] scale; ``None`` for Table 10's 0.1.
    :param noise_range: ``(sigma_min, sigma_max)``, EDM sigma on [-1, 1]; ``None`` for Table 10's (O: (0.4, 0.6),
        N: (0.5, 0.5)). Pixel sigma on [0, 1] images is half of it.
    :param mse_lambda: lambda of eq. (7).
    :param sr_lambda: weight of the SR term (the paper's eq. 8 has 1).
    :param optimizer: ``"adam"`` (default, the paper's App. C.5) or ``"gd"`` (Algorithms 1-2 as printed).
    :param n_target: ScoreOpt-N's target, ``"reparametrised"`` (§3.3 and the reference code, default) or ``"outer"``
        (Algorithm 2's pseudo-code taken literally, which reproduces its input; see :mod:`purifiers.scoreopt`).
    :param checkpoint_steps: checkpoint the unrolled loop in the ``exact`` mode.
    :param gradient: ``"bpda"``, ``"surrogate"`` or ``"exact"``.
    :param eot_samples: purifications averaged per input in a gradient call.
    :param clip_values: must be ``(0, 1)``.
    :param channels_first: ``True`` for NCHW input, ``False`` for NHWC.
    :param batch_size: images purified at once in ``predict``.
    :param verbose: progress bar over batches.
    :param seed: seed of the purifier's own per-image noise streams (``None``: torch's global generator).
    :param device_type, channels_last, compile, amp, batch_invariant: see :class:`purifiers.PurifierPyTorch`.
    """

    ALGORITHM_PARAMS = ("variant", "loss", "steps", "inner_steps", "lr", "noise_range", "mse_lambda", "sr_lambda",
                        "optimizer", "n_target", "checkpoint_steps")
    params = PurifierPyTorch.params + list(ALGORITHM_PARAMS)

    variant = AlgorithmSetting("``ScoreOpt.variant`` of the wrapped algorithm.")
    loss = AlgorithmSetting("``ScoreOpt.loss`` of the wrapped algorithm.")
    steps = AlgorithmSetting("``ScoreOpt.steps`` of the wrapped algorithm.")
    inner_steps = AlgorithmSetting("``ScoreOpt.inner_steps`` of the wrapped algorithm.")
    lr = AlgorithmSetting("``ScoreOpt.lr`` of the wrapped algorithm.")
    noise_range = AlgorithmSetting("``ScoreOpt.noise_range`` of the wrapped algorithm.")
    mse_lambda = AlgorithmSetting("``ScoreOpt.mse_lambda`` of the wrapped algorithm.")
    sr_lambda = AlgorithmSetting("``ScoreOpt.sr_lambda`` of the wrapped algorithm.")
    optimizer = AlgorithmSetting("``ScoreOpt.optimizer`` of the wrapped algorithm.")
    n_target = AlgorithmSetting("``ScoreOpt.n_target`` of the wrapped algorithm.")
    checkpoint_steps = AlgorithmSetting("``ScoreOpt.checkpoint_steps`` of the wrapped algorithm.")

    def __init__(self, prior, *, variant: str = "O", loss: str = "diff", steps: int | None = None,
                 inner_steps: int | None = None, lr: float | None = None,
                 noise_range: tuple[float, float] | None = None, mse_lambda: float = 1.0, sr_lambda: float = 1.0,
                 optimizer: str = "adam", n_target: str = "reparametrised", checkpoint_steps: bool = True,
                 gradient: str = "bpda", eot_samples: int = 1, clip_values: tuple[float, float] = (0.0, 1.0),
                 channels_first: bool = True, batch_size: int = 128, verbose: bool = False, seed: int | None = None,
                 device_type: str | None = None, channels_last: bool = False, compile: bool | dict = False,
                 amp: str | None = None, batch_invariant: bool = False):
        prior = prior if isinstance(prior, Prior) else load_prior(prior)
        algorithm = ScoreOpt(prior, variant=variant, loss=loss, steps=steps, inner_steps=inner_steps, lr=lr,
                             noise_range=noise_range, mse_lambda=mse_lambda, sr_lambda=sr_lambda, optimizer=optimizer,
                             n_target=n_target, checkpoint_steps=checkpoint_steps)
        super().__init__(algorithm, gradient=gradient, eot_samples=eot_samples, clip_values=clip_values,
                         channels_first=channels_first, batch_size=batch_size, verbose=verbose, seed=seed,
                         device_type=device_type, channels_last=channels_last, compile=compile, amp=amp,
                         batch_invariant=batch_invariant)

    @gradient_mode("surrogate")
    def _surrogate(self, x: Tensor, generator) -> Tensor:
        return self.algorithm._one_shot_surrogate(x, generator)

    @gradient_mode("exact")
    def _exact(self, x: Tensor, generator) -> Tensor:
        return self.algorithm.purify_unchecked(x, generator)
