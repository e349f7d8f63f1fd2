"""``score_sde``: the ``checkpoint_*.pth`` of yang-song/score_sde_pytorch (Song et al. 2021), as DiffPure and COUP use.

The container is ``{"model", "ema", "optimizer", "step"}``, model keys prefixed ``module.``, the EMA as
``ema["shadow_params"]``, a list over the trainable parameters in ``parameters()`` order. VP configs: network input
``999 t``, output epsilon, [-1, 1] data; VE configs: sigma input, output the score.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from purifiers.conventions import VPSchedule
from purifiers.priors.backends import EpsilonPrior, Prior, VEScorePrior
from purifiers.priors.checkpoints.common import (build_on_meta, describe_mismatch, given_config, is_state_dict,
                                                 load_strict, mismatch, strip_prefix)
from purifiers.priors.checkpoints.registry import CheckpointFormat, register_format


def _is_score_sde(obj) -> bool:
    return (isinstance(obj, dict) and {"model", "ema", "step"} <= set(obj) and is_state_dict(obj["model"])
            and isinstance(obj["ema"], dict) and "shadow_params" in obj["ema"])


def _score_sde_config(config, state: dict):
    from purifiers.nets import score_sde

    given = given_config(config, score_sde.ScoreSDEConfig, score_sde.named_config, "score_sde")
    if given is not None:
        return given
    # Infer: the known config whose names and shapes all match (VP and VE NCSN++ differ by the Fourier embedding).
    reports = {}
    for name, candidate in score_sde.CONFIGS.items():
        differences = mismatch(build_on_meta(partial(score_sde.NCSNpp, candidate)), state)
        if not any(differences):
            return candidate, name
        reports[name] = differences
    closest = min(reports, key=lambda n: sum(map(len, reports[n])))
    raise ValueError(f"score_sde checkpoint: no known config ({', '.join(score_sde.CONFIGS)}) matches its "
                     f"parameters; closest {closest}: {describe_mismatch(*reports[closest])}. Pass config= (a name, "
                     "or a JSON/YAML file of the reference config's model and data fields) for another network.")


def _load_score_sde(obj: dict, config, ema: bool) -> Prior:
    from purifiers.nets.score_sde import NCSNpp

    state = strip_prefix(obj["model"])
    cfg, config_name = _score_sde_config(config, state)
    net = load_strict(lambda: NCSNpp(cfg), state, f"score_sde ({config_name})")
    weights = "model"
    if ema:
        shadow = obj["ema"]["shadow_params"]
        # The EMA list follows parameters() over the trainable parameters only (not the frozen Fourier W).
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        if len(shadow) != len(trainable):
            raise ValueError(f"score_sde ({config_name}): ema['shadow_params'] holds {len(shadow)} tensors for "
                             f"{len(trainable)} trainable parameters; the EMA does not belong to this network.")
        bad = [n for (n, p), s in zip(trainable, shadow) if tuple(p.shape) != tuple(s.shape)]
        if bad:
            raise ValueError(f"score_sde ({config_name}): ema['shadow_params'] shapes differ from the parameters "
                             f"(first: {bad[:5]}).")
        with torch.no_grad():
            for (_, p), s in zip(trainable, shadow):
                p.copy_(s)
        weights = "ema"
    prior = _score_sde_prior(net, cfg)
    prior.provenance = {"config": config_name, "weights": weights, "step": int(obj["step"])}
    return prior


def _score_sde_prior(net: nn.Module, cfg) -> Prior:
    if cfg.sde == "vpsde":
        return EpsilonPrior.vp(net, VPSchedule(cfg.beta_min, cfg.beta_max), time_scale=999.0)
    return VEScorePrior(net, data_range="pm1" if cfg.centered else "01")


def _untrained(config: str) -> Prior:
    from purifiers.nets.score_sde import NCSNpp, named_config

    cfg = named_config(config)
    return _score_sde_prior(NCSNpp(cfg), cfg)


register_format(CheckpointFormat(
    "score_sde", "yang-song/score_sde_pytorch checkpoint_*.pth: {model, ema, optimizer, step}",
    matches=_is_score_sde, load=_load_score_sde, untrained=_untrained))
