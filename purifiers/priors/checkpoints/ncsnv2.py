"""``ncsnv2``: the ``checkpoint*.pth`` of ermongroup/ncsnv2 (Song & Ermon 2020), as ADP uses: a list
``[state_dict, optimizer, epoch, step, ema]``, ``module.`` keys, the EMA a dict keyed by unprefixed names.
"""

from __future__ import annotations

from torch import nn

from purifiers.priors.backends import NCSNv2Prior, Prior
from purifiers.priors.checkpoints.common import (describe_mismatch, given_config, is_state_dict, load_strict,
                                                 strip_prefix)
from purifiers.priors.checkpoints.registry import CheckpointFormat, register_format


def _is_ncsnv2(obj) -> bool:
    # The reference saves a DataParallel state_dict ("module." keys); a re-saved bare one is accepted too.
    return (isinstance(obj, (list, tuple)) and len(obj) >= 4 and is_state_dict(obj[0])
            and {"sigmas", "begin_conv.weight"} <= set(strip_prefix(obj[0])))


def _ncsnv2_config(config, state: dict):
    from purifiers.nets import ncsnv2

    given = given_config(config, ncsnv2.NCSNv2Config, ncsnv2.named_config, "NCSNv2")
    if given is not None:
        return given
    # Infer the sizes from the weights; the data flags (logit_transform, rescaled) keep the reference configs' default
    # (data on [0, 1]), as every released NCSNv2 config has them.
    conv, sigmas = state["begin_conv.weight"], state["sigmas"]
    return ncsnv2.NCSNv2Config(ngf=conv.shape[0], channels=conv.shape[1], num_classes=len(sigmas),
                               sigma_begin=float(sigmas[0]), sigma_end=float(sigmas[-1])), "inferred from the weights"


def _load_ncsnv2(obj, config, ema: bool) -> Prior:
    from purifiers.nets.ncsnv2 import NCSNv2

    state = strip_prefix(obj[0])
    cfg, config_name = _ncsnv2_config(config, state)
    # The sigmas buffer is part of the checkpoint; it overrides the config's (equal up to float rounding).
    net = load_strict(lambda: NCSNv2(cfg), state, f"ncsnv2 ({config_name})")
    weights = "model"
    if ema and len(obj) >= 5 and isinstance(obj[4], dict):
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in obj[4]]
        unexpected = [k for k in obj[4] if k not in dict(net.named_parameters())]
        if missing or unexpected:
            raise ValueError(f"ncsnv2 ({config_name}): the EMA entry does not match the network: "
                             f"{describe_mismatch(missing, unexpected, [])}.")
        net.load_state_dict(obj[4], strict=False)
        weights = "ema"
    elif ema:
        weights = "model (the checkpoint holds no EMA)"
    prior = _ncsnv2_prior(net, cfg)
    prior.provenance = {"config": config_name, "weights": weights, "step": int(obj[3])}
    return prior


def _ncsnv2_prior(net: nn.Module, cfg) -> Prior:
    return NCSNv2Prior(net, data_range="pm1" if cfg.rescaled else "01")


def _untrained(config: str) -> Prior:
    from purifiers.nets.ncsnv2 import NCSNv2, named_config

    cfg = named_config(config)
    return _ncsnv2_prior(NCSNv2(cfg), cfg)


register_format(CheckpointFormat(
    "ncsnv2", "ermongroup/ncsnv2 checkpoint*.pth: [state_dict, optimizer, epoch, step, ema]",
    matches=_is_ncsnv2, load=_load_ncsnv2, untrained=_untrained))
