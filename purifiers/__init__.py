"""Score/diffusion-based adversarial purifiers as ART preprocessors.

Public names: :func:`load_prior` and the prior backends, :class:`PurifierPyTorch` (the shared ART wrapper base) and
:class:`PurifiedClassifier`; the purifiers (ADP, ScoreOpt, COUP, DiffPure) and their ART wrappers.
"""

from purifiers.art_base import PurifiedClassifier, PurifierPyTorch, straight_through
from purifiers.conventions import DDPMSchedule, VPSchedule
from purifiers.priors import (DenoiserPrior, EDMDenoiser, EpsilonPrior, GaussianPrior, NFECounter, Prior, load_prior)

__all__ = ["load_prior", "Prior", "GaussianPrior", "EDMDenoiser", "EpsilonPrior", "DenoiserPrior", "NFECounter",
           "VPSchedule", "DDPMSchedule", "PurifierPyTorch", "PurifiedClassifier", "straight_through"]
