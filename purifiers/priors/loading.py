"""Loading a prior from what a user holds: :func:`load_prior` picks the backend of :mod:`purifiers.priors` for a file,
a folder, a module or a name; the authors' checkpoint containers are read by :mod:`purifiers.priors.checkpoints`. Nothing
is unpickled that could run code."""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from purifiers.conventions import DDPMSchedule
from purifiers.priors.backends import (DenoiserPrior, EDMDenoiser, EpsilonPrior, GaussianPrior, Prior,
                                       load_state_dict_safely)

BUILTIN_FORMAT = "art-purifiers/edm-small-unet"


def save_builtin_prior(prior: EDMDenoiser, path: str, card: dict | None = None) -> None:
    """Write a built-in prior as safetensors (architecture in the metadata) plus an optional JSON card beside it."""
    from safetensors.torch import save_file

    metadata = {"format": BUILTIN_FORMAT, "config": json.dumps(prior.net.config), "sigma_data": str(prior.sigma_data)}
    state = {k: v.detach().contiguous().cpu() for k, v in prior.net.state_dict().items()}
    save_file(state, path, metadata=metadata)
    if card is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(card, f, indent=2)


def _is_builtin_prior(path: str) -> bool:
    """Whether a safetensors file carries the built-in prior's metadata (else it is some network's state_dict)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == BUILTIN_FORMAT
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _load_builtin_prior(path: str) -> EDMDenoiser:
    from safetensors import safe_open

    from purifiers.nets.unet import SmallUNet
    from purifiers.priors.checkpoints.common import describe_mismatch, mismatch

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' header errors do not name the file
        raise ValueError(f"cannot read the prior file {path}: it is truncated or not a valid safetensors file "
                         f"({type(err).__name__}: {err}).") from err
    if metadata.get("format") != BUILTIN_FORMAT:
        raise ValueError(f"{path} is a safetensors file without the {BUILTIN_FORMAT!r} metadata of a built-in prior; "
                         "wrap your own network with load_prior(module, kind=...) instead.")
    try:
        config, sigma_data = json.loads(metadata["config"]), float(metadata["sigma_data"])
        with torch.device("meta"):  # names and shapes only, whatever size the metadata describes
            skeleton = SmallUNet(**config)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: its metadata does not describe a built-in prior (a SmallUNet config and "
                         f"sigma_data): {type(err).__name__}: {err}") from err
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"{path}: its metadata gives sigma_data = {sigma_data}, not a positive number.")
    state = load_state_dict_safely(path)
    differences = mismatch(skeleton, state)
    if any(differences):
        raise ValueError(f"{path}: its tensors do not fit the SmallUNet its metadata describes: "
                         f"{describe_mismatch(*differences)}.")
    net = SmallUNet(**config)
    net.load_state_dict(state)
    prior = EDMDenoiser(net, sigma_data=sigma_data).eval()
    prior.provenance = {"format": BUILTIN_FORMAT, "file": os.path.basename(path)}
    return prior


def _load_diffusers_unet(folder: str) -> nn.Module:
    import diffusers

    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    class_name = config.get("_class_name")
    if class_name != "UNet2DModel":
        raise ValueError(f"{config_path} describes a {class_name!r}; only diffusers UNet2DModel epsilon-prediction "
                         "models are supported (the model folder inside a pipeline is usually 'unet/').")
    weights = [n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
               if os.path.exists(os.path.join(folder, n))]
    if not weights:
        raise ValueError(f"{folder} holds no diffusion_pytorch_model.safetensors (or .bin) weights.")
    unet = diffusers.UNet2DModel.from_config(config)
    unet.load_state_dict(load_state_dict_safely(os.path.join(folder, weights[0])))
    return unet.eval()


def _diffusers_schedule(folder: str) -> DDPMSchedule:
    """The DDPM schedule from a ``scheduler_config.json`` beside (or in ``../scheduler/`` of) the UNet folder, or
    DDPM's defaults when there is none. Only linear betas and epsilon prediction are supported."""
    for path in (os.path.join(folder, "scheduler_config.json"),
                 os.path.join(folder, os.pardir, "scheduler", "scheduler_config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            if config.get("beta_schedule", "linear") != "linear" or config.get("prediction_type", "epsilon") != "epsilon":
                raise ValueError(f"{path}: only linear-beta epsilon-prediction DDPM models are supported, got "
                                 f"beta_schedule={config.get('beta_schedule')!r}, "
                                 f"prediction_type={config.get('prediction_type')!r}.")
            return DDPMSchedule(config.get("beta_start", 1e-4), config.get("beta_end", 0.02),
                                config.get("num_train_timesteps", 1000))
    return DDPMSchedule()


def _resolve_diffusers_folder(path: str) -> str | None:
    for folder in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    return None


def load_prior(source, *, kind: str | None = None, data_range: str = "01", time_input: str = "ddpm",
               format: str | None = None, config=None, ema: bool = True, device: str | torch.device = "cpu",
               **gaussian_kwargs) -> Prior:
    """Return a :class:`Prior` for ``source``.

    :param source: one of

        * ``"gaussian"``: a :class:`GaussianPrior` (``mean=``, ``std=`` keyword arguments);
        * a path to a built-in prior ``.safetensors`` file (as shipped in ``benchmarks/models/``);
        * a path to a local diffusers folder holding a ``UNet2DModel`` (e.g. a download of ``google/ddpm-cifar10-32``,
          or its ``unet/`` subfolder): DDPM epsilon-prediction on [-1, 1] with 1000 linear betas;
        * a ``torch.nn.Module``: with ``kind="denoiser"`` it is called ``module(x, sigma)`` on ``data_range`` data
          ("01" or "pm1"); with ``kind="epsilon"`` it is called ``module(x_t, time)`` on [-1, 1] VP data, ``time_input``
          "ddpm" (fractional timestep 0..999) or "vp" (999 t, t the continuous VP-SDE time);
        * a path to an authors' checkpoint in a format of :mod:`purifiers.priors.checkpoints`, detected from its contents:
          score_sde's ``checkpoint_8.pth`` (DDPM++/NCSN++, VP or VE), NCSNv2's ``checkpoint.pth``, an NVlabs EDM
          ``.pkl`` (read without executing it) or an EDM network state_dict (``.pt``/``.safetensors``) with its config,
          guided-diffusion's ``256x256_diffusion_uncond.pt``;
        * an existing :class:`Prior`, returned as is.

    :param format: the checkpoint format (a name of ``purifiers.priors.checkpoints.FORMATS``) instead of detecting it.
    :param config: the network config of a checkpoint: a known config name (e.g.
        ``"vp/cifar10_ddpmpp_deep_continuous"``, ``"edm-cifar10-32x32-uncond-vp"``, ``"256x256_uncond"``), a JSON/YAML
        file or a dict; inferred from the weights when None.
    :param ema: load a checkpoint's EMA weights (the authors' evaluation weights) rather than the raw ones.
    :param device: where the prior's parameters go.
    """
    if isinstance(source, Prior):
        prior = source
    elif isinstance(source, nn.Module):
        if kind == "denoiser":
            prior = DenoiserPrior(source, data_range=data_range)
        elif kind == "epsilon":
            if time_input not in ("ddpm", "vp"):
                raise ValueError(f"time_input must be 'ddpm' or 'vp', got {time_input!r}.")
            prior = EpsilonPrior.ddpm(source) if time_input == "ddpm" else EpsilonPrior.vp(source)
        else:
            raise ValueError("for a torch.nn.Module, say what it computes: kind='denoiser' (module(x, sigma)) or "
                             "kind='epsilon' (module(x_t, time) predicting the noise).")
    elif isinstance(source, str) and source == "gaussian":
        prior = GaussianPrior(**gaussian_kwargs)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"prior path {path!r} does not exist.")
        folder = _resolve_diffusers_folder(path) if os.path.isdir(path) else None
        if folder is not None:
            prior = EpsilonPrior.ddpm(_load_diffusers_unet(folder), _diffusers_schedule(folder))
            prior.provenance = {"format": "diffusers UNet2DModel", "file": folder}
        elif path.endswith(".safetensors") and format is None and _is_builtin_prior(path):
            prior = _load_builtin_prior(path)
        elif os.path.isfile(path):
            from purifiers.priors.checkpoints import load_checkpoint

            prior = load_checkpoint(path, format=format, config=config, ema=ema)
        else:
            raise ValueError(f"cannot tell what prior {path!r} is: expected a built-in .safetensors file, an authors' "
                             "checkpoint file or a diffusers folder with config.json (UNet2DModel).")
    else:
        raise ValueError(f"unsupported prior source of type {type(source).__name__}.")
    return prior.to(device).eval()
