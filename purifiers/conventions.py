"""Every unit conversion between the package convention and the methods' own conventions, in one place.

The package convention
----------------------
* Images are float tensors, NCHW, with clean data in **[0, 1]**.
* A noise level ``sigma`` is the standard deviation of Gaussian noise added to a [0, 1] image ("pixel sigma"):
  ``x_noisy = x + sigma * n``, ``n ~ N(0, I)``.
* A prior is a denoiser ``D(x, sigma) ~ E[x_clean | x_noisy = x]`` and its score is
  ``score(x, sigma) = (D(x, sigma) - x) / sigma**2`` (Tweedie).

The conventions the methods use, and how they map
-------------------------------------------------
* **[-1, 1] data** (DDPM, score_sde, EDM): ``x_pm1 = 2 x - 1``; a noise level scales the same way,
  ``sigma_pm1 = 2 sigma``. ScoreOpt's EDM sigma lives on [-1, 1]: its sigma_0 = 0.5 is pixel sigma 0.25.
* **VP-SDE** (DiffPure, COUP; Song et al. 2021, beta_min = 0.1, beta_max = 20):
  ``alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)`` and
  ``x_t = sqrt(alpha_bar) x_pm1 + sqrt(1 - alpha_bar) eps``. Dividing by ``sqrt(alpha_bar)`` gives the variance-exploding
  form ``x_pm1 + sigma_pm1(t) eps`` with ``sigma_pm1(t) = sqrt(1 / alpha_bar - 1)``.
* **DDPM discrete** (Ho et al. 2020): 1000 linear betas from 1e-4 to 0.02, ``alpha_bar_i = prod_{j<=i} (1 - beta_j)``,
  timestep ``i`` in 0..999; fractional timesteps interpolate log-sigma between neighbours (as k-diffusion does).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

# Song et al. (2021), "Score-based generative modeling through SDEs", VP-SDE defaults, used by DiffPure and COUP.
VP_BETA_MIN = 0.1
VP_BETA_MAX = 20.0
# Ho et al. (2020), DDPM: linear betas, 1000 steps.
DDPM_BETA_START = 1e-4
DDPM_BETA_END = 0.02
DDPM_STEPS = 1000


def to_pm1(x01: Tensor) -> Tensor:
    """[0, 1] image -> [-1, 1] image."""
    return 2.0 * x01 - 1.0


def to_01(x_pm1: Tensor) -> Tensor:
    """[-1, 1] image -> [0, 1] image."""
    return (x_pm1 + 1.0) / 2.0


def pm1_sigma_to_pixel(sigma_pm1):
    """A noise level on the [-1, 1] scale (EDM's, ScoreOpt's) -> pixel sigma on [0, 1]."""
    return sigma_pm1 / 2.0


def pixel_sigma_to_pm1(sigma):
    """Pixel sigma on [0, 1] -> the same noise level on the [-1, 1] scale."""
    return sigma * 2.0


class VPSchedule:
    """Continuous VP-SDE of Song et al. (2021): beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1]."""

    def __init__(self, beta_min: float = VP_BETA_MIN, beta_max: float = VP_BETA_MAX):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"VP schedule needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}.")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t):
        return -self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha_bar(self, t):
        return _exp(self.log_alpha_bar(t))

    def sigma(self, t):
        """Pixel sigma of the VE-equivalent of x_t: ``sqrt(1/alpha_bar - 1) / 2``."""
        return pm1_sigma_to_pixel(_sqrt(_expm1(-self.log_alpha_bar(t))))

    def t_of_sigma(self, sigma):
        """Inverse of :meth:`sigma`: solves ``beta_min t + (beta_max - beta_min) t^2 / 2 = log(1 + sigma_pm1^2)``."""
        c = _log1p(pixel_sigma_to_pm1(sigma) ** 2)
        a = 0.5 * (self.beta_max - self.beta_min)
        return (_sqrt(self.beta_min**2 + 4.0 * a * c) - self.beta_min) / (2.0 * a)


class DDPMSchedule:
    """Discrete DDPM schedule (1000 linear betas by default); maps pixel sigma <-> fractional timestep."""

    def __init__(self, beta_start: float = DDPM_BETA_START, beta_end: float = DDPM_BETA_END, steps: int = DDPM_STEPS,
                 betas: Tensor | None = None):
        if betas is None:
            betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("DDPM betas must be a 1-D sequence of at least 2 values in (0, 1).")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Pixel sigma of each discrete step, increasing with the timestep.
        self.sigmas = pm1_sigma_to_pixel(torch.sqrt(1.0 / self.alphas_cumprod - 1.0))
        self._log_sigmas = self.sigmas.log()

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def sigma_of_timestep(self, timestep: Tensor) -> Tensor:
        """Pixel sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        timestep = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.num_steps - 1)
        low = timestep.floor().long()
        high = (low + 1).clamp(max=self.num_steps - 1)
        w = timestep - low
        return ((1 - w) * self._log_sigmas[low] + w * self._log_sigmas[high]).exp()

    def timestep_of_sigma(self, sigma: Tensor) -> Tensor:
        """Fractional timestep whose interpolated sigma equals ``sigma`` (clamped to the schedule's range)."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        log_sigma = log_sigma.clamp(self._log_sigmas[0], self._log_sigmas[-1])
        high = torch.searchsorted(self._log_sigmas, log_sigma.reshape(-1)).clamp(1, self.num_steps - 1)
        low = high - 1
        w = (log_sigma.reshape(-1) - self._log_sigmas[low]) / (self._log_sigmas[high] - self._log_sigmas[low])
        return (low + w).reshape(log_sigma.shape)


def _exp(v):
    return torch.exp(v) if isinstance(v, Tensor) else math.exp(v)


def _expm1(v):
    return torch.expm1(v) if isinstance(v, Tensor) else math.expm1(v)


def _sqrt(v):
    return torch.sqrt(v) if isinstance(v, Tensor) else math.sqrt(v)


def _log1p(v):
    return torch.log1p(v) if isinstance(v, Tensor) else math.log1p(v)


# ----------------------------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1): D(x, s) = c_skip x + c_out F(c_in x, c_noise), with x on [-1, 1]
# and s the noise level on that scale (twice the pixel sigma). Each returns (c_skip, c_out, c_in, c_noise).
# ----------------------------------------------------------------------------------------------------------------------

def edm_preconditioning(sigma_pm1, sigma_data: float = 0.5):
    """EDM's own: ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``,
    ``c_noise = ln(s)/4``."""
    total = _sqrt(sigma_pm1**2 + sigma_data**2)
    return sigma_data**2 / total**2, sigma_pm1 * sigma_data / total, 1.0 / total, _log(sigma_pm1) / 4.0


def vp_preconditioning(sigma_pm1, beta_min: float = VP_BETA_MIN, beta_d: float = VP_BETA_MAX - VP_BETA_MIN,
                       steps: int = DDPM_STEPS):
    """VP: ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) t(s)`` with ``t(s)`` the VP-SDE
    time of noise level ``s`` (beta(t) = beta_min + beta_d t), as :meth:`VPSchedule.t_of_sigma` solves it."""
    t = VPSchedule(beta_min, beta_min + beta_d).t_of_sigma(pm1_sigma_to_pixel(sigma_pm1))
    return 1.0, -sigma_pm1, 1.0 / _sqrt(sigma_pm1**2 + 1.0), (steps - 1) * t


def ve_preconditioning(sigma_pm1):
    """VE: ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``."""
    return 1.0, sigma_pm1, 1.0, _log(0.5 * sigma_pm1)


def _log(v):
    return torch.log(v) if isinstance(v, Tensor) else math.log(v)
