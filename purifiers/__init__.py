"""Score/diffusion-based adversarial purifiers as ART preprocessors.

Public names: :func:`load_prior` and the prior backends; :class:`PurifierPyTorch` (the shared ART wrapper base) and
:class:`PurifiedClassifier`; the purifiers ADP, ScoreOpt, COUP, DiffPure (pure torch) and their ART wrappers
ADPPyTorch, ScoreOptPyTorch, COUPPyTorch, DiffPurePyTorch; one-shot denoising for denoised smoothing (OneShotDenoiser,
OneShotPyTorch). The purifiers load lazily on first access.
"""

import importlib

from purifiers.art_base import PurifiedClassifier, PurifierPyTorch, gradient_mode, straight_through
from purifiers.conventions import DDPMSchedule, VPSchedule
from purifiers.priors import (DenoiserPrior, EDMDenoiser, EpsilonPrior, GaussianPrior, NCSNv2Prior, NFECounter, Prior,
                              VEScorePrior, load_prior)

_LAZY = {"ADP": "purifiers.adp", "ADPPyTorch": "purifiers.adp_pytorch",
         "ScoreOpt": "purifiers.scoreopt", "ScoreOptPyTorch": "purifiers.scoreopt_pytorch",
         "COUP": "purifiers.vpsde", "DiffPure": "purifiers.vpsde",
         "COUPPyTorch": "purifiers.vpsde_pytorch", "DiffPurePyTorch": "purifiers.vpsde_pytorch",
         "OneShotDenoiser": "purifiers.one_shot", "OneShotPyTorch": "purifiers.one_shot"}

__all__ = ["load_prior", "Prior", "GaussianPrior", "EDMDenoiser", "EpsilonPrior", "DenoiserPrior", "VEScorePrior",
           "NCSNv2Prior", "NFECounter",
           "VPSchedule", "DDPMSchedule", "PurifierPyTorch", "PurifiedClassifier", "gradient_mode", "straight_through", *_LAZY]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'purifiers' has no attribute {name!r}")
