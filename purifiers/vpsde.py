"""COUP and DiffPure: adversarial purification by the reverse VP-SDE, optionally guided by classifier confidence.

| Paper link (COUP): https://arxiv.org/abs/2408.05900 (Zhang, Li, Chen, Guo, Cheng, ECAI 2024)
| Paper link (DiffPure): https://arxiv.org/abs/2205.07460 (Nie et al., ICML 2022)

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420 (Athalye et al.), https://arxiv.org/abs/1902.06705 (Carlini et al.) and
  https://arxiv.org/abs/2202.13711 (Croce et al.).

The solver
----------
The VP-SDE of Song et al. (2021) (COUP eq. 6): ``f(x, t) = -beta(t) x / 2``, ``g(t) = sqrt(beta(t))``, beta linear from
0.1 to 20, on [-1, 1] data. COUP's guided reverse-time SDE (eq. 5, Algorithm 1) is

    dx = {f(x, t) - g(t)^2 [s(x, t) + lambda grad_x log max_y p(y | x)]} dt + g(t) dw_bar,

integrated from ``t*`` down to ``t_end`` (1e-5, as the reference code) by Euler-Maruyama on a uniform grid of
``round((t* - t_end) / dt)`` steps; with ``Delta = t_k - t_{k+1} > 0`` one step reads

    x_{k+1} = x_k + [beta_k x_k / 2 + beta_k (s(x_k, t_k) + lambda G(x_k))] Delta + sqrt(beta_k) dW_k,
    dW_k ~ N(0, Delta I).

The VP score comes from the package's denoiser ``D`` (the prior, on [0, 1] images at pixel sigma): ``x_t / sqrt(a)`` is
the variance-exploding form of ``x_t`` at ``sigma(t)`` (``purifiers.conventions.VPSchedule``), so
``s(x_t, t) = -(x_t - sqrt(a) (2 D(y, sigma(t)) - 1)) / (1 - a)`` with ``y = (x_t / sqrt(a) + 1) / 2`` (Tweedie).

The guidance ``G(x) = grad_x log max_y p(y | x)`` is the gradient of the classifier's log max-softmax, evaluated on
the current iterate mapped to the classifier's [0, 1] input as the reference code does (``(x_t + 1) / 2``, neither
rescaled by ``sqrt(a)`` nor clipped) and differentiated with respect to the solver's [-1, 1] state. The classifier
is the ordinary (not noise-aware) one, as in the paper.

Paper versus reference code
---------------------------
* COUP starts the reverse SDE at the input itself (paper section 4.2, the reference's ``--mode sde``);
  ``forward_diffusion=True`` first diffuses it to ``t*`` (the reference's ``--mode diffPure``).
* The reference computes the guidance on ``x.detach()``, so gradients taken through its solver (its stochastic
  adjoint) miss the classifier-Hessian term ``lambda g^2 grad^2 log p(y|x)`` of the augmented SDE (paper section
  4.2.1). Here the guidance stays differentiable (``create_graph=True``); ``guidance_gradient="detached"`` reproduces
  the reference's variant (same purification, partial gradient) for comparison.
* DiffPure's forward diffusion uses the continuous ``alpha_bar(t*)`` of the VP-SDE (DiffPure paper, eq. 2-3); the
  reference code reads the discrete DDPM ``alpha_bar[1000 t* - 1]`` (``forward_alpha="ddpm"``). At ``t* = 0.1`` they
  differ by 1e-3 in ``log alpha_bar``.
* Outputs are clamped to [0, 1] (the reference COUP clamps to [-1, 1]; DiffPure does not clamp).
* DiffPure's reference integrates with torchsde's fixed step ``dt = 1e-3`` from ``t*`` down to 1e-5, so at
  ``t* = 0.1`` it takes 99 steps of 1e-3 and a last, shorter one of 9.9e-4; we take ``round((t* - t_end) / dt)`` = 100
  equal steps of 9.999e-4 over the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torchsde
from torch import nn

from purifiers import noise as noise_lib
from purifiers.conventions import DDPMSchedule, VPSchedule, to_01, to_pm1
from purifiers.priors.backends import Prior
from purifiers.priors.speed import in_blocks
from purifiers.recompute import checkpointed
from purifiers.validation import as_network_dtype, check_images

Tensor = torch.Tensor
# The reference code integrates down to t = 1e-5, not 0: the score diverges as t -> 0.
DEFAULT_T_END = 1e-5
GUIDANCE_GRADIENTS = ("full", "detached")
FORWARD_ALPHAS = ("continuous", "ddpm")


# ----------------------------------------------------------------------------------------------------------------------
# The generic solver: any state shape, any score; the toy experiment uses it with closed-form functions.
# ----------------------------------------------------------------------------------------------------------------------

def time_grid(t_star: float, t_end: float, num_steps: int) -> Tensor:
    """The uniform Euler grid ``t_0 = t* > t_1 > ... > t_N = t_end`` (float64, shape (N + 1,))."""
    return torch.linspace(float(t_star), float(t_end), int(num_steps) + 1, dtype=torch.float64)


def brownian_increments(shape, grid: Tensor, generator: torch.Generator | None = None, device=None,
                        dtype=torch.float32) -> Tensor:
    """Brownian increments ``dW_k ~ N(0, (t_k - t_{k+1}) I)`` for every step of ``grid``: shape ``(N, *shape)``."""
    steps = (grid[:-1] - grid[1:]).to(device=device, dtype=dtype)
    z = noise_lib.randn((len(steps), *shape), generator, device=device, dtype=dtype, batch_dim=1)
    return z * steps.sqrt().reshape(-1, *([1] * len(shape)))


def coarsen_increments(increments: Tensor, indices: Tensor) -> Tensor:
    """Increments of the same Brownian path on the sub-grid ``grid[indices]``: ``W(t_{i_{j+1}}) - W(t_{i_j})``."""
    path = torch.cat([torch.zeros_like(increments[:1]), increments.cumsum(0)])
    return path[indices[1:]] - path[indices[:-1]]


def subgrid_indices(num_steps: int, coarse_steps: int) -> Tensor:
    """Indices of ``coarse_steps + 1`` points of an ``num_steps``-step grid, as evenly spaced as the grid allows."""
    return torch.linspace(0, num_steps, coarse_steps + 1, dtype=torch.float64).round().long()


def reverse_vp_step(x: Tensor, t: float, delta: float, dw: Tensor, schedule: VPSchedule,
                    score_fn: Callable[[Tensor, float], Tensor], guidance_fn: Callable[[Tensor], Tensor] | None = None,
                    guidance_scale: float = 0.0) -> Tensor:
    """One Euler-Maruyama step of the guided reverse VP-SDE (COUP eq. 5-6) from time ``t`` to ``t - delta``.

    :param score_fn: ``score_fn(x, t)``, the score of the VP marginal ``p_t`` at ``x``.
    :param guidance_fn: ``guidance_fn(x)``, ``grad_x log max_y p(y | x)``; unused when ``guidance_scale`` is 0.
    """
    drift = reverse_vp_drift(x, t, schedule, score_fn, guidance_fn, guidance_scale)
    return x + drift * delta + schedule.beta(t) ** 0.5 * dw


def reverse_vp_drift(x: Tensor, t: float, schedule: VPSchedule, score_fn: Callable[[Tensor, float], Tensor],
                     guidance_fn: Callable[[Tensor], Tensor] | None = None, guidance_scale: float = 0.0) -> Tensor:
    """The drift of COUP eq. 5 in reversed time (``dx / d(-t)``): ``-[f - g^2 (s + lambda G)]``
    ``= beta x / 2 + beta (s + lambda G)`` with the VP-SDE's ``f = -beta x / 2``, ``g^2 = beta`` (eq. 6)."""
    beta = schedule.beta(t)
    drift_score = score_fn(x, t)
    if guidance_fn is not None and guidance_scale != 0.0:
        drift_score = drift_score + guidance_scale * guidance_fn(x)
    return 0.5 * beta * x + beta * drift_score


def _marginal_coefficients(alpha_bar: float) -> tuple[float, float]:
    """``(sqrt(a), sqrt(1 - a))``, ``a = alpha_bar``: the forward marginal is ``N(sqrt(a) x_0, (1 - a) I)``."""
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def solve_reverse_vp(x: Tensor, grid: Tensor, increments: Tensor, schedule: VPSchedule,
                     score_fn: Callable[[Tensor, float], Tensor], guidance_fn: Callable[[Tensor], Tensor] | None = None,
                     guidance_scale: float = 0.0, checkpoint_steps: bool = False,
                     on_state: Callable[[int, Tensor], Tensor | None] | None = None) -> Tensor:
    """Integrate the guided reverse VP-SDE from ``grid[0]`` to ``grid[-1]`` with the given Brownian increments.

    :param x: the state at ``grid[0]`` (any shape; batch first).
    :param increments: ``(len(grid) - 1, *x.shape)``, ``dW_k ~ N(0, grid[k] - grid[k+1])``.
    :param checkpoint_steps: recompute each step in the backward pass (:func:`purifiers.recompute.checkpointed`)
        instead of storing its graph, so memory holds one state per step rather than every network activation of
        every step. The forward pass runs each step once without a graph (the guidance's own gradient taken without
        ``create_graph``); the backward pass runs it once more with the guidance differentiable, so the classifier's
        Hessian term is kept and each step costs two network forwards in all.
    :param on_state: ``on_state(k, x_k)`` is called with the state ``x_k`` at ``grid[k]`` after each step
        (``k = 1 .. N``), part of the graph when one is recorded; it may return the tensor the solver continues with
        (the same values: an attack's loss on the intermediate states, e.g. DiffAttack's, wraps the state so that its
        gradient joins the chain at that step), or ``None``.
    """
    if increments.shape != (len(grid) - 1, *x.shape):
        raise ValueError(f"increments have shape {tuple(increments.shape)}; expected {(len(grid) - 1, *x.shape)}.")
    times = grid.tolist()
    for k in range(len(times) - 1):
        step = partial(_reverse_vp_piece, times[k], times[k] - times[k + 1], schedule, score_fn, guidance_fn,
                       guidance_scale)
        if checkpoint_steps and torch.is_grad_enabled() and x.requires_grad:
            x = checkpointed(step, x, increments[k])[0]
        else:
            x = reverse_vp_step(x, times[k], times[k] - times[k + 1], increments[k], schedule, score_fn, guidance_fn,
                                guidance_scale)
        if on_state is not None:
            replaced = on_state(k + 1, x)
            x = x if replaced is None else replaced
    return x


def _reverse_vp_piece(t, delta, schedule, score_fn, guidance_fn, guidance_scale, differentiable, x, dw):
    with torch.set_grad_enabled(differentiable):
        return (reverse_vp_step(x, t, delta, dw, schedule, score_fn, guidance_fn, guidance_scale),)


@dataclass
class SDENoise:
    """Every random draw of one purification: the forward-diffusion noise (``None`` when the SDE starts at the input)
    and the Brownian increments of the reverse SDE on the fine grid ``grid``."""

    start: Tensor | None
    increments: Tensor
    grid: Tensor

    def on_steps(self, num_steps: int) -> tuple[Tensor, Tensor]:
        """``(grid, increments)`` of the same Brownian path on a grid of ``num_steps`` steps (a sub-grid of the fine
        one: Lee & Kim's coarse surrogate sees the same noise as the defense)."""
        fine_steps = len(self.grid) - 1
        if num_steps == fine_steps:
            return self.grid, self.increments
        if not 1 <= num_steps <= fine_steps:
            raise ValueError(f"a solver on {num_steps} steps cannot reuse a {fine_steps}-step Brownian path.")
        idx = subgrid_indices(fine_steps, num_steps)
        return self.grid[idx], coarsen_increments(self.increments, idx.to(self.increments.device))


# ----------------------------------------------------------------------------------------------------------------------
# The purifiers
# ----------------------------------------------------------------------------------------------------------------------

class ReverseVPSDE(nn.Module):
    """Purification by the (guided) reverse VP-SDE; :class:`COUP` and :class:`DiffPure` are its two settings.

    :param prior: the score prior (a :class:`purifiers.priors.backends.Prior`, denoiser on [0, 1] images at pixel sigma).
    :param classifier: maps [0, 1] images to logits; needed when ``guidance_scale > 0``.
    :param t_star: the diffusion time the reverse SDE starts at (0.1 for l_inf, 0.075 for l_2 in both papers).
    :param guidance_scale: lambda of COUP eq. 5 (0: the unguided reverse SDE).
    :param dt: the Euler step; the solver takes ``round((t_star - t_end) / dt)`` uniform steps.
    :param t_end: where the reverse SDE stops (1e-5, as the reference code).
    :param forward_diffusion: diffuse the input to ``t_star`` first (``sqrt(a) x + sqrt(1 - a) eps``, DiffPure) or
        start the reverse SDE at the input (COUP).
    :param forward_alpha: ``"continuous"`` (the VP-SDE's alpha_bar(t*), DiffPure paper) or ``"ddpm"`` (the discrete
        DDPM alpha_bar at timestep ``1000 t* - 1``, as the reference code).
    :param guidance_gradient: ``"full"`` (the guidance stays differentiable, the classifier-Hessian term included) or
        ``"detached"`` (the reference code's guidance, a constant to backpropagation).
    :param checkpoint_steps: when differentiated, recompute each solver step in the backward pass.
    :param resize_to: purify at this square side: the input is resized (bilinear) to it and the result back to the
        input's size, DiffPure's ImageNet convention (224 -> 256 for guided-diffusion's 256x256 model); ``None``: no
        resizing.
    """

    #: draws its noise through :mod:`purifiers.noise`, so the ART wrapper may hand it per-image streams
    row_generators = True

    def __init__(self, prior: Prior, classifier: nn.Module | None = None, *, t_star: float = 0.1,
                 guidance_scale: float = 0.0, dt: float = 1e-3, t_end: float = DEFAULT_T_END,
                 forward_diffusion: bool = False, forward_alpha: str = "continuous", guidance_gradient: str = "full",
                 checkpoint_steps: bool = True, schedule: VPSchedule | None = None, resize_to: int | None = None):
        super().__init__()
        self.prior = prior
        self.classifier = classifier
        self.t_star = t_star
        self.guidance_scale = guidance_scale
        self.dt = dt
        self.t_end = t_end
        self.forward_diffusion = forward_diffusion
        self.forward_alpha = forward_alpha
        self.guidance_gradient = guidance_gradient
        self.checkpoint_steps = checkpoint_steps
        self.schedule = schedule or VPSchedule()
        self.resize_to = resize_to
        # Images through the classifier for the guidance (forward passes; each also costs one backward pass).
        self.guidance_evaluations = 0
        self.check_params()

    def check_params(self) -> None:
        """Raise ``ValueError`` for settings the solver cannot run."""
        if not isinstance(self.prior, Prior):
            raise ValueError("prior must be a purifiers Prior (see purifiers.load_prior), "
                             f"got {type(self.prior).__name__}.")
        if not 0.0 < float(self.t_end) < float(self.t_star) <= 1.0:
            raise ValueError(f"need 0 < t_end < t_star <= 1, got t_end={self.t_end}, t_star={self.t_star}.")
        if not 0.0 < float(self.dt) <= float(self.t_star) - float(self.t_end):
            raise ValueError(f"dt must be in (0, t_star - t_end], got {self.dt}.")
        if not float(self.guidance_scale) >= 0.0:
            raise ValueError(f"guidance_scale (lambda) must be >= 0, got {self.guidance_scale}.")
        if self.guidance_scale > 0 and self.classifier is None:
            raise ValueError("guidance_scale > 0 needs the classifier the guidance comes from.")
        if self.forward_alpha not in FORWARD_ALPHAS:
            raise ValueError(f"forward_alpha must be one of {FORWARD_ALPHAS}, got {self.forward_alpha!r}.")
        if self.guidance_gradient not in GUIDANCE_GRADIENTS:
            raise ValueError(f"guidance_gradient must be one of {GUIDANCE_GRADIENTS}, got {self.guidance_gradient!r}.")
        if self.resize_to is not None and not (type(self.resize_to) is int and self.resize_to > 0):
            raise ValueError(f"resize_to must be a positive integer (a square side) or None, got {self.resize_to!r}.")

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Euler steps of the reverse SDE (100 at the default t* = 0.1, dt = 1e-3)."""
        return max(1, round((float(self.t_star) - float(self.t_end)) / float(self.dt)))

    def grid(self) -> Tensor:
        return time_grid(self.t_star, self.t_end, self.num_steps)

    def vp_score(self, x: Tensor, t: float) -> Tensor:
        """Score of the VP marginal ``p_t`` at ``x`` ([-1, 1] units), from the prior's denoiser by Tweedie."""
        log_a = self.schedule.log_alpha_bar(t)
        sqrt_a, one_minus_a = math.exp(0.5 * log_a), -math.expm1(log_a)
        sigma = self.schedule.sigma(t)  # pixel sigma of the variance-exploding form x_t / sqrt(a)
        denoised = self.prior.denoise_unchecked(to_01(x / sqrt_a), sigma)
        return -(x - sqrt_a * to_pm1(denoised)) / one_minus_a

    def guidance(self, x: Tensor) -> Tensor:
        """``grad_x log max_y p(y | x)`` with the classifier on ``(x + 1) / 2``; differentiable when autograd records
        (and ``guidance_gradient="full"``), so backpropagation includes the classifier's Hessian."""
        self.guidance_evaluations += x.shape[0]
        differentiable = torch.is_grad_enabled() and x.requires_grad and self.guidance_gradient == "full"
        with torch.enable_grad():
            x_in = x if differentiable else x.detach().requires_grad_(True)
            if self.prior.speed_options.batch_invariant:  # the classifier in fixed-size blocks too
                logits = in_blocks(self.classifier, to_01(x_in))
            else:
                logits = self.classifier(to_01(x_in))
            log_confidence = torch.log_softmax(logits, dim=-1).max(dim=-1).values
            # Rows are independent (classifier in eval mode), so the gradient of the sum is each row's gradient.
            (grad,) = torch.autograd.grad(log_confidence.sum(), x_in, create_graph=differentiable)
        return grad

    @property
    def guidance_fn(self) -> Callable[[Tensor], Tensor] | None:
        return self.guidance if self.guidance_scale > 0 else None

    # ------------------------------------------------------------------------------------------------------------------
    def draw_noise(self, x: Tensor, generator: torch.Generator | None = None) -> SDENoise:
        """All random draws of one purification of ``x``, from ``generator`` (a fixed seed gives fixed noise)."""
        shape = x.shape if self.resize_to is None else (*x.shape[:2], self.resize_to, self.resize_to)
        start = None
        if self.forward_diffusion:
            start = noise_lib.randn(shape, generator, device=x.device, dtype=x.dtype)
        grid = self.grid()
        return SDENoise(start, brownian_increments(shape, grid, generator, x.device, x.dtype), grid)

    def _resized(self, x: Tensor, side=None) -> Tensor:
        """``x`` resized (bilinear, as DiffPure's ImageNet evaluation) to ``side`` (default :attr:`resize_to`)."""
        size = side if side is not None else (self.resize_to, self.resize_to)
        if self.resize_to is None or tuple(x.shape[-2:]) == tuple(size):
            return x
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def start_state(self, x: Tensor, noise: SDENoise) -> Tensor:
        """The reverse SDE's state at ``t*`` ([-1, 1]): the input (COUP) or its forward diffusion (DiffPure)."""
        x_pm1 = to_pm1(x)
        if not self.forward_diffusion:
            return x_pm1
        if self.forward_alpha == "continuous":
            signal, noise_scale = self.diffusion_coefficients(float(self.t_star))
        else:
            ddpm = DDPMSchedule()
            signal, noise_scale = _marginal_coefficients(
                float(ddpm.alphas_cumprod[max(0, round(ddpm.num_steps * float(self.t_star)) - 1)]))
        return signal * x_pm1 + noise_scale * noise.start

    def diffusion_coefficients(self, t: float) -> tuple[float, float]:
        """``(sqrt(a), sqrt(1 - a))`` of the forward diffusion to time ``t``, ``a = alpha_bar(t)`` the VP-SDE's
        continuous one (DiffPure eq. 2-3; the marginal ``q(x_t | x_0) = N(sqrt(a) x_0, (1 - a) I)``)."""
        return _marginal_coefficients(self.schedule.alpha_bar(float(t)))

    def solver_units(self, x: Tensor) -> Tensor:
        """[0, 1] images ``x`` in the solver's [-1, 1] units, at the purification's resolution."""
        return to_pm1(self._resized(x))

    def purify(self, x: Tensor, noise: SDENoise, num_steps: int | None = None,
               on_state: Callable[[int, Tensor], Tensor | None] | None = None) -> Tensor:
        """Purify [0, 1] images ``x`` with the given noise, on ``num_steps`` steps (default: the fine grid).

        Differentiable in ``x`` when autograd records (steps checkpointed when ``checkpoint_steps``). ``on_state``:
        see :func:`solve_reverse_vp` (the states are in the solver's [-1, 1] units, at the purification's resolution).
        """
        grid, increments = noise.on_steps(num_steps or len(noise.grid) - 1)
        differentiable = torch.is_grad_enabled() and x.requires_grad
        out = solve_reverse_vp(self.start_state(self._resized(x), noise), grid, increments, self.schedule,
                               self.vp_score, self.guidance_fn, float(self.guidance_scale),
                               checkpoint_steps=self.checkpoint_steps and differentiable, on_state=on_state)
        return self._resized(to_01(out), x.shape[-2:]).clamp(0.0, 1.0)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Purify a batch of [0, 1] NCHW images; every random draw comes from ``generator``. Any floating dtype is
        accepted: the purification runs in the prior network's dtype and the result comes back in the input's.
        (:meth:`purify` is the unchecked path, for callers that validated ``x`` already.)"""
        check_images(x, name="purifier input")
        x_net = as_network_dtype(x, self.prior)
        return self.purify(x_net, self.draw_noise(x_net, generator)).to(x.dtype)

    # ------------------------------------------------------------------------------------------------------------------
    def purify_adjoint(self, x: Tensor, noise: SDENoise, adjoint_method: str | None = None) -> Tensor:
        """The same purification through ``torchsde.sdeint_adjoint`` (Euler), as the reference code runs it: the
        backward pass solves the stochastic adjoint SDE (Li et al. 2020) on the same Brownian path instead of
        backpropagating through the solver's steps. ``adjoint_method=None`` is torchsde's default (Milstein for Ito
        diagonal noise), which the reference uses."""
        image = self._resized(x)
        start = self.start_state(image, noise)
        # torchsde integrates forward in time: s = -t runs from -t* up to -t_end.
        solver_times = -noise.grid
        sde = _TorchsdeReverseVPSDE(self, image.shape[1:])
        bm = _GridBrownian(solver_times, noise.increments.flatten(2))
        step = float(noise.grid[0] - noise.grid[1])
        ys = torchsde.sdeint_adjoint(sde, start.flatten(1), solver_times[[0, -1]].to(x.device), bm=bm, method="euler",
                                     adjoint_method=adjoint_method, dt=step, adjoint_params=())
        return self._resized(to_01(ys[-1].reshape(image.shape)), x.shape[-2:]).clamp(0.0, 1.0)


class COUP(ReverseVPSDE):
    """Classifier-cOnfidence gUided Purification (COUP, Zhang et al., ECAI 2024; Algorithm 1, eq. 5-6).

    The reverse VP-SDE from ``t*`` to ~0 starting at the input, with the classifier-confidence guidance
    ``lambda grad_x log max_y p(y|x)`` added to the score; ``guidance_scale=0`` is the paper's "w/o guidance" ablation.
    See the module docstring for the equations, the paper-versus-code choices and the limitations of defences.

    :param prior: the score prior (denoiser on [0, 1] images at pixel sigma).
    :param classifier: the classifier whose confidence guides the purification (maps [0, 1] images to logits).
    :param t_star: 0.1 for l_inf, 0.075 for l_2 (paper section 5.1).
    :param guidance_scale: lambda (1.0 in the paper, section 5.4).

    Further keyword arguments: see :class:`ReverseVPSDE`.
    """

    def __init__(self, prior: Prior, classifier: nn.Module | None, t_star: float = 0.1, guidance_scale: float = 1.0,
                 **kwargs):
        super().__init__(prior, classifier, t_star=t_star, guidance_scale=guidance_scale, **kwargs)


class DiffPure(ReverseVPSDE):
    """DiffPure (Nie et al., ICML 2022): diffuse the input to ``t*`` (``sqrt(a) x + sqrt(1 - a) eps``), then solve the
    unguided reverse VP-SDE to ~0. See the module docstring for the equations and the limitations of defences.

    :param prior: the score prior (denoiser on [0, 1] images at pixel sigma).
    :param t_star: 0.1 for CIFAR-10 l_inf, 0.075 for l_2, 0.15 for ImageNet (DiffPure's settings).

    Further keyword arguments (``dt``, ``t_end``, ``forward_alpha``, ``checkpoint_steps``): see :class:`ReverseVPSDE`.
    """

    def __init__(self, prior: Prior, t_star: float = 0.1, **kwargs):
        for fixed in ("classifier", "guidance_scale", "forward_diffusion"):
            if fixed in kwargs:
                raise ValueError(f"DiffPure has no {fixed!r} setting (it is the unguided reverse SDE after forward "
                                 "diffusion); use COUP(..., forward_diffusion=True) for a guided variant.")
        super().__init__(prior, None, t_star=t_star, guidance_scale=0.0, forward_diffusion=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# torchsde plumbing for the adjoint
# ----------------------------------------------------------------------------------------------------------------------

class _TorchsdeReverseVPSDE(nn.Module):
    """The reverse SDE in torchsde's form: time ``s = -t`` increases, state flattened to (batch, d)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, purifier: ReverseVPSDE, image_shape):
        super().__init__()
        self.purifier = purifier
        self.image_shape = tuple(image_shape)

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        p = self.purifier
        x = y.reshape(-1, *self.image_shape)
        return reverse_vp_drift(x, -float(s), p.schedule, p.vp_score, p.guidance_fn, p.guidance_scale).flatten(1)

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        return torch.full_like(y, self.purifier.schedule.beta(-float(s)) ** 0.5)


class _GridBrownian(torchsde.BaseBrownian):
    """A Brownian path known on a time grid (the solver's increments), in torchsde's ``BaseBrownian`` interface, so
    that torchsde's forward solve and its adjoint see exactly the noise of :meth:`ReverseVPSDE.purify`.

    Queries must fall on grid points (to a 1e-3 step tolerance: torchsde accumulates its times in floating point)."""

    def __init__(self, times: Tensor, increments: Tensor):
        self._times = times.to(torch.float64).cpu()
        self._path = torch.cat([torch.zeros_like(increments[:1]), increments.cumsum(0)])
        self._tolerance = 1e-3 * float((self._times[1:] - self._times[:-1]).abs().min())

    def _index(self, s) -> int:
        k = int((self._times - float(s)).abs().argmin())
        if abs(float(self._times[k]) - float(s)) > self._tolerance:
            raise ValueError(f"Brownian path queried at s={float(s)!r}, off its grid.")
        return k

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if return_U or return_A:
            raise ValueError("the grid Brownian path has no Levy area; use an Euler or Milstein method.")
        if tb is None:
            return self._path[self._index(ta)]
        return self._path[self._index(tb)] - self._path[self._index(ta)]

    def __repr__(self):
        return f"GridBrownian(steps={len(self._times) - 1}, shape={tuple(self.shape)})"

    @property
    def dtype(self):
        return self._path.dtype

    @property
    def device(self):
        return self._path.device

    @property
    def shape(self):
        return self._path.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"
