"""``guided-diffusion``: openai/guided-diffusion's ADM state_dicts (Dhariwal & Nichol 2021) such as
``256x256_diffusion_uncond.pt``, as DiffPure's ImageNet results use (fp32 or fp16; run in float32), with the
``create_model`` arguments (``config``: a dict, a JSON file or a name of :data:`purifiers.nets.adm.PRESETS`; by
default the preset whose shapes match).

ADM networks become an :class:`ADMPrior`, the epsilon-prediction prior on the 1000-step linear DDPM schedule, from the
first 3 of the 6 output channels (the others parametrise the learned variance, which a denoiser does not need).
"""

from __future__ import annotations

import torch
from torch import nn

from purifiers.conventions import DDPMSchedule
from purifiers.nets import adm
from purifiers.priors.backends import EpsilonPrior
from purifiers.priors.checkpoints.common import is_state_dict, matching_preset, preset_config, read_state_dict
from purifiers.priors.checkpoints.edm_pickle import load_checked_state_dict
from purifiers.priors.checkpoints.registry import CheckpointFormat, register_format

Tensor = torch.Tensor

ADM_STATE_DICT = "guided-diffusion"


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


def _build_adm(config: dict) -> adm.ADMUNet:
    try:
        return adm.ADMUNet(**config)
    except TypeError as err:
        raise ValueError(f"guided-diffusion config: {err}") from err


def load_adm_state_dict(path: str, config=None, state: dict | None = None) -> ADMPrior:
    """A prior from a guided-diffusion state_dict (fp16 or fp32 tensors; the network runs in float32)."""
    state = read_state_dict(path, state)
    config = (preset_config(config, adm.PRESETS, "guided-diffusion")
              or matching_preset(state, adm.PRESETS, _build_adm, "guided-diffusion"))
    unet = _build_adm(config)
    if unet.num_classes is not None:
        raise ValueError(f"{path} is a class-conditional guided-diffusion network ({unet.num_classes} classes); "
                         "purification needs an unconditional prior such as 256x256_diffusion_uncond.pt.")
    if unet.out_channels != 2 * unet.in_channels:
        raise ValueError("only learn_sigma=True guided-diffusion networks (6 output channels) are supported.")
    load_checked_state_dict(unet, state, f"guided-diffusion UNetModel {config}")
    return ADMPrior(unet.eval()).eval()


def is_adm_state_dict(obj) -> bool:
    """A guided-diffusion UNetModel's state_dict: its input block, time embedding and output layer names."""
    return is_state_dict(obj) and {"input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight"} <= set(obj)


register_format(CheckpointFormat(
    ADM_STATE_DICT, "openai/guided-diffusion UNetModel state_dict, e.g. 256x256_diffusion_uncond.pt",
    matches=is_adm_state_dict,
    load=lambda obj, config, ema: load_adm_state_dict("guided-diffusion state_dict", config, state=obj)))
