"""ADP, Adaptive Denoising Purification (Yoon, Hwang, Lee, ICML 2021), as a pure-torch module.

| Paper link: https://arxiv.org/abs/2106.06041 (Algorithm 1, §3.2-3.4, eqs. 11-18; supplement App. D-F)

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420, https://arxiv.org/abs/1902.06705 and https://arxiv.org/abs/2202.13711 (where
  ADP's reported 70% robust accuracy fell to about 34% under a full-gradient attack).

The algorithm (Algorithm 1), for one run; the S runs of the ensemble (eq. 13) are a batch of S copies, which
:class:`purifiers.PurifiedClassifier` builds (``runs=S``)::

    x_0 = clip(x + N(0, sigma^2 I), 0, 1)                                    (eq. 12, §5)
    for t = 1..T:
        x'        = x_{t-1} + delta s(x_{t-1})
        alpha     = lambda delta / (1 - <s(x_{t-1}), s(x')> / |s(x_{t-1})|^2)   (eqs. 16-18; = lambda sigma_t)
        x_t       = x_{t-1} + alpha s(x_{t-1})                                (eq. 11)
        stop this sample once |s(x_t)| < tau                                  (Algorithm 1; sticky)

Here ``s`` is ADP's sigma-unconditional score, the raw NCSNv2 output ``s(x) = sigma s(x, sigma)`` (§3.1), which
behaves like ``-(x - mu) / sigma_t`` near ``x`` (eq. 14). Our priors are noise-conditional denoisers ``D(x, c)``, so
``s(x) = c * score(x, c) = (D(x, c) - x) / c`` needs a conditioning level ``c`` (pixel units); ``conditioning``
chooses it per sample and per step:

* ``"running"``: ``c_1`` = the injected sigma, then ``c_{t+1} = sigma_t``, the local noise level of eq. (17) that the
  step rule has just estimated (the quantity whose role the unconditional network plays implicitly);
* ``"injected"``: ``c_t = sigma`` at every step (a fixed level, as in a first prototype of ours);
* ``"tracked"``: ``c_1`` = the injected sigma, then ``c_{t+1} = c_t - alpha_t``: the noise level that the local model
  of eq. (14) predicts after the step (``s = -(x - mu) / c`` and ``x_{t+1} - mu = (1 - alpha / c) (x_t - mu)``), i.e.
  the level an unconditional network would read off the partly cleaned image.

Levels are kept inside ``sigma_range``. The default is ``"injected"``, chosen on the MNIST validation split
(``python -m benchmarks adp-study sweep``; the numbers are in the README). Why the others fall behind: eq. (17)
measures the curvature of the *conditioned* score, ``sigma_t = c / (1 - r)`` with ``r = <s, J_D s> / |s|^2 >= 0``, so
it returns at least the level it was given and ``"running"`` feeds on itself up to ``sigma_range[1]`` (over-smoothing
clean images), while ``"tracked"`` lowers the level so fast that an adversarial perturbation is kept as detail.
With a calibrated score each step shrinks the distance to the local mode by ``lam`` (eq. 15), so the paper's 0.05
over T = 10 steps removes only 40% of the injected noise and perturbation, and 0.4 leaves 0.6%. (How the paper's
unconditional NCSNv2 moves further with 0.05 is not verifiable without its weights; its near scale-free output would
make ``1 - z`` small and push ``alpha`` to the reference code's upper clamp 0.1.)

Step rules (``step_rule``):

* ``"paper"``: eq. (18) with the paper's ``delta = 1e-5`` (§3.4, §5) and the paper's stopping test on the score norm
  ``|s(x_t)| < tau``; no clipping between steps. Where the probe finds no decrease of the score (``1 - z <= 0``,
  outside the local Gaussian model of eq. 14) eq. (18) would give a negative or infinite step; the implied
  ``sigma_t`` is then taken as ``sigma_range[1]`` (and kept inside ``sigma_range`` always).
* ``"reference"``: the authors' code (github.com/jmyoon1/adp, ``purification/adp.py``): probe ``delta = 1e-3``,
  ``alpha = clamp(lambda delta / (1 - z), 1e-5, 0.1)``, a sample stops once ``alpha <= tau``, and ``x`` is clipped to
  [0, 1] after every step. (The code's ``grid_to_raw`` rescaling after each step is not reproduced: it is a 0.4%
  contrast stretch per step that the paper does not describe. Nor is its grid transform of the start: the code also
  evaluates its first score at ``x * 255/256 + 1/512``, which scales the first update by 256/255. The code's option of
  binary noise, ``+-sigma sqrt(2/pi)`` per pixel instead of Gaussian, is not implemented.)

Detection gate (App. F, ``detection_threshold``): inputs whose score norm exceeds a threshold taken from natural
training images get the full noise ``sigma``, the others ``beta * sigma`` (beta = 0.2), which spares clean accuracy.

Gradients: with autograd on and ``x.requires_grad`` the module is differentiable in ``x`` through every step. Each
score evaluation is checkpointed (:mod:`purifiers.recompute`), so memory does not grow with ``T`` beyond a few
images per step. By default the step sizes (and the conditioning levels derived from them) are constants of the backward
pass, as in Croce et al. (2022); ``step_size_gradient=True`` differentiates them too (through the probe evaluation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from purifiers import noise as noise_lib
from purifiers.priors.backends import Prior
from purifiers.recompute import checkpointed
from purifiers.validation import as_network_dtype, check_images

Tensor = torch.Tensor

# Defaults of the paper (§3.4, §5): lambda = 0.05, delta = 1e-5, tau = 1e-3, T = 10 steps.
PAPER_LAMBDA, PAPER_DELTA, PAPER_TAU, PAPER_STEPS = 0.05, 1e-5, 1e-3, 10
# The authors' code: finite-difference probe 1e-3 and the step size clamped to [1e-5, 0.1].
REFERENCE_DELTA, REFERENCE_ALPHA_RANGE = 1e-3, (1e-5, 0.1)
# ADP clips x + noise to [0, 1] first, so it is defined for inputs that already carry noise (randomized smoothing adds
# Gaussian noise before the defence); values beyond 4 noise stds of std 1 mean a scale error (e.g. 0-255 images).
NOISY_INPUT_RANGE = (-4.0, 5.0)
# An iterate this far outside [0, 1] is no image any more: the step rule has diverged.
DIVERGENCE_BOUND = 2.0
STEP_RULES = ("paper", "reference")
CONDITIONINGS = ("running", "injected", "tracked")
DEFAULT_CONDITIONING = "injected"


class ADPDivergedError(ValueError):
    """The updates left the image range (``|x| > DIVERGENCE_BOUND``): the step sizes overshoot for this prior and
    these settings (seen with ``conditioning="tracked"`` and a large ``lam``)."""


def median_heuristic_sigma(x, max_images: int = 2000) -> float:
    """The paper's noise level (§3.3, after Garreau et al. 2018): the median pairwise Euclidean distance of the
    images divided by ``sqrt(D)``, ``D`` the number of values per image.

    :param x: (N, C, H, W) images in [0, 1] (torch or numpy), N >= 2; only the first ``max_images`` are used.
    """
    check_images(x, name="images")
    flat = torch.as_tensor(x[:max_images]).reshape(min(len(x), max_images), -1).double()
    if flat.shape[0] < 2:
        raise ValueError("the median heuristic needs at least 2 images.")
    i, j = torch.triu_indices(flat.shape[0], flat.shape[0], offset=1)
    distances = torch.cdist(flat, flat)[i, j]
    return float(torch.quantile(distances, 0.5) / math.sqrt(flat.shape[1]))


def adp_score(prior: Prior, x: Tensor, cond: Tensor) -> Tensor:
    """ADP's score ``s(x) = c * grad log p_c(x) = (D(x, c) - x) / c`` at conditioning level ``cond`` (N,)."""
    return (prior.denoise_unchecked(x, cond) - x) / _per_image(cond)


def score_norm(prior: Prior, x: Tensor, sigma: float, batch_size: int = 256) -> Tensor:
    """``|s(x)|_2`` per image at conditioning level ``sigma`` (no gradient), shape (N,): App. F's detection statistic."""
    norms = []
    with torch.no_grad():
        for xb in torch.as_tensor(x).split(batch_size):
            cond = torch.full((xb.shape[0],), float(sigma), dtype=xb.dtype, device=xb.device)
            norms.append(_sum_per_image(adp_score(prior, xb, cond) ** 2).sqrt())
    return torch.cat(norms)


def detection_threshold_from_natural(prior: Prior, x_natural, detection_sigma: float = 0.1,
                                     quantile: float = 0.95) -> float:
    """The ``quantile`` of the score norms of natural (training) images at ``detection_sigma``, the statistic App. F
    bases its threshold on: about ``1 - quantile`` of natural inputs get flagged."""
    check_images(x_natural, name="natural images")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}.")
    return float(torch.quantile(score_norm(prior, x_natural, detection_sigma).double(), quantile))


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _per_image(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


def _sum_per_image(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


class ADP(nn.Module):
    """Adaptive Denoising Purification (Algorithm 1): noise injection, then adaptive deterministic score steps,
    optionally behind the detection gate of App. F.

    :param prior: a :class:`purifiers.Prior` (the score network).
    :param sigma: pixel std of the injected Gaussian noise (paper: 0.25 on CIFAR-10, from
        :func:`median_heuristic_sigma`); with the detection gate this is ``sigma_high``.
    :param steps: the maximum number of updates ``T``.
    :param lam: ``lambda`` of eq. (18), the fraction by which each step should shrink the score (paper: 0.05).
    :param delta: the finite-difference probe of eq. (17); ``None``: 1e-5 (``"paper"``) or 1e-3 (``"reference"``).
    :param tau: stopping threshold: on ``|s(x_t)|`` (``"paper"``) or on ``alpha`` (``"reference"``).
    :param step_rule: ``"paper"`` or ``"reference"`` (see the module docstring).
    :param conditioning: the prior's noise level per step: ``"running"``, ``"injected"`` or ``"tracked"``.
    :param sigma_range: ``(low, high)`` bounds for the conditioning level and for ``sigma_t`` (pixel units). The
        default keeps the level where a denoiser is trained (EDM's training levels put about 98% of their mass
        between pixel sigma 0.014 and 1.7); with ``"tracked"`` and a large ``lam`` the level shrinks fast, and below
        ~0.01 the score ``(D - x) / c`` of a real network is unreliable (runs diverged in a validation sweep).
    :param step_size_gradient: differentiate the step sizes (and conditioning levels) instead of treating them as
        constants of the backward pass.
    :param checkpoint_steps: checkpoint each score evaluation when a gradient is taken (memory flat in ``T``).
    :param detection_threshold: ``None`` (no gate), or the score-norm threshold of App. F: an input whose score norm
        ``|s(x)|`` at level ``detection_sigma`` exceeds it is treated as attacked and gets ``sigma``; any other input
        gets ``beta * sigma``. The paper fixes 25.0 for its CIFAR networks; the value is model-specific, so take it
        from natural training images with :func:`detection_threshold_from_natural`. The gate's decision is a
        constant of the backward pass (it is piecewise constant in ``x``).
    :param beta: the gate's ``sigma_low / sigma_high`` (App. F: 0.2).
    :param detection_sigma: the conditioning level of the gate's score (the paper's unconditional network needs none).
    """

    #: draws its noise through :mod:`purifiers.noise`, so the ART wrapper may hand it per-image streams
    row_generators = True

    def __init__(self, prior: Prior, sigma: float = 0.25, steps: int = PAPER_STEPS, lam: float = PAPER_LAMBDA,
                 delta: float | None = None, tau: float = PAPER_TAU, step_rule: str = "paper",
                 conditioning: str = DEFAULT_CONDITIONING, sigma_range: tuple[float, float] = (0.01, 1.0),
                 step_size_gradient: bool = False, checkpoint_steps: bool = True,
                 detection_threshold: float | None = None, beta: float = 0.2, detection_sigma: float = 0.1):
        super().__init__()
        if not isinstance(prior, Prior):
            raise ValueError(f"prior must be a purifiers.Prior, got {type(prior).__name__}.")
        self.prior = prior
        self.sigma = sigma
        self.steps = steps
        self.lam = lam
        self.delta = delta
        self.tau = tau
        self.step_rule = step_rule
        self.conditioning = conditioning
        self.sigma_range = tuple(sigma_range)
        self.step_size_gradient = step_size_gradient
        self.checkpoint_steps = checkpoint_steps
        self.detection_threshold = detection_threshold
        self.beta = beta
        self.detection_sigma = detection_sigma
        self.check_params()

    def check_params(self) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter (also after changing one in place)."""
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {self.step_rule!r}.")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}.")
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")
        for name in ("sigma", "lam", "probe_delta", "detection_sigma"):
            if not _positive_number(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        if not self.lam < 1:
            raise ValueError(f"lam must lie in (0, 1) (eq. 15 shrinks the score by 1 - lambda), got {self.lam}.")
        if not (_positive_number(self.tau) or self.tau == 0):
            raise ValueError(f"tau must be a non-negative number, got {self.tau!r}.")
        if len(self.sigma_range) != 2 or not 0 < self.sigma_range[0] < self.sigma_range[1]:
            raise ValueError(f"sigma_range must be (low, high) with 0 < low < high, got {self.sigma_range!r}.")
        for name in ("step_size_gradient", "checkpoint_steps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.detection_threshold is not None and not _positive_number(self.detection_threshold):
            raise ValueError(f"detection_threshold must be None or a positive number, got {self.detection_threshold!r}.")
        if not (_positive_number(self.beta) and self.beta <= 1):
            raise ValueError(f"beta must lie in (0, 1], got {self.beta!r}.")

    @property
    def probe_delta(self) -> float:
        """``delta`` of eq. (17): the given one, else the step rule's default."""
        if self.delta is not None:
            return self.delta
        return PAPER_DELTA if self.step_rule == "paper" else REFERENCE_DELTA

    # ---------------------------------------------------------------------------------------------------------------
    def injection_sigma(self, x: Tensor) -> Tensor:
        """Per-image std of the injected noise, shape (N,): ``sigma``, or with the gate ``sigma`` for flagged inputs
        and ``beta * sigma`` for the others."""
        sigma = torch.full((x.shape[0],), float(self.sigma), dtype=x.dtype, device=x.device)
        if self.detection_threshold is None:
            return sigma
        return torch.where(self.flagged(x), sigma, self.beta * sigma)

    def flagged(self, x: Tensor) -> Tensor:
        """Which inputs the detection gate treats as attacked, shape (N,) bool."""
        if self.detection_threshold is None:
            raise ValueError("flagged() needs a detection_threshold (the gate of App. F is off).")
        return score_norm(self.prior, x, self.detection_sigma) > self.detection_threshold

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Purify a batch of NCHW images (in [0, 1], possibly plus noise): one ADP run per row (repeat rows for the
        S-run ensemble). Any floating dtype is accepted: the purification runs in the prior network's dtype and the
        result comes back in the input's."""
        check_images(x, name="ADP input", value_range=NOISY_INPUT_RANGE)
        return self.purify_unchecked(as_network_dtype(x, self.prior), generator).to(x.dtype)

    def purify_unchecked(self, x: Tensor, generator=None) -> Tensor:
        """:meth:`forward` without the input checks or the dtype cast, for callers that validated ``x`` already (the
        ART wrapper). ``generator``: a ``torch.Generator``, :class:`purifiers.noise.RowGenerators` or ``None``."""
        sigma = self.injection_sigma(x)
        noise = noise_lib.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x0 = (x + _per_image(sigma) * noise).clamp(0.0, 1.0)
        return self.update(x0, sigma)

    def update(self, x0: Tensor, sigma: Tensor) -> Tensor:
        """The deterministic part of Algorithm 1 from the noisy ``x0`` (injected std ``sigma``, shape (N,))."""
        x, cond = x0, sigma.to(x0)
        active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        for t in range(self.steps):
            x, cond, active = self._step(x, cond, active, check_score_norm=t > 0)
            if not bool(torch.isfinite(x).all()) or float(x.detach().abs().max()) > DIVERGENCE_BOUND:
                raise ADPDivergedError(f"ADP diverged at step {t + 1}: values up to {float(x.detach().abs().max()):g} "
                                       f"(conditioning={self.conditioning!r}, lam={self.lam}, "
                                       f"step_rule={self.step_rule!r}); use a smaller lam or another conditioning.")
            if not active.any():
                break
        return x.clamp(0.0, 1.0)

    # ---------------------------------------------------------------------------------------------------------------
    def _score(self, x: Tensor, cond: Tensor) -> Tensor:
        if self.checkpoint_steps and torch.is_grad_enabled() and (x.requires_grad or cond.requires_grad):
            return checkpointed(self._score_piece, x, cond)[0]
        return adp_score(self.prior, x, cond)

    def _score_piece(self, differentiable: bool, x: Tensor, cond: Tensor) -> tuple[Tensor]:
        with torch.set_grad_enabled(differentiable):
            return (adp_score(self.prior, x, cond),)

    def _step(self, x: Tensor, cond: Tensor, active: Tensor, check_score_norm: bool):
        g = self._score(x, cond)
        if self.step_rule == "paper" and check_score_norm:
            # Algorithm 1 tests |s(x_t)| < tau right after the update; s(x_t) is this step's first evaluation.
            active = active & (_sum_per_image(g.detach() ** 2).sqrt() >= self.tau)
        with torch.set_grad_enabled(self.step_size_gradient and torch.is_grad_enabled()):
            g_dir, x_dir, c_dir = (g, x, cond) if self.step_size_gradient else (g.detach(), x.detach(), cond.detach())
            g_probe = self._score(x_dir + self.probe_delta * g_dir, c_dir)
            # 1 - z of eqs. (17)-(18), z = <s, s'>/|s|^2, written as -<s, s' - s>/|s|^2 so that the small
            # difference s' - s is taken per pixel (no cancellation in the sum).
            one_minus_z = -_sum_per_image(g_dir * (g_probe - g_dir)) / _sum_per_image(g_dir**2).clamp_min(1e-30)
            low, high = self.sigma_range
            if self.step_rule == "paper":
                sigma_t = torch.where(one_minus_z > 0, self.probe_delta / one_minus_z.clamp_min(1e-30),
                                      torch.full_like(one_minus_z, high)).clamp(low, high)  # eq. (17)
                alpha = self.lam * sigma_t  # eq. (16) = eq. (18)
            else:
                alpha = (self.lam * self.probe_delta / one_minus_z).nan_to_num(nan=REFERENCE_ALPHA_RANGE[0])
                alpha = alpha.clamp(*REFERENCE_ALPHA_RANGE)
                sigma_t = (alpha / self.lam).clamp(low, high)
                active = active & (alpha > self.tau)
            alpha = torch.where(active, alpha, torch.zeros_like(alpha))
            if self.conditioning == "running":
                next_cond = sigma_t
            elif self.conditioning == "tracked":
                next_cond = (c_dir - alpha).clamp(low, high)
            else:
                next_cond = c_dir
            next_cond = torch.where(active, next_cond, c_dir)
        x_next = x + _per_image(alpha) * g
        if self.step_rule == "reference":
            x_next = x_next.clamp(0.0, 1.0)
        return x_next, next_cond, active
