"""ScoreOpt: purify an input by optimising it under a score prior (Zhang, Luo, Zhang, NeurIPS 2023).

| Paper link: https://arxiv.org/abs/2307.04333

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420 (Athalye et al.), https://arxiv.org/abs/1902.06705 (Carlini et al.) and
  https://arxiv.org/abs/2202.13711 (Croce et al.). ScoreOpt's published robustness (BPDA+EOT, one-shot-denoiser
  PGD+EOT) was measured without differentiating through its optimisation loop; use the ``exact`` gradient mode of
  :class:`purifiers.ScoreOptPyTorch` for that.

The method (paper §3, in its notation; ``D(x; t)`` is the one-shot denoiser, ``x_t = x + sigma_t eps``):

* eq. (6), Diff loss:  ``||D(x + sigma eps1) - x||^2``;
* eq. (7), MSE loss:   ``||D(x + sigma eps1) - x||^2 + lambda ||x - x_a||^2``;
* eq. (8), SR loss:    ``||D(x + sigma eps1) - x||^2 + ||D(x + sigma eps1) - D(x_a + sigma eps2)||^2``;
* Algorithm 1 (ScoreOpt-O): from ``x_0 = x_a``, each step draws ``sigma ~ U(noise_range)`` and fresh noise and moves
  ``x`` along the gradient of the loss, which flows through the denoiser **and** the target ``x`` (no stop-gradient);
* Algorithm 2 (ScoreOpt-N): each outer step draws ``sigma`` and ``eps1``, optimises the noisy ``x_t`` (inner loop),
  then one-shot denoises ``x_{i+1} = D(x_t)``.

Units. The optimisation runs in the paper's coordinates, images on [-1, 1] and EDM's sigma on that scale, so that the
learning rate, the noise range and the loss scale of Table 10 mean here what they mean there; the prior is called
through :mod:`purifiers.conventions` (pixel sigma = sigma / 2, images mapped back to [0, 1]). Losses are the squared
L2 norms of the paper (summed per image, then over the batch, so each image's update ignores the others).

Paper versus the authors' reference code, each choice a named option:

* optimiser: Adam in all of the paper's experiments (App. C.5) and in the code: ``optimizer="adam"`` (default),
  written as explicit tensor maths (torch.optim.Adam's update with its default betas and eps) so the ``exact``
  gradient mode can differentiate through it; ``"gd"`` is Algorithms 1-2 as printed, ``x <- x - lr * grad``;
* ScoreOpt-N target. The paper is not consistent with itself here. §3.3 says ScoreOpt-N minimises the same loss
  over ``x_t`` instead of ``x`` ("the loss gradients with respect to x and x_t are equivalent in our forward process
  formulation"): with ``x = x_t - sigma eps1`` the Diff loss is ``||D(x_t) - (x_t - sigma eps1)||^2``, its target
  moving with ``x_t``; the reference code minimises exactly that, as ``||(x_t - D(x_t))/sigma - eps1||^2`` (the
  1/sigma^2 weight only rescales the loss, which Adam ignores). This is ``n_target="reparametrised"``, the default.
  Algorithm 2's pseudo-code instead writes the target as the fixed outer iterate ``x_i`` (``n_target="outer"``).
  Taken literally, that inner loop fits ``D(x_t)`` to ``x_i``, so the one-shot output reproduces its input,
  adversarial perturbation included (on MNIST it left blind-PGD accuracy near the undefended classifier's:
  ``benchmarks/measured/scoreopt/test_N.json``); it is kept as an option for fidelity to the pseudo-code only;
* SR weight: the paper's SR loss has none; the code keeps a commented-out ``--loss_lambda`` (default 1):
  ``sr_lambda`` (default 1, the paper's loss);
* Table 10's "Step" for ScoreOpt-N is the code's ``purify_iter`` Adam steps on a single ``x_t``: M = 1 outer step,
  N = Step inner steps;
* MSE with ScoreOpt-N: the paper defines Algorithm 2 for Diff and SR only; here eq. (7)'s ``lambda ||x - x_a||^2`` is
  written in the noisy variable through ``x = x_t - sigma eps1`` (the paper's "the loss gradients with respect to x
  and x_t are equivalent", §3.3), i.e. ``lambda ||x_t - (x_a + sigma eps1)||^2``;
* sigma is drawn per image and step (the paper samples t per sample); the output is clipped to [0, 1] as in the
  code;
* the reference code averages its loss over the batch where we sum it. Adam's update ignores the loss scale except
  through its ``eps``, so the two differ only there; but there, the reference's purification of an image depends on
  the size of the batch it comes in.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn

from purifiers import noise as noise_lib
from purifiers.conventions import pm1_sigma_to_pixel, to_01, to_pm1
from purifiers.priors.backends import Prior
from purifiers.recompute import checkpointed
from purifiers.validation import as_network_dtype, check_images

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

VARIANTS = ("O", "N")
LOSSES = ("diff", "mse", "sr")
OPTIMIZERS = ("adam", "gd")
N_TARGETS = ("reparametrised", "outer")

# Paper Table 10, CIFAR-10 BPDA+EOT rows: (outer steps M, inner steps N, learning rate, noise range as EDM sigma on
# [-1, 1]). For ScoreOpt-N the table's "Step" is the inner loop (see the module docstring).
TABLE10_DEFAULTS = {"O": dict(steps=5, inner_steps=1, lr=0.1, noise_range=(0.40, 0.60)),
                    "N": dict(steps=1, inner_steps=5, lr=0.1, noise_range=(0.50, 0.50))}
# torch.optim.Adam's defaults, which the reference code uses.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _per_image(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


def _squared_norm(v: Tensor) -> Tensor:
    """``||v||_2^2`` of each image: shape (N,)."""
    return v.pow(2).flatten(1).sum(1)


class ScoreOpt(nn.Module):
    """ScoreOpt-O (Algorithm 1) and ScoreOpt-N (Algorithm 2) as a pure-torch module: ``forward(x, generator)``.

    ``forward`` is differentiable in ``x`` when autograd is on and ``x`` requires a gradient: every optimiser step is
    then taken with ``create_graph=True`` (second-order terms of the loss, Adam's moments and normalisation included),
    each step under activation checkpointing (:mod:`purifiers.recompute`) so memory grows with the number of
    steps only by a few images per step (the step's inputs and noise). Otherwise each step's gradient is taken and
    detached, with no graph kept across steps.

    :param prior: a :class:`purifiers.Prior` (denoiser on [0, 1] images, pixel sigma).
    :param variant: ``"O"`` (Algorithm 1) or ``"N"`` (Algorithm 2).
    :param loss: ``"diff"`` (eq. 6), ``"mse"`` (eq. 7) or ``"sr"`` (eq. 8).
    :param steps: outer optimisation steps M (``None``: Table 10, 5 for O and 1 for N).
    :param inner_steps: inner steps N of ScoreOpt-N (``None``: Table 10's 5; must be 1 for ScoreOpt-O).
    :param lr: learning rate eta on the [-1, 1] scale (``None``: Table 10's 0.1).
    :param noise_range: ``(sigma_min, sigma_max)``, EDM sigma on [-1, 1] as in Table 10 (``None``: (0.4, 0.6) for O,
        (0.5, 0.5) for N); sigma is drawn uniformly per image and step.
    :param mse_lambda: lambda of the MSE loss (eq. 7).
    :param sr_lambda: weight of the SR term (eq. 8 has 1; the reference code's ``--loss_lambda``).
    :param optimizer: ``"adam"`` (the paper's experiments, App. C.5) or ``"gd"`` (plain gradient descent).
    :param n_target: ScoreOpt-N's regression target, ``"reparametrised"`` (§3.3 and the code, default) or
        ``"outer"`` (Algorithm 2's pseudo-code taken literally; see the module docstring).
    :param checkpoint_steps: checkpoint each step when differentiating through the loop (recomputes each step's
        forward and gradient in the backward pass, costing prior evaluations, to keep memory bounded).
    """

    #: draws its noise through :mod:`purifiers.noise`, so the ART wrapper may hand it per-image streams
    row_generators = True

    def __init__(self, prior: Prior, variant: str = "O", loss: str = "diff", steps: int | None = None,
                 inner_steps: int | None = None, lr: float | None = None,
                 noise_range: tuple[float, float] | None = None, mse_lambda: float = 1.0, sr_lambda: float = 1.0,
                 optimizer: str = "adam", n_target: str = "reparametrised", checkpoint_steps: bool = True):
        super().__init__()
        if not isinstance(prior, Prior):
            raise ValueError(f"prior must be a purifiers.Prior (see purifiers.load_prior), got {type(prior).__name__}.")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        defaults = TABLE10_DEFAULTS[variant]
        self.prior = prior
        self.variant = variant
        self.loss = loss
        self.steps = defaults["steps"] if steps is None else steps
        self.inner_steps = defaults["inner_steps"] if inner_steps is None else inner_steps
        self.lr = defaults["lr"] if lr is None else lr
        self.noise_range = tuple(defaults["noise_range"] if noise_range is None else noise_range)
        self.mse_lambda = mse_lambda
        self.sr_lambda = sr_lambda
        self.optimizer = optimizer
        self.n_target = n_target
        self.checkpoint_steps = checkpoint_steps
        self.check_params()

    # ---------------------------------------------------------------------------------------------------------------
    def check_params(self) -> None:
        """Raise ``ValueError`` naming the first invalid hyper-parameter."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.n_target not in N_TARGETS:
            raise ValueError(f"n_target must be one of {N_TARGETS}, got {self.n_target!r}.")
        for name in ("steps", "inner_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.variant == "O" and self.inner_steps != 1:
            raise ValueError(f"ScoreOpt-O (Algorithm 1) has no inner loop: inner_steps must be 1, got "
                             f"{self.inner_steps}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if len(self.noise_range) != 2 or not 0 < self.noise_range[0] <= self.noise_range[1]:
            raise ValueError(f"noise_range must be (sigma_min, sigma_max) with 0 < sigma_min <= sigma_max (EDM sigma on "
                             f"[-1, 1], e.g. (0.4, 0.6)), got {self.noise_range!r}.")
        if self.noise_range[1] > 80:
            raise ValueError(f"noise_range {self.noise_range} exceeds EDM's largest sigma (80).")
        for name in ("mse_lambda", "sr_lambda"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        if not isinstance(self.checkpoint_steps, bool):
            raise ValueError("checkpoint_steps must be a bool.")

    @property
    def surrogate_sigma(self) -> float:
        """The fixed sigma_0 of the one-shot surrogate: the centre of the noise range ([-1, 1] scale)."""
        return 0.5 * (self.noise_range[0] + self.noise_range[1])

    # ---------------------------------------------------------------------------------------------------------------
    def denoise_pm1(self, z: Tensor, sigma: Tensor) -> Tensor:
        """``D_theta(z; sigma)`` in the paper's coordinates: ``z`` on [-1, 1], ``sigma`` (N,) EDM sigma on [-1, 1]."""
        return to_pm1(self.prior.denoise_unchecked(to_01(z), pm1_sigma_to_pixel(sigma)))

    def loss_terms(self, x: Tensor, x_a: Tensor, sigma: Tensor, eps1: Tensor, eps2: Tensor | None = None) -> dict:
        """The per-image terms of eqs. (6)-(8) at ``x`` (ScoreOpt-O's view), all on [-1, 1]: ``"diff"``,
        ``"mse"`` (``||x - x_a||^2``) and, when ``eps2`` is given, ``"sr"`` (``||D(x + s eps1) - D(x_a + s eps2)||^2``).
        """
        denoised = self.denoise_pm1(x + _per_image(sigma) * eps1, sigma)
        terms = {"diff": _squared_norm(denoised - x), "mse": _squared_norm(x - x_a)}
        if eps2 is not None:
            terms["sr"] = _squared_norm(denoised - self.denoise_pm1(x_a + _per_image(sigma) * eps2, sigma))
        return terms

    def one_shot_surrogate(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The authors' PGD+EOT surrogate ``D(x + sigma_0 eps; sigma_0)`` on [0, 1] images (one ``randn`` draw of
        ``x``'s shape; sigma_0 = :attr:`surrogate_sigma`). Not clipped, so no gradient is cut at saturated pixels."""
        check_images(x, name="ScoreOpt input")
        return self._one_shot_surrogate(as_network_dtype(x, self.prior), generator).to(x.dtype)

    def _one_shot_surrogate(self, x: Tensor, generator=None) -> Tensor:
        sigma = pm1_sigma_to_pixel(self.surrogate_sigma)
        eps = noise_lib.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        return self.prior.denoise_unchecked(x + sigma * eps, sigma)

    # ---------------------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Purify a batch of [0, 1] NCHW images; every random draw uses ``generator``. Any floating dtype is accepted:
        the purification runs in the prior network's dtype and the result comes back in the input's."""
        check_images(x, name="ScoreOpt input")
        return self.purify_unchecked(as_network_dtype(x, self.prior), generator).to(x.dtype)

    def purify_unchecked(self, x: Tensor, generator=None) -> Tensor:
        """:meth:`forward` without the input checks or the dtype cast, for callers that validated ``x`` already (the
        ART wrapper). ``generator``: a ``torch.Generator``, :class:`purifiers.noise.RowGenerators` or ``None``."""
        differentiable = torch.is_grad_enabled() and x.requires_grad
        x_a = to_pm1(x)
        outer = x_a
        # Algorithm 1 optimises x itself, with one optimiser over all M steps. (The variable is a graph node of its
        # own, so a step's gradient is taken with x_a held fixed even where x_0 = x_a.)
        z, t = x_a.clone(), 0
        first_moment, second_moment = torch.zeros_like(x_a), torch.zeros_like(x_a)
        for _ in range(self.steps):
            sigma = self._draw_sigma(x_a, generator)
            eps1 = noise_lib.randn(x_a.shape, generator, device=x_a.device, dtype=x_a.dtype)
            if self.variant == "N":  # Algorithm 2: a new variable x_t = x_i + sigma eps1, and a new optimiser for it
                z, t = outer + _per_image(sigma) * eps1, 0
                first_moment, second_moment = torch.zeros_like(x_a), torch.zeros_like(x_a)
            for _ in range(self.inner_steps):
                t += 1
                eps2 = (noise_lib.randn(x_a.shape, generator, device=x_a.device, dtype=x_a.dtype)
                        if self.loss == "sr" else None)
                z, first_moment, second_moment = self._run(
                    partial(self._step, t), differentiable, z, first_moment, second_moment, outer, x_a, sigma,
                    eps1, eps2)
            # ScoreOpt-N ends each outer step with one-shot denoising, x_{i+1} = x_t + sigma^2 s(x_t) = D(x_t).
            outer = z if self.variant == "O" else self._run(self._one_shot, differentiable, z, sigma)[0]
        return to_01(outer).clamp(0.0, 1.0)

    def _run(self, piece, differentiable: bool, *inputs):
        """Run one piece of the loop, checkpointed when differentiating through the loop (``checkpoint_steps``)."""
        if differentiable and self.checkpoint_steps:
            return checkpointed(piece, *inputs)
        return piece(differentiable, *inputs)

    def _one_shot(self, differentiable: bool, z: Tensor, sigma: Tensor) -> tuple[Tensor]:
        with torch.set_grad_enabled(differentiable):
            return (self.denoise_pm1(z, sigma),)

    def _draw_sigma(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        low, high = self.noise_range
        u = noise_lib.rand((like.shape[0],), generator, device=like.device, dtype=like.dtype)
        return low + (high - low) * u

    def _step(self, t: int, differentiable: bool, z: Tensor, first_moment: Tensor, second_moment: Tensor,
              outer: Tensor, x_a: Tensor, sigma: Tensor, eps1: Tensor, eps2: Tensor | None):
        """One optimiser step on the variable ``z`` (x for O, x_t for N); ``t`` counts steps since the optimiser's
        start (Adam's bias correction). Returns the new ``(z, first_moment, second_moment)``."""
        with torch.enable_grad():
            if not differentiable:
                z = z.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self._loss(differentiable, z, outer, x_a, sigma, eps1, eps2).sum(), z,
                                        create_graph=differentiable)
        if not differentiable:
            z = z.detach()
        if self.optimizer == "gd":
            return z - self.lr * grad, first_moment, second_moment
        # torch.optim.Adam (amsgrad off, no weight decay), as differentiable tensor maths.
        beta1, beta2 = ADAM_BETAS
        first_moment = beta1 * first_moment + (1 - beta1) * grad
        second_moment = beta2 * second_moment + (1 - beta2) * grad * grad
        denom = second_moment.sqrt() / (1 - beta2**t) ** 0.5 + ADAM_EPS
        return z - (self.lr / (1 - beta1**t)) * first_moment / denom, first_moment, second_moment

    def _loss(self, differentiable: bool, z: Tensor, outer: Tensor, x_a: Tensor, sigma: Tensor, eps1: Tensor,
              eps2: Tensor | None) -> Tensor:
        """The per-image loss whose gradient in ``z`` drives one step (eqs. 6-8, Algorithms 1-2)."""
        s = _per_image(sigma)
        if self.variant == "O":
            denoised = self.denoise_pm1(z + s * eps1, sigma)
            target = clean_estimate = z  # no stop-gradient: the target x moves with z (Algorithm 1)
        else:
            denoised = self.denoise_pm1(z, sigma)
            clean_estimate = z - s * eps1  # x = x_t - sigma eps1, the clean point x_t was formed from
            target = outer if self.n_target == "outer" else clean_estimate
        loss = _squared_norm(denoised - target)
        if self.loss == "mse":
            loss = loss + self.mse_lambda * _squared_norm(clean_estimate - x_a)
        elif self.loss == "sr":
            # D(x_a + sigma eps2) depends on the input x_a only: it needs a graph only when differentiating through
            # the whole purification.
            with torch.set_grad_enabled(differentiable):
                denoised_adv = self.denoise_pm1(x_a + s * eps2, sigma)
            loss = loss + self.sr_lambda * _squared_norm(denoised - denoised_adv)
        return loss
