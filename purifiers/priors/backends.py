"""Score priors behind one convention: a denoiser ``D(x, sigma)`` on [0, 1] images, sigma in pixel units.

Each backend is a small wrapper that turns one model parametrisation into that denoiser (in the spirit of
k-diffusion's ``external.py``); every unit conversion goes through :mod:`purifiers.conventions`.

* :class:`GaussianPrior`: the exact denoiser of N(mean, std^2 I) data, for tests and sanity checks.
* :class:`EDMDenoiser`: a network F with EDM preconditioning (Karras et al. 2022, Table 1), e.g. the built-in
  :class:`purifiers.nets.unet.SmallUNet` this package trains by denoising score matching.
* :class:`EpsilonPrior`: an epsilon-prediction network on [-1, 1] data, with a DDPM-discrete or continuous VP time
  input: a diffusers ``UNet2DModel`` such as ``google/ddpm-cifar10-32``, or a user's own module.
* :class:`DenoiserPrior`: a user's own denoiser module, on [0, 1] or [-1, 1] data.
* :class:`VEScorePrior`: a variance-exploding score network (output already divided by sigma), e.g. score_sde's VE
  NCSN++.
* :class:`NCSNv2Prior`: NCSNv2's network (output divided by the sigma of its level), as ADP uses it.

:func:`purifiers.priors.loading.load_prior` picks the backend; the authors' checkpoint containers are read by
:mod:`purifiers.priors.checkpoints`.
Every prior describes itself with :meth:`Prior.describe` (format, conventions, parameter count).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from purifiers.conventions import DDPMSchedule, VPSchedule, pixel_sigma_to_pm1, to_01, to_pm1
from purifiers.priors.speed import AMP_DTYPES, SpeedOptions, in_blocks
from purifiers.validation import as_network_dtype, check_images

Tensor = torch.Tensor


@dataclass
class NFECounter:
    """Network evaluations, counted in images: ``forward`` calls of the denoiser and ``backward`` passes through it."""

    forward: int = 0
    backward: int = 0

    def reset(self) -> None:
        self.forward = 0
        self.backward = 0


class Prior(nn.Module):
    """Base class: subclasses implement ``_denoise(x, sigma)`` with ``sigma`` a float tensor of shape (N,)."""

    def __init__(self):
        super().__init__()
        self.nfe = NFECounter()
        self.speed_options = SpeedOptions()
        self._compiled_denoise = None

    def set_speed_options(self, options: SpeedOptions) -> None:
        """Run the network under ``options`` (:mod:`purifiers.priors.speed`; its weights go to channels_last memory
        order when asked). Default options are a no-op, so a wrapper built with all options off leaves the options
        another wrapper set on the shared prior as they are."""
        if options.is_default:
            return
        self.speed_options = options
        self._compiled_denoise = None
        if options.channels_last:
            self.to(memory_format=torch.channels_last)

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """``D(x, sigma)``: the posterior-mean clean image for a noisy [0, 1] image ``x`` at pixel noise level ``sigma``.

        :param x: (N, C, H, W) float tensor; noisy, so values may leave [0, 1].
        :param sigma: a positive float, or a tensor of shape (N,) (one level per image).

        Any floating dtype is accepted: the network runs in its own dtype and the result comes back in ``x``'s.
        """
        check_images(x, name="prior input", value_range=None)
        sigma = self._sigma_batch(sigma, x)
        x_max = float(x.detach().abs().max())
        if x_max > 2.0 + 10.0 * float(sigma.max()):
            raise ValueError(f"prior input has values up to {x_max:g}, far outside [0, 1] for noise level "
                             f"{float(sigma.max()):g}: this looks like 0-255 images; divide by 255.")
        return self.denoise_unchecked(as_network_dtype(x, self), sigma).to(x.dtype)

    def denoise_unchecked(self, x: Tensor, sigma) -> Tensor:
        """:meth:`denoise` without the input checks, for the purifiers' inner loops: their public entries validate the
        input once, and every check here would cost a device synchronisation per network call. ``sigma`` is a float
        or an (N,) tensor, trusted to be positive and finite. Without autograd the network runs under
        ``torch.inference_mode`` (same values, less bookkeeping); the speed options of :mod:`purifiers.priors.speed` apply."""
        sigma = self._sigma_batch(sigma, x, check=False)
        if torch.is_grad_enabled() or not self.speed_options.inference_mode:
            out = self._run_network(x, sigma)
        else:
            with torch.inference_mode():
                out = self._run_network(x, sigma)
            out = out.clone()  # an ordinary tensor again, which autograd may save later
        self.nfe.forward += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def forward(self, x: Tensor, sigma) -> Tensor:
        return self.denoise(x, sigma)

    def conventions(self) -> dict:
        """How the wrapped model sees the data: ``data_range``, ``noise_parametrisation`` (what the model outputs) and
        ``time_input`` (what it takes as noise level). Every backend here overrides it; ``check-prior`` prints it."""
        return {"data_range": "not stated", "noise_parametrisation": "not stated", "time_input": "not stated"}

    def describe(self) -> dict:
        """A card of this prior: ``format`` (where it was loaded from), its :meth:`conventions` and ``parameters``
        (the count); loaders add what they know (config, weights) through ``self.provenance``."""
        return {"format": type(self).__name__, **self.conventions(),
                "parameters": sum(p.numel() for p in self.parameters()), **getattr(self, "provenance", {})}

    def score(self, x: Tensor, sigma) -> Tensor:
        """``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` in [0, 1] pixel units."""
        sigma = self._sigma_batch(sigma, x)
        return (self.denoise(x, sigma) - x) / _per_image(sigma) ** 2

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def _run_network(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``_denoise(x, sigma)`` under the speed options."""
        options = self.speed_options
        if options.is_default:
            return self._denoise(x, sigma)
        if options.batch_invariant:
            return in_blocks(lambda xb, sb: self._run_with_options(xb, sb), x, sigma)
        return self._run_with_options(x, sigma)

    def _run_with_options(self, x: Tensor, sigma: Tensor) -> Tensor:
        options = self.speed_options
        denoise = self._denoise
        if options.compile is not False:
            if self._compiled_denoise is None:
                self._compiled_denoise = torch.compile(
                    self._denoise, **(options.compile if isinstance(options.compile, dict) else {}))
            denoise = self._compiled_denoise
        if options.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if options.amp is None:
            return denoise(x, sigma)
        options.check_device(x.device)
        with torch.autocast(device_type="cuda", dtype=AMP_DTYPES[options.amp]):
            out = denoise(x, sigma)
        return out.to(x.dtype)

    def _count_backward(self, grad: Tensor) -> None:
        self.nfe.backward += grad.shape[0]

    @staticmethod
    def _sigma_batch(sigma, x: Tensor, check: bool = True) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]} images.")
        if check and not (torch.isfinite(sigma).all() and (sigma > 0).all()):
            raise ValueError("sigma must be positive and finite.")
        return sigma


def _per_image(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


_RANGE_NAMES = {"01": "[0, 1]", "pm1": "[-1, 1]"}


class GaussianPrior(Prior):
    """Data ~ N(mean, std^2 I) on the pixel scale; the denoiser is exact: ``mean + std^2/(std^2+sigma^2) (x - mean)``.

    :param mean: a float or a tensor broadcastable to one image (C, H, W).
    :param std: the per-pixel standard deviation of the data.
    """

    def __init__(self, mean=0.5, std: float = 0.2):
        super().__init__()
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}.")
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.std = float(std)

    def conventions(self) -> dict:
        return {"data_range": "[0, 1]", "noise_parametrisation": "exact Gaussian denoiser", "time_input": "pixel sigma"}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        shrink = self.std**2 / (self.std**2 + _per_image(sigma) ** 2)
        return self.mean + shrink * (x - self.mean)


class EDMDenoiser(Prior):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours") around a network ``F(x_in, c_noise)``.

    The network works on [-1, 1] data with ``sigma_data = 0.5``:
    ``D = c_skip x + c_out F(c_in x, c_noise)``, ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``,
    ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = ln(s)/4``, where ``s`` is the [-1, 1]-scale sigma.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def conventions(self) -> dict:
        return {"data_range": "[-1, 1]", "noise_parametrisation": "EDM-preconditioned denoiser (Karras et al. 2022)",
                "time_input": "ln(sigma_pm1) / 4"}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_pm1, s = to_pm1(x), pixel_sigma_to_pm1(sigma)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1.0 / (s**2 + sd2).sqrt()
        f = self.net(_per_image(c_in) * x_pm1, s.log() / 4.0)
        return to_01(_per_image(c_skip) * x_pm1 + _per_image(c_out) * f)


class EpsilonPrior(Prior):
    """An epsilon-prediction model ``eps(x_t, time)`` on [-1, 1] data, trained on the VP process
    ``x_t = sqrt(a) x0 + sqrt(1-a) eps``.

    A noisy [0, 1] image at pixel sigma is the VE form of ``x_t``: ``x_t = sqrt(a) (2x - 1)`` with
    ``a = 1/(1 + sigma_pm1^2)``; then ``D = (2x - 1 - sigma_pm1 eps_hat + 1) / 2``.

    :param model: called as ``model(x_t, time)``, returning the predicted noise (a tensor, or an object with ``.sample``
        as diffusers returns).
    :param time_of_sigma: maps pixel sigma (N,) to the model's time input (N,); see :meth:`ddpm` and :meth:`vp`.
    """

    def __init__(self, model: nn.Module, time_of_sigma: Callable[[Tensor], Tensor], time_input: str = "custom"):
        super().__init__()
        self.model = model
        self.time_of_sigma = time_of_sigma
        self.time_input = time_input

    @classmethod
    def ddpm(cls, model: nn.Module, schedule: DDPMSchedule | None = None) -> "EpsilonPrior":
        """Discrete DDPM time input: the fractional timestep (0..999) whose sigma matches (diffusers' convention)."""
        schedule = schedule or DDPMSchedule()
        return cls(model, lambda sigma: schedule.timestep_of_sigma(sigma).to(sigma),
                   time_input=f"DDPM timestep 0..{schedule.num_steps - 1} (fractional)")

    @classmethod
    def vp(cls, model: nn.Module, schedule: VPSchedule | None = None, time_scale: float = 999.0) -> "EpsilonPrior":
        """Continuous VP-SDE time input ``time_scale * t`` (score_sde's DDPM++ takes 999 t)."""
        schedule = schedule or VPSchedule()
        return cls(model, lambda sigma: time_scale * schedule.t_of_sigma(sigma),
                   time_input=f"{time_scale:g} t, continuous VP time (beta {schedule.beta_min:g} -> "
                              f"{schedule.beta_max:g})")

    def conventions(self) -> dict:
        return {"data_range": "[-1, 1]", "noise_parametrisation": "epsilon (VP)", "time_input": self.time_input}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        y, s = to_pm1(x), pixel_sigma_to_pm1(sigma)
        sqrt_a = _per_image((1.0 + s**2).rsqrt())
        eps = self.model(sqrt_a * y, self.time_of_sigma(sigma))
        eps = getattr(eps, "sample", eps)
        return to_01(y - _per_image(s) * eps)


class DenoiserPrior(Prior):
    """A user's own denoiser ``module(x, sigma)``, on [0, 1] data (``data_range="01"``, pixel sigma) or on [-1, 1] data
    (``data_range="pm1"``, sigma on that scale, as EDM networks take it)."""

    def __init__(self, module: nn.Module, data_range: str = "01"):
        super().__init__()
        if data_range not in ("01", "pm1"):
            raise ValueError(f"data_range must be '01' or 'pm1', got {data_range!r}.")
        self.module = module
        self.data_range = data_range

    def conventions(self) -> dict:
        return {"data_range": _RANGE_NAMES[self.data_range], "noise_parametrisation": "denoiser D(x, sigma)",
                "time_input": f"sigma on {_RANGE_NAMES[self.data_range]}"}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.data_range == "01":
            return self.module(x, sigma)
        return to_01(self.module(to_pm1(x), pixel_sigma_to_pm1(sigma)))


def _to_range(x: Tensor, sigma: Tensor, data_range: str) -> tuple[Tensor, Tensor]:
    """A [0, 1] image and pixel sigma -> the same on ``data_range`` ("01" or "pm1")."""
    return (x, sigma) if data_range == "01" else (to_pm1(x), pixel_sigma_to_pm1(sigma))


def _from_range(x: Tensor, data_range: str) -> Tensor:
    return x if data_range == "01" else to_01(x)


class _NetworkOnRange(Prior):
    """A network that sees the data on one of two ranges, "01" ([0, 1], pixel sigma) or "pm1" ([-1, 1])."""

    def __init__(self, net: nn.Module, data_range: str = "01"):
        super().__init__()
        if data_range not in _RANGE_NAMES:
            raise ValueError(f"data_range must be '01' or 'pm1', got {data_range!r}.")
        self.net = net
        self.data_range = data_range


class VEScorePrior(_NetworkOnRange):
    """A variance-exploding score network ``net(x, sigma)`` returning ``grad log p_sigma(x)`` itself (its output already
    divided by sigma), such as score_sde's continuous VE NCSN++ (Song et al. 2021, ``scale_by_sigma``). Tweedie:
    ``D = x + sigma^2 net(x, sigma)``, on the network's ``data_range`` ("01": [0, 1] with pixel sigma, as score_sde's
    VE CIFAR-10 configs with ``data.centered = False``; "pm1": [-1, 1])."""

    def conventions(self) -> dict:
        return {"data_range": _RANGE_NAMES[self.data_range],
                "noise_parametrisation": "score (output divided by sigma, VE)",
                "time_input": f"sigma on {_RANGE_NAMES[self.data_range]}"}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_in, s = _to_range(x, sigma, self.data_range)
        return _from_range(x_in + _per_image(s) ** 2 * self.net(x_in, s), self.data_range)


class NCSNv2Prior(_NetworkOnRange):
    """NCSNv2 (Song & Ermon 2020): ``net(x, i) = f(x) / sigmas[i]`` with a noise-unconditional body ``f`` (the paper's
    Technique 3), so ``f(x) ~ -eps`` serves every noise level: ``D = x + sigma f(x)``. ``f`` is read as
    ``net(x, i) sigmas[i]`` at the level ``i`` nearest to sigma (at a training level this is exactly the reference's
    score); ADP (Yoon et al. 2021) uses ``f`` directly (``used_sigmas = 1``), which is the same denoiser.

    :param net: an :class:`purifiers.nets.ncsnv2.NCSNv2` (anything with ``sigmas`` and ``net(x, labels)``).
    :param data_range: "01" when the config has ``rescaled: false`` (sigma in pixel units), "pm1" when ``true``.
    """

    def conventions(self) -> dict:
        sigmas = self.net.sigmas
        return {"data_range": _RANGE_NAMES[self.data_range],
                "noise_parametrisation": "score at level i (output divided by sigmas[i]); sigma-unconditional body",
                "time_input": f"level index 0..{len(sigmas) - 1}, sigmas {float(sigmas[0]):g} -> {float(sigmas[-1]):g}"}

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_in, s = _to_range(x, sigma, self.data_range)
        levels = (self.net.sigmas.log()[None, :] - s.log()[:, None].to(self.net.sigmas)).abs().argmin(dim=1)
        minus_eps = self.net(x_in, levels) * _per_image(self.net.sigmas[levels].to(x_in))
        return _from_range(x_in + _per_image(s) * minus_eps, self.data_range)


def load_state_dict_safely(path: str):
    """Read weights without executing code: safetensors, or ``torch.load(weights_only=True)`` for pickles (which also
    reads the checkpoint containers of :mod:`purifiers.priors.checkpoints`: dicts and lists of tensors and plain
    values). A zip archive holding pickle records besides its ``data.pkl`` is refused."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors' header and size errors do not name the file
            raise ValueError(f"cannot read the weights file {path}: it is truncated or not a valid safetensors file "
                             f"({type(err).__name__}: {err}).") from err
    hidden = _hidden_pickles(path)
    if hidden:
        raise ValueError(f"refusing to load {path}: besides its data.pkl the archive holds pickle records that "
                         f"torch.save does not write ({', '.join(hidden[:3])}). torch.load would ignore them, but "
                         "whatever unpacks the archive might run them.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(_torch_load_failure(path, err)) from err


def _hidden_pickles(path: str) -> list[str]:
    """The pickle records of a zip checkpoint other than the ``<name>/data.pkl`` that torch.save writes."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith((".pkl", ".pickle"))]
    except (zipfile.BadZipFile, OSError):  # not a (readable) zip archive: torch.load says what it is
        return []
    main = next((n for n in pickles if n.count("/") == 1 and n.endswith("/data.pkl")), None)
    return [n for n in pickles if n != main]


def _torch_load_failure(path: str, err: Exception) -> str:
    """Say which of the three usual causes made ``torch.load(weights_only=True)`` fail."""
    detail = f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save's zip, or a (legacy) pickle
        return (f"{path} is not a PyTorch checkpoint (a torch.save zip or pickle) nor a .safetensors file; "
                f"it starts with {head!r}. {detail}")
    if "weights only" in str(err).lower():
        return (f"refusing to load {path}: it is a pickle that holds more than tensors and plain values (unpickling "
                f"it could run arbitrary code). Convert it to safetensors. {detail}")
    return f"{path} looks like a PyTorch file but cannot be read: truncated or corrupt (re-download it). {detail}"
