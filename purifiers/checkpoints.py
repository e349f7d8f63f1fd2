"""The authors' checkpoint containers, read without executing code and mapped onto :mod:`purifiers.priors`.

Each format is one :class:`CheckpointFormat` in :data:`FORMATS`: a ``matches(obj)`` test on the object that
``torch.load(weights_only=True)`` returns and a ``load(obj, config, ema)`` that builds the network, loads the weights
strictly and wraps it in the :class:`~purifiers.priors.Prior` of its convention. Adding a format is one
:func:`register_format` call beside the others.

* ``score_sde``: ``checkpoint_*.pth`` of yang-song/score_sde_pytorch (Song et al. 2021), as DiffPure and COUP use:
  ``{"model", "ema", "optimizer", "step"}``, model keys prefixed ``module.``, the EMA as ``ema["shadow_params"]``, a
  list over the trainable parameters in ``parameters()`` order. VP configs: network input ``999 t``, output epsilon,
  [-1, 1] data; VE configs: sigma input, output the score.
* ``ncsnv2``: ``checkpoint*.pth`` of ermongroup/ncsnv2 (Song & Ermon 2020), as ADP uses: a list
  ``[state_dict, optimizer, epoch, step, ema]``, ``module.`` keys, the EMA a dict keyed by unprefixed names.
* ``edm-pickle``: NVlabs/edm's ``.pkl`` snapshots (Karras et al. 2022), as ScoreOpt uses, read by a restricted
  unpickler that executes nothing (:mod:`purifiers.edm_pickle`); ``edm-state-dict``: such a network's state_dict;
  ``guided-diffusion``: openai/guided-diffusion's ADM state_dicts (Dhariwal & Nichol 2021), as DiffPure's ImageNet
  results use (:mod:`purifiers.formats_edm_adm`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from purifiers.conventions import VPSchedule
from purifiers.priors import EpsilonPrior, NCSNv2Prior, Prior, VEScorePrior, load_state_dict_safely


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    description: str
    matches: Callable[[object], bool]
    load: Callable[[object, object, bool], Prior]  # (loaded object, config or None, use the EMA weights) -> Prior


FORMATS: dict[str, CheckpointFormat] = {}


def register_format(name: str, description: str, matches: Callable[[object], bool],
                    load: Callable[[object, object, bool], Prior]) -> None:
    FORMATS[name] = CheckpointFormat(name, description, matches, load)


def detect_format(obj) -> str | None:
    """The name of the first registered format whose ``matches`` accepts ``obj``, or None."""
    return next((fmt.name for fmt in FORMATS.values() if fmt.matches(obj)), None)


def load_checkpoint(path: str, *, format: str | None = None, config=None, ema: bool = True) -> Prior:
    """Read ``path`` safely, detect (or check) its format and return its prior, with ``describe()`` naming the format,
    config and weights.

    :param format: a name of :data:`FORMATS`; detected when None.
    :param config: the network config: a known config name, a path to a JSON or YAML file (safe YAML only), or a dict;
        when None it is inferred from the checkpoint's parameter names and shapes.
    :param ema: use the EMA weights the container holds (the weights the authors sample and evaluate with).
    """
    if format == EDM_PICKLE or (format is None and path.endswith(".pkl")):
        from purifiers.formats_edm_adm import load_edm_pickle

        prior = load_edm_pickle(path)
        prior.provenance = {"format": EDM_PICKLE, "file": os.path.basename(path), **prior.provenance}
        return prior
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; known: {', '.join([*FORMATS, EDM_PICKLE])}.")
    obj = load_state_dict_safely(path)
    detected = detect_format(obj)
    if format is None and detected is None:
        raise ValueError(f"cannot tell what checkpoint {path} is: {_summary(obj)}. Known formats: "
                         + "; ".join(f"{f.name} ({f.description})" for f in FORMATS.values()) + ".")
    name = format or detected
    if not FORMATS[name].matches(obj):
        raise ValueError(f"{path} is not a {name} checkpoint ({FORMATS[name].description}): {_summary(obj)}"
                         + (f"; it looks like {detected}." if detected else "."))
    prior = FORMATS[name].load(obj, read_config(config), ema)
    prior.provenance = {"format": name, "file": os.path.basename(path), **prior.provenance}
    return prior


def read_config(config):
    """A config argument as given (None, a name, a dict or a dataclass), or the mapping parsed from a ``.json`` /
    ``.yaml`` / ``.yml`` file. YAML is read with ``yaml.safe_load``: files that need Python object tags (ncsnv2 writes
    its run's ``config.yml`` that way) are refused."""
    if not isinstance(config, (str, os.PathLike)) or not os.path.splitext(os.fspath(config))[1]:
        return config
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist.")
    with open(path) as f:
        if path.endswith(".json"):
            return json.load(f)
        if not path.endswith((".yaml", ".yml")):
            raise ValueError(f"config {path}: expected a .json, .yaml or .yml file, or a known config name.")
        import yaml

        try:
            return yaml.safe_load(f)
        except yaml.constructor.ConstructorError as err:
            raise ValueError(f"config {path} needs unsafe YAML (it holds Python object tags such as "
                             f"!!python/object:argparse.Namespace) and is not read. Copy its data: and model: sections "
                             f"into a plain YAML or JSON file, or use the repository's configs/*.yml. ({err.problem})"
                             ) from err


def _summary(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} entries ({', '.join(type(v).__name__ for v in obj[:6])})"
    return f"a {type(obj).__name__}"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(state: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _mismatch(net: nn.Module, state: dict) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against ``net.state_dict()``."""
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in ours.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def _describe_mismatch(missing, unexpected, shapes, n=5) -> str:
    parts = [f"{len(missing)} missing keys (first: {missing[:n]})" if missing else "",
             f"{len(unexpected)} unexpected keys (first: {unexpected[:n]})" if unexpected else "",
             f"{len(shapes)} shape mismatches (first: {shapes[:n]})" if shapes else ""]
    return "; ".join(p for p in parts if p)


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a network on the meta device (no memory, no initialisation) to compare names and shapes."""
    with torch.device("meta"):
        return factory()


def _load_strict(net_factory: Callable[[], nn.Module], state: dict, what: str) -> nn.Module:
    missing, unexpected, shapes = _mismatch(_build(net_factory), state)
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: the checkpoint does not match the network: "
                         f"{_describe_mismatch(missing, unexpected, shapes)}.")
    net = net_factory()
    net.load_state_dict(state, strict=True)
    return net.eval()


# --------------------------------------------------------------------------------------------------------------------
# score_sde
# --------------------------------------------------------------------------------------------------------------------

def _is_score_sde(obj) -> bool:
    return (isinstance(obj, dict) and {"model", "ema", "step"} <= set(obj) and _is_state_dict(obj["model"])
            and isinstance(obj["ema"], dict) and "shadow_params" in obj["ema"])


def _given_config(config, config_class, named_config, what: str):
    """``(config object, its name)`` for a config given as an object, a known name or a mapping; ``None`` when none
    was given (the caller infers it from the weights)."""
    if isinstance(config, config_class):
        return config, "given"
    if isinstance(config, str):
        return named_config(config), config
    if isinstance(config, dict):
        return config_class.from_mapping(config), "given"
    if config is not None:
        raise ValueError(f"{what} config must be a name, a mapping or a file, got {type(config).__name__}.")
    return None


def _score_sde_config(config, state: dict):
    from purifiers.nets import score_sde

    given = _given_config(config, score_sde.ScoreSDEConfig, score_sde.named_config, "score_sde")
    if given is not None:
        return given
    # Infer: the known config whose names and shapes all match (VP and VE NCSN++ differ by the Fourier embedding).
    reports = {}
    for name, candidate in score_sde.CONFIGS.items():
        mismatch = _mismatch(_build(partial(score_sde.NCSNpp, candidate)), state)
        if not any(mismatch):
            return candidate, name
        reports[name] = mismatch
    closest = min(reports, key=lambda n: sum(map(len, reports[n])))
    raise ValueError(f"score_sde checkpoint: no known config ({', '.join(score_sde.CONFIGS)}) matches its "
                     f"parameters; closest {closest}: {_describe_mismatch(*reports[closest])}. Pass config= (a name, "
                     "or a JSON/YAML file of the reference config's model and data fields) for another network.")


def _load_score_sde(obj: dict, config, ema: bool) -> Prior:
    from purifiers.nets.score_sde import NCSNpp

    state = _strip_prefix(obj["model"])
    cfg, config_name = _score_sde_config(config, state)
    net = _load_strict(lambda: NCSNpp(cfg), state, f"score_sde ({config_name})")
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


register_format("score_sde", "yang-song/score_sde_pytorch checkpoint_*.pth: {model, ema, optimizer, step}",
                _is_score_sde, _load_score_sde)


# --------------------------------------------------------------------------------------------------------------------
# NCSNv2
# --------------------------------------------------------------------------------------------------------------------

def _is_ncsnv2(obj) -> bool:
    # The reference saves a DataParallel state_dict ("module." keys); a re-saved bare one is accepted too.
    return (isinstance(obj, (list, tuple)) and len(obj) >= 4 and _is_state_dict(obj[0])
            and {"sigmas", "begin_conv.weight"} <= set(_strip_prefix(obj[0])))


def _ncsnv2_config(config, state: dict):
    from purifiers.nets import ncsnv2

    given = _given_config(config, ncsnv2.NCSNv2Config, ncsnv2.named_config, "NCSNv2")
    if given is not None:
        return given
    # Infer the sizes from the weights; the data flags (logit_transform, rescaled) keep the reference configs' default
    # (data on [0, 1]), as every released NCSNv2 config has them.
    conv, sigmas = state["begin_conv.weight"], state["sigmas"]
    return ncsnv2.NCSNv2Config(ngf=conv.shape[0], channels=conv.shape[1], num_classes=len(sigmas),
                               sigma_begin=float(sigmas[0]), sigma_end=float(sigmas[-1])), "inferred from the weights"


def _load_ncsnv2(obj, config, ema: bool) -> Prior:
    from purifiers.nets.ncsnv2 import NCSNv2

    state = _strip_prefix(obj[0])
    cfg, config_name = _ncsnv2_config(config, state)
    # The sigmas buffer is part of the checkpoint; it overrides the config's (equal up to float rounding).
    net = _load_strict(lambda: NCSNv2(cfg), state, f"ncsnv2 ({config_name})")
    weights = "model"
    if ema and len(obj) >= 5 and isinstance(obj[4], dict):
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in obj[4]]
        unexpected = [k for k in obj[4] if k not in dict(net.named_parameters())]
        if missing or unexpected:
            raise ValueError(f"ncsnv2 ({config_name}): the EMA entry does not match the network: "
                             f"{_describe_mismatch(missing, unexpected, [])}.")
        net.load_state_dict(obj[4], strict=False)
        weights = "ema"
    elif ema:
        weights = "model (the checkpoint holds no EMA)"
    prior = _ncsnv2_prior(net, cfg)
    prior.provenance = {"config": config_name, "weights": weights, "step": int(obj[3])}
    return prior


def _ncsnv2_prior(net: nn.Module, cfg) -> Prior:
    return NCSNv2Prior(net, data_range="pm1" if cfg.rescaled else "01")


register_format("ncsnv2", "ermongroup/ncsnv2 checkpoint*.pth: [state_dict, optimizer, epoch, step, ema]",
                _is_ncsnv2, _load_ncsnv2)


# --------------------------------------------------------------------------------------------------------------------
# NVlabs EDM and openai/guided-diffusion (purifiers.formats_edm_adm); EDM's .pkl files are pickles of code and are
# read by their own restricted unpickler (load_checkpoint), never by torch.load.
# --------------------------------------------------------------------------------------------------------------------

def _state_dict_format(name: str):
    from purifiers.formats_edm_adm import looks_like

    return lambda obj: _is_state_dict(obj) and looks_like(obj) == name


def _load_edm_state_dict(obj: dict, config, ema: bool) -> Prior:
    from purifiers.formats_edm_adm import load_edm_state_dict

    return load_edm_state_dict("EDM state_dict", config, state=obj)


def _load_adm_state_dict(obj: dict, config, ema: bool) -> Prior:
    from purifiers.formats_edm_adm import load_adm_state_dict

    return load_adm_state_dict("guided-diffusion state_dict", config, state=obj)


EDM_PICKLE = "edm-pickle"
register_format("edm-state-dict", "an NVlabs/edm network's state_dict (.pt / .safetensors), with config= or a known "
                "preset's shapes", _state_dict_format("edm-state-dict"), _load_edm_state_dict)
register_format("guided-diffusion", "openai/guided-diffusion UNetModel state_dict, e.g. 256x256_diffusion_uncond.pt",
                _state_dict_format("guided-diffusion"), _load_adm_state_dict)


def untrained_prior(format: str, config: str) -> Prior:
    """The network of an authors' checkpoint (``format`` and the name of one of its configs, e.g. ``("score_sde",
    "vp/cifar10_ddpmpp_deep_continuous")``) in its prior wrapper, with random weights: what one evaluation of that
    network costs on a device can be measured without the file (``python -m benchmarks estimate``). It does not
    denoise."""
    if format == "score_sde":
        from purifiers.nets.score_sde import NCSNpp, named_config

        cfg = named_config(config)
        return _score_sde_prior(NCSNpp(cfg), cfg)
    if format == "ncsnv2":
        from purifiers.nets.ncsnv2 import NCSNv2, named_config

        cfg = named_config(config)
        return _ncsnv2_prior(NCSNv2(cfg), cfg)
    if format == "edm-state-dict":
        from purifiers.formats_edm_adm import untrained_edm

        return untrained_edm(config)
    raise ValueError(f"no untrained network for format {format!r}; known: score_sde, ncsnv2, edm-state-dict.")


# --------------------------------------------------------------------------------------------------------------------
# Cards of the known public checkpoints (purifiers/cards/*.json)
# --------------------------------------------------------------------------------------------------------------------

CARDS_DIR = os.path.join(os.path.dirname(__file__), "cards")


def known_cards() -> list[dict]:
    cards = []
    for name in sorted(os.listdir(CARDS_DIR)):
        if name.endswith(".json"):
            with open(os.path.join(CARDS_DIR, name)) as f:
                cards.append(json.load(f))
    return cards


def find_card(description: dict) -> dict | None:
    """The card of a known checkpoint with the format, config and parameter count that ``Prior.describe()`` reports
    (and, where the card names a file, the same file name), or None. The counts were taken from the reference
    implementations' networks."""
    for card in known_cards():
        if card["format"] != description.get("format"):
            continue
        config = card.get("config")
        if config not in (None, "inferred from the weights") and config != description.get("config"):
            continue
        if card.get("file_name") and description.get("file") and card["file_name"] != description["file"]:
            continue
        if card.get("parameters") is not None and card["parameters"] != description.get("parameters"):
            continue
        return card
    return None
