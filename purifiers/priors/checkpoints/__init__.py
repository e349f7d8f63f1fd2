"""The authors' checkpoint containers, read without executing code and mapped onto :mod:`purifiers.priors`.

One module per format, each registering one :class:`CheckpointFormat` per container it reads (adding a format is one
module and one :func:`register_format` call):

* ``score_sde`` (:mod:`~purifiers.priors.checkpoints.score_sde`): ``checkpoint_*.pth`` of yang-song/score_sde_pytorch,
  as DiffPure and COUP use;
* ``ncsnv2`` (:mod:`~purifiers.priors.checkpoints.ncsnv2`): ``checkpoint*.pth`` of ermongroup/ncsnv2, as ADP uses;
* ``edm-pickle`` and ``edm-state-dict`` (:mod:`~purifiers.priors.checkpoints.edm`): NVlabs/edm's ``.pkl`` network
  pickles (restricted unpickler, :mod:`~purifiers.priors.checkpoints.edm_pickle`) and its networks' state_dicts, as
  ScoreOpt uses;
* ``guided-diffusion`` (:mod:`~purifiers.priors.checkpoints.guided_diffusion`): openai/guided-diffusion's ADM
  state_dicts, as DiffPure's ImageNet results use.
"""

from purifiers.priors.checkpoints.registry import (CARDS_DIR, FORMATS, CheckpointFormat, detect_format, find_card,
                                                   known_cards, load_checkpoint, read_config, register_format,
                                                   untrained_prior)

# Each format module registers itself on import; detection tries the formats in this order.
from purifiers.priors.checkpoints import score_sde  # noqa: E402,F401  isort:skip
from purifiers.priors.checkpoints import ncsnv2  # noqa: E402,F401  isort:skip
from purifiers.priors.checkpoints import edm  # noqa: E402,F401  isort:skip
from purifiers.priors.checkpoints import guided_diffusion  # noqa: E402,F401  isort:skip

__all__ = ["FORMATS", "CheckpointFormat", "register_format", "detect_format", "load_checkpoint", "read_config",
           "untrained_prior", "known_cards", "find_card", "CARDS_DIR"]
