"""Priors from the authors' checkpoints: NVlabs EDM (``.pkl`` network pickles, or their state_dicts plus a config)
and openai/guided-diffusion (ADM state_dicts such as ``256x256_diffusion_uncond.pt``).

* :func:`load_edm_pickle`: an EDM ``.pkl`` (a training snapshot ``{ema, loss_fn, augment_pipe, dataset_kwargs}``, whose
  ``ema`` network is used, or a bare network), read by :mod:`purifiers.edm_pickle` without executing anything.
* :func:`load_edm_state_dict`: a ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` state_dict of an EDM
  preconditioned network (names ``model.…``, or the inner network's names), with its constructor arguments
  (``config``: a dict or a JSON file, e.g. ``{"class_name": "EDMPrecond", "img_resolution": 32, ...}``, or a preset
  name of :data:`EDM_PRESETS`; by default the preset whose shapes match).
* :func:`load_adm_state_dict`: a guided-diffusion state_dict (fp32 or fp16; run in float32) with its ``create_model``
  arguments (``config``: a dict, a JSON file or a name of :data:`purifiers.nets.adm.PRESETS`; by default the preset
  whose shapes match).
* :func:`looks_like`: which of the state_dict formats a set of parameter names is; the formats are registered in
  :mod:`purifiers.checkpoints`, which :func:`purifiers.loading.load_prior` reads through.

EDM networks become a :class:`PreconditionedPrior` (EDM's sigma is on the [-1, 1] scale: twice our pixel sigma); ADM
networks an :class:`ADMPrior`, the epsilon-prediction prior on the 1000-step linear DDPM schedule, from the first
3 of the 6 output channels (the others parametrise the learned variance, which a denoiser does not need).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from purifiers.conventions import DDPMSchedule, pixel_sigma_to_pm1, to_01, to_pm1
from purifiers.edm_pickle import PersistedObject, load_checked_state_dict, network_from_persisted, read_edm_pickle
from purifiers.nets import adm, edm
from purifiers.priors import EpsilonPrior, Prior, load_state_dict_safely

Tensor = torch.Tensor

EDM_PICKLE, EDM_STATE_DICT, ADM_STATE_DICT = "edm-pickle", "edm-state-dict", "guided-diffusion"
FORMATS = (EDM_PICKLE, EDM_STATE_DICT, ADM_STATE_DICT)

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


class _EpsilonChannels(nn.Module):
    """The first ``channels`` output channels of an ADM network: epsilon (the rest is the learned variance)."""

    def __init__(self, unet: adm.ADMUNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        return self.unet(x, timesteps)[:, : self.unet.in_channels]


class ADMPrior(EpsilonPrior):
    """A guided-diffusion ADM network as an epsilon-prediction prior on the DDPM schedule (1000 linear betas),
    timestep input fractional (the timestep whose sigma matches; DiffPure rounds ``1000 t`` down instead)."""

    def __init__(self, unet: adm.ADMUNet, schedule: DDPMSchedule | None = None):
        schedule = schedule or DDPMSchedule()
        super().__init__(_EpsilonChannels(unet), lambda sigma: schedule.timestep_of_sigma(sigma).to(sigma))
        self.provenance = {"format": ADM_STATE_DICT}

    def conventions(self) -> dict:
        return {"architecture": "guided-diffusion UNetModel", "data_range": "[-1, 1]",
                "noise_parametrisation": "epsilon (first 3 of 6 output channels), DDPM 1000 linear betas 1e-4..0.02",
                "time_input": "DDPM timestep 0..999 (fractional)"}


# ----------------------------------------------------------------------------------------------------------------------

def load_edm_pickle(path: str) -> PreconditionedPrior:
    """A prior from an EDM ``.pkl`` (snapshot or bare network); nothing in the file is executed."""
    content = read_edm_pickle(path)
    if isinstance(content, dict):
        if "ema" not in content:
            raise ValueError(f"{path} is a pickled dict without 'ema' (keys {sorted(map(str, content))[:6]}); an EDM "
                             "snapshot is {ema, loss_fn, augment_pipe, dataset_kwargs}.")
        content = content["ema"]
    if not isinstance(content, PersistedObject):
        raise ValueError(f"{path} holds a {type(content).__name__}, not an EDM network.")
    return PreconditionedPrior(network_from_persisted(content), EDM_PICKLE).eval()


def _read_config(config, presets: dict, what: str) -> dict | None:
    if config is None or isinstance(config, dict):
        return None if config is None else dict(config)
    if config in presets:
        return dict(presets[config])
    if isinstance(config, (str, os.PathLike)) and os.path.isfile(config):
        with open(config) as f:
            return json.load(f)
    raise ValueError(f"{what} config {config!r} is neither a dict, a JSON file nor a preset ({sorted(presets)}).")


def _read_state_dict(path: str, state: dict | None) -> dict:
    state = load_state_dict_safely(path) if state is None else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict (a flat dict of name -> tensor).")
    return state


def _shapes_on_meta(build) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def _matching_preset(state: dict, presets: dict, build, what: str) -> dict:
    """The preset whose network has exactly the names and shapes of ``state`` (compared on the meta device)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for config in presets.values():
        if _shapes_on_meta(lambda: build(config)) == shapes:
            return dict(config)
    raise ValueError(f"the {what} state_dict ({len(state)} tensors) matches none of the known configurations "
                     f"{sorted(presets)}; pass config= with the network's constructor arguments.")


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
    state = _read_state_dict(path, state)
    if not any(k.startswith("model.") for k in state):  # the inner network's state_dict: put it under the wrapper
        state = {f"model.{k}": v for k, v in state.items()}
    config = _read_config(config, EDM_PRESETS, "EDM") or _matching_preset(state, EDM_PRESETS, _build_edm, "EDM")
    net = _build_edm(config)
    load_checked_state_dict(net, state, f"EDM {type(net).__name__}/{net.model_type} {config}")
    return PreconditionedPrior(net.eval(), EDM_STATE_DICT).eval()


def _build_adm(config: dict) -> adm.ADMUNet:
    try:
        return adm.ADMUNet(**config)
    except TypeError as err:
        raise ValueError(f"guided-diffusion config: {err}") from err


def load_adm_state_dict(path: str, config=None, state: dict | None = None) -> ADMPrior:
    """A prior from a guided-diffusion state_dict (fp16 or fp32 tensors; the network runs in float32)."""
    state = _read_state_dict(path, state)
    config = (_read_config(config, adm.PRESETS, "guided-diffusion")
              or _matching_preset(state, adm.PRESETS, _build_adm, "guided-diffusion"))
    unet = _build_adm(config)
    if unet.num_classes is not None:
        raise ValueError(f"{path} is a class-conditional guided-diffusion network ({unet.num_classes} classes); "
                         "purification needs an unconditional prior such as 256x256_diffusion_uncond.pt.")
    if unet.out_channels != 2 * unet.in_channels:
        raise ValueError("only learn_sigma=True guided-diffusion networks (6 output channels) are supported.")
    load_checked_state_dict(unet, state, f"guided-diffusion UNetModel {config}")
    return ADMPrior(unet.eval()).eval()


def looks_like(names) -> str | None:
    """Which of the state_dict formats a set of parameter names is (``None``: neither)."""
    names = set(names)
    if {"input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight"} <= names:
        return ADM_STATE_DICT
    if any(name.removeprefix("model.").startswith("map_layer0.") for name in names):
        return EDM_STATE_DICT
    return None
