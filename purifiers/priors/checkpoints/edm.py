"""NVlabs EDM (Karras et al. 2022), as ScoreOpt uses: two registered formats.

* ``edm-pickle``: EDM's ``.pkl`` network pickles (a training snapshot ``{ema, loss_fn, augment_pipe, dataset_kwargs}``,
  whose ``ema`` network is used, or a bare network), read by the restricted unpickler of
  :mod:`purifiers.priors.checkpoints.edm_pickle`, which executes nothing (a normal unpickle would run the module
  source the file embeds). Claimed by the ``.pkl`` ending.
* ``edm-state-dict``: a ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` state_dict of an EDM
  preconditioned network (names ``model.…``, or the inner network's names), with its constructor arguments
  (``config``: a dict or a JSON file, e.g. ``{"class_name": "EDMPrecond", "img_resolution": 32, ...}``, or a preset
  name of :data:`EDM_PRESETS`; by default the preset whose shapes match).

Both become a :class:`PreconditionedPrior` (EDM's sigma is on the [-1, 1] scale: twice our pixel sigma).
"""

from __future__ import annotations

import torch

from purifiers.conventions import pixel_sigma_to_pm1, to_01, to_pm1
from purifiers.nets import edm
from purifiers.priors.backends import Prior
from purifiers.priors.checkpoints.common import is_state_dict, matching_preset, preset_config, read_state_dict
from purifiers.priors.checkpoints.edm_pickle import (PersistedObject, load_checked_state_dict, network_from_persisted,
                                                     read_edm_pickle)
from purifiers.priors.checkpoints.registry import CheckpointFormat, register_format

Tensor = torch.Tensor

EDM_PICKLE, EDM_STATE_DICT = "edm-pickle", "edm-state-dict"

# NVlabs/edm train.py's settings for the released CIFAR-10 networks (README table: --cond=0 --arch=ddpmpp / ncsnpp,
# default --precond=edm, --augment=0.12 hence augment_dim=9, CIFAR-10 dropout 0.13).
_EDM_CIFAR10 = dict(class_name="EDMPrecond", img_resolution=32, img_channels=3, label_dim=0, model_type="SongUNet",
                    model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13, encoder_type="standard",
                    decoder_type="standard")
EDM_PRESETS = {
    "edm-cifar10-32x32-uncond-vp": dict(_EDM_CIFAR10, embedding_type="positional", channel_mult_noise=1,
                                        resample_filter=[1, 1]),
    "edm-cifar10-32x32-uncond-ve": dict(_EDM_CIFAR10, embedding_type="fourier", encoder_type="residual",
                                        channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}


class PreconditionedPrior(Prior):
    """An EDM preconditioned network (:mod:`purifiers.nets.edm`) as a prior: ``D(x, sigma)`` on [0, 1] images at
    pixel sigma is ``(D_edm(2x - 1, 2 sigma) + 1) / 2``."""

    def __init__(self, precond: edm._Precond, source_format: str):
        super().__init__()
        if precond.label_dim:
            raise ValueError(f"this EDM network is class-conditional ({precond.label_dim} labels); purification "
                             "needs an unconditional prior.")
        self.precond = precond
        self.provenance = {"format": source_format}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return to_01(self.precond(to_pm1(x), pixel_sigma_to_pm1(sigma)))

    def conventions(self) -> dict:
        kind = type(self.precond).__name__
        time_input = {"EDMPrecond": "c_noise = ln(sigma_pm1) / 4", "VPPrecond": "c_noise = 999 t(sigma_pm1)",
                      "VEPrecond": "c_noise = ln(sigma_pm1 / 2)"}[kind]
        return {"architecture": f"{kind}/{self.precond.model_type}", "data_range": "[-1, 1]",
                "noise_parametrisation": f"EDM {kind} preconditioning (Karras et al. 2022, Table 1), sigma_pm1 = 2 x "
                "pixel sigma", "time_input": time_input}


class _EDMPickleContent:
    """What the restricted unpickler read from a ``.pkl`` file (the mark of this format: no other reader returns it)."""

    def __init__(self, content):
        self.content = content


def _read_edm_pickle(path: str) -> _EDMPickleContent:
    return _EDMPickleContent(read_edm_pickle(path))


def _pickled_network(content) -> PersistedObject:
    """The network record of what an EDM pickle holds: a snapshot's ``ema``, or the bare network."""
    if isinstance(content, dict):
        if "ema" not in content:
            raise ValueError(f"a pickled dict without 'ema' (keys {sorted(map(str, content))[:6]}); an EDM snapshot "
                             "is {ema, loss_fn, augment_pipe, dataset_kwargs}.")
        content = content["ema"]
    if not isinstance(content, PersistedObject):
        raise ValueError(f"it holds a {type(content).__name__}, not an EDM network.")
    return content


def _load_edm_pickle(read: _EDMPickleContent, config, ema: bool) -> PreconditionedPrior:
    # A snapshot holds only its EMA network (the one EDM samples and evaluates with), so `ema` has nothing to choose.
    return PreconditionedPrior(network_from_persisted(_pickled_network(read.content)), EDM_PICKLE).eval()


def _build_edm(config: dict) -> edm._Precond:
    config = dict(config)
    class_name = config.pop("class_name", "EDMPrecond")
    if class_name not in edm.PRECONDITIONERS:
        raise ValueError(f"unknown EDM preconditioner {class_name!r}; known: {sorted(edm.PRECONDITIONERS)}.")
    try:
        return edm.PRECONDITIONERS[class_name](**config)
    except TypeError as err:
        raise ValueError(f"EDM config: {err}") from err


def untrained_edm(preset: str) -> PreconditionedPrior:
    """The network of a :data:`EDM_PRESETS` entry with random weights (for cost measurements only)."""
    if preset not in EDM_PRESETS:
        raise ValueError(f"unknown EDM preset {preset!r}; known: {sorted(EDM_PRESETS)}.")
    return PreconditionedPrior(_build_edm(EDM_PRESETS[preset]).eval(), EDM_STATE_DICT).eval()


def load_edm_state_dict(path: str, config=None, state: dict | None = None) -> PreconditionedPrior:
    """A prior from an EDM network's state_dict file (``.pt``/``.safetensors``) and its constructor arguments."""
    state = read_state_dict(path, state)
    if not any(k.startswith("model.") for k in state):  # the inner network's state_dict: put it under the wrapper
        state = {f"model.{k}": v for k, v in state.items()}
    config = preset_config(config, EDM_PRESETS, "EDM") or matching_preset(state, EDM_PRESETS, _build_edm, "EDM")
    net = _build_edm(config)
    load_checked_state_dict(net, state, f"EDM {type(net).__name__}/{net.model_type} {config}")
    return PreconditionedPrior(net.eval(), EDM_STATE_DICT).eval()


def is_edm_state_dict(obj) -> bool:
    """An EDM network's state_dict: its noise-embedding mapping layers ``map_layer0.*`` (under ``model.`` or not)."""
    return is_state_dict(obj) and any(name.removeprefix("model.").startswith("map_layer0.") for name in obj)


register_format(CheckpointFormat(
    EDM_PICKLE, "an NVlabs/edm network pickle (.pkl snapshot or bare network), read without running its code",
    matches=lambda obj: isinstance(obj, _EDMPickleContent), load=_load_edm_pickle, read=_read_edm_pickle,
    suffixes=(".pkl",)))
register_format(CheckpointFormat(
    EDM_STATE_DICT, "an NVlabs/edm network's state_dict (.pt / .safetensors), with config= or a known preset's shapes",
    matches=is_edm_state_dict, load=lambda obj, config, ema: load_edm_state_dict("EDM state_dict", config, state=obj),
    untrained=untrained_edm))
