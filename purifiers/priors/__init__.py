"""The prior layer: every score model behind one convention, a denoiser ``D(x, sigma)`` on [0, 1] images with sigma
in pixel units.

* :mod:`purifiers.priors.backends`: the :class:`Prior` family, one small wrapper per model parametrisation.
* :mod:`purifiers.priors.loading`: :func:`load_prior`, which picks the backend for a file, a folder, a module or a
  name.
* :mod:`purifiers.priors.checkpoints`: the authors' checkpoint formats, one registered module per format.
* :mod:`purifiers.priors.speed`: options of the prior's network (channels_last, torch.compile, mixed precision,
  batch-invariant blocks).
"""

from purifiers.priors.backends import (DenoiserPrior, EDMDenoiser, EpsilonPrior, GaussianPrior, NCSNv2Prior, NFECounter,
                                       Prior, VEScorePrior, load_state_dict_safely)
from purifiers.priors.loading import load_prior
from purifiers.priors.speed import SpeedOptions

__all__ = ["Prior", "GaussianPrior", "EDMDenoiser", "EpsilonPrior", "DenoiserPrior", "VEScorePrior", "NCSNv2Prior",
           "NFECounter", "load_state_dict_safely", "load_prior", "SpeedOptions"]
