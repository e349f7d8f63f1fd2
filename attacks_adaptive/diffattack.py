"""DiffAttack: APGD on the classification loss plus a deviated-reconstruction loss on the reverse diffusion's states.

Kang, Song, Li, "DiffAttack: Evasion Attacks Against Diffusion-Based Adversarial Purification" (NeurIPS 2023,
https://arxiv.org/abs/2311.16124). The reference repository (github.com/kangmintong/DiffAttack) holds a README only
("Codes will be uploaded soon"), so every choice below follows the paper; where the paper leaves a choice open, the
choice is ours and says so.

* The loss (§3.4, eq. 11; Algorithm 2): ``L = L_cls + lambda L_dev``, ``L_cls`` CE or DLR (the paper runs CE, then
  DLR in a second round as AutoAttack does: ``loss="dlr"``), ``lambda = 1.0`` (App. D.2, Table 8's ablation of 0.1 /
  1 / 10).
* The deviated-reconstruction loss (§3.2, eq. 8): ``L_dev = E_t[alpha(t) E d(x_t, x'_t)]``, ``x'_t`` the reverse
  process's sample at time ``t`` and ``x_t`` the diffusion process's sample at the same ``t``; the expectation over
  ``t`` is the average over uniformly sampled time steps, ``alpha(t) = 1 / (number of sampled steps)`` (App. D.2);
  the expectation over the samples is the EOT average over purifications. Here the time steps are the solver's grid
  points ``t_k`` (``k = 1 .. N``, the states the reverse SDE produces): ``dev_steps=None`` (default) averages over all
  of them, the expectation over a uniform ``t`` on the grid computed exactly; ``dev_steps=K`` samples ``K`` distinct
  steps uniformly per copy and per gradient, the paper's Monte-Carlo estimate (§4.7 samples ``T/3``).
* ``x_t`` (ours where the paper is silent): the paper's score-based purification draws only ``x_{t*}``; we take the
  marginal of the forward diffusion ``x_t = sqrt(alpha_bar(t)) x_0 + sqrt(1 - alpha_bar(t)) eps``
  (:meth:`purifiers.vpsde.ReverseVPSDE.diffusion_coefficients`, [-1, 1] units, continuous ``alpha_bar``) with the
  purification's own forward noise ``eps`` (DiffPure), so that ``x_{t*}`` is the reverse process's start, as on the
  paper's DDPM chain where ``x'_T = x_T``; COUP's reverse SDE starts at the input and draws no forward noise, so ``eps``
  is a fresh ``N(0, I)`` draw per copy from the attack's own stream.
* ``x_0`` is the input being purified, i.e. the attack's current iterate: Theorem 1 bounds the deviation between the
  *adversarial* sample's diffused and reconstructed distributions (``q_t``, ``q'_t``), and Algorithm 1 backpropagates
  through the diffusion process too, so the gradient flows through both ``x_t`` and ``x'_t``. ``anchor="clean"`` is
  the variant that diffuses the unperturbed image instead (a fixed target, no gradient through ``x_t``).
* ``d`` (ours where the paper is silent): the per-pixel mean squared difference, on the scale of the CE loss that
  ``lambda = 1`` balances it with. (DiffHammer's re-implementation of DiffAttack, github.com/Ka1b0/DiffHammer
  ``defense/diffpure.py``, ``denoising_process``/``gradient``, backpropagates a per-pixel-mean squared difference too,
  weighted by ``alpha_bar(t)`` instead of ``1 / K``.)
* The segment-wise forwarding-backwarding (§3.3, Algorithm 1): the exact gradient recomputes each solver step in the
  backward pass (:mod:`purifiers.recompute`, the purifiers' ``checkpoint_steps``): memory holds one state per step and
  one step's graph at a time, not every step's activations (measured below). The deviation at step ``k`` is a function
  of the stored state ``x'_{t_k}``, computed by an identity in the solver's chain (:class:`_DeviationTap`), so by design
  it keeps a number per row and step, no image and no network activations. Measured (peak RSS of one loss gradient in a
  fresh process, CPU, 8 MNIST images, ``benchmarks/measured/vpsde/diffattack_memory_n8.json``): at 4T = 200 steps 1.17x
  the memory at T = 50 for COUP and for DiffPure, against 1.16x for the purification's exact gradient alone
  (``vpsde_memory_n8.json``). The loss adds 1.0 (COUP) / 2.8 (DiffPure) MiB at T and 0.6 / 0.8 MiB over the 150 further
  steps, about 5 KiB a step (a fifth of one stored state). With glibc's 64 KiB mmap threshold, below which each 25 KiB
  state came from the fragmented heap, the same measurement gave 1.23-1.28x; a distance node beside the chain instead of
  the identity, 1.35x / 1.33x.
* The outer loop (App. D.1-D.2, Algorithm 2): APGD in AutoAttack's framework with its hyper-parameters (100
  iterations, EOT 20, momentum 0.75, step ``2 eps`` halved at the checkpoints), every sample kept optimised after it is
  misclassified (§3.4): :class:`attacks_adaptive.APGDEOT`'s loop, which this class reuses.

Paper versus this implementation: Algorithm 2 as printed halves the step at every checkpoint and returns the iterate
of highest loss; "implemented in the framework of AutoAttack" (App. D.2) means APGD's conditional halving with a
restart from the best point, which we run; like :class:`APGDEOT` we return the misclassified iterate of highest loss
where there is one (else the highest-loss iterate). DiffAttack's DDPM-based purification (a discrete chain) has no
counterpart here: it applies to the reverse VP-SDE purifiers (:class:`purifiers.DiffPure`, :class:`purifiers.COUP`).
ADP and ScoreOpt have no reverse diffusion whose states ``x'_t`` the loss is defined on, so the attack refuses them.

Cost per iteration: ``eot`` exact gradients through the purification (with recompute, two network forwards and one
backward per solver step; COUP's guidance adds its classifier's), plus one distance per sampled step; the same as
APGD+EOT through the ``exact`` mode.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attacks_adaptive.apgd_eot import APGDEOT
from attacks_adaptive.losses import LOSSES
from purifiers.vpsde import ReverseVPSDE

Tensor = torch.Tensor
ANCHORS = ("input", "clean")


class DeviationRecorder:
    """DiffAttack's ``L_dev`` (eq. 8) per row, ``sum_k weights[:, k - 1] mean((x'_{t_k} - x_{t_k})^2)``, recorded while
    the reverse SDE runs: called as the solver's state hook (``recorder(k, x'_{t_k}, noise)``, see
    :meth:`purifiers.vpsde_pytorch.COUPPyTorch.purify_with_states`), it returns each sampled state wrapped by
    :class:`_DeviationTap` and adds that step's distance to :attr:`total`.

    :param algorithm: the purification (its schedule and resolution give the diffused ``x_{t_k}``).
    :param x0: the [0, 1] images whose forward diffusion ``x_t`` is compared with.
    :param grid: the solver's time grid (``grid[k] = t_k``).
    :param weights: ``(rows, N)``: ``alpha(t_k)`` of each row at each step (``1 / K`` on its ``K`` sampled steps).
    :param eps: the forward diffusion's noise (shape of a state); ``None``: the purification's own (``noise.start``).
    """

    def __init__(self, algorithm: ReverseVPSDE, x0: Tensor, grid: Tensor, weights: Tensor, eps: Tensor | None = None):
        self.algorithm, self.grid, self.weights, self.eps = algorithm, grid, weights, eps
        self.x0 = algorithm.solver_units(x0)
        self.sampled = set((weights.sum(0).nonzero().flatten() + 1).tolist())
        self.total = x0.new_zeros(x0.shape[0])

    def __call__(self, k: int, state: Tensor, noise=None) -> Tensor | None:
        if k not in self.sampled:
            return None
        eps = self.eps if self.eps is not None else noise.start
        signal, noise_scale = self.algorithm.diffusion_coefficients(float(self.grid[k]))
        state, distance = _DeviationTap.apply(state, self.x0.to(state.dtype), eps.to(state.dtype), signal,
                                              noise_scale)
        self.total = self.total + self.weights[:, k - 1].to(state.dtype) * distance
        return state


class _DeviationTap(torch.autograd.Function):
    """The identity on a reverse state ``x'`` that also returns ``mean((x' - (signal x0 + noise eps))^2)`` per row.

    Why an identity in the solver's chain rather than a loss beside it: a distance node beside the chain would get its
    gradient as soon as the backward pass starts and hold it (an image per step) until the recompute reaches that
    step, so memory would grow with the steps beyond the recompute's one state per step. In the chain, the distance's
    gradient (a number per row, kept until then) becomes an image only when the backward pass reaches the step. The
    difference is recomputed from ``x'`` (the state the next recomputed step keeps anyway) and ``x0``, ``eps`` (one of
    each for all steps)."""

    @staticmethod
    def forward(ctx, state, x0, eps, signal, noise):
        ctx.save_for_backward(state, x0, eps)
        ctx.coefficients = (signal, noise)
        return state.view_as(state), (state - (signal * x0 + noise * eps)).flatten(1).pow(2).mean(1)

    @staticmethod
    def backward(ctx, grad_state, grad_distance):
        state, x0, eps = ctx.saved_tensors
        signal, noise = ctx.coefficients
        difference = state - (signal * x0 + noise * eps)
        grad_deviation = grad_distance.view(-1, *([1] * (state.ndim - 1))) * difference * (2.0 / difference[0].numel())
        grad_in = grad_deviation if grad_state is None else grad_state + grad_deviation
        grad_x0 = -signal * grad_deviation if ctx.needs_input_grad[1] else None
        grad_eps = -noise * grad_deviation if ctx.needs_input_grad[2] else None
        return grad_in, grad_x0, grad_eps, None, None


class DiffAttack(APGDEOT):
    """DiffAttack (Kang et al., NeurIPS 2023): APGD+EOT on ``L_cls + lambda L_dev`` through the exact gradient of a
    reverse VP-SDE purifier (DiffPure, COUP). See the module docstring for the definitions and their sources.

    :param loss: ``L_cls``: ``"ce"`` (the paper's first round) or ``"dlr"`` (its second); ``"margin"`` too.
    :param eot: purifications per gradient (20 in the paper).
    :param lam: ``lambda``, the weight of ``L_dev`` (1.0 in the paper).
    :param dev_steps: ``K``, the solver steps sampled uniformly per copy for ``L_dev``; ``None``: every step.
    :param anchor: ``"input"``: ``x_t`` diffuses the current iterate (the paper); ``"clean"``: the unperturbed image.

    Further parameters (``rho``, ``momentum``, ``random_start``, and the base's): see :class:`APGDEOT`. The gradient
    mode is always ``"exact"``.
    """

    attack_params = APGDEOT.attack_params + ["lam", "dev_steps", "anchor"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 100, loss: str = "ce", eot: int = 20,
                 lam: float = 1.0, dev_steps: int | None = None, anchor: str = "input", **kwargs):
        if "gradient" in kwargs:
            raise ValueError("DiffAttack has no gradient setting: its loss needs the reverse SDE's states, which only "
                             "the 'exact' mode computes.")
        self.lam = lam
        self.dev_steps = dev_steps
        self.anchor = anchor
        self._clean: Tensor | None = None
        self._rng: torch.Generator | None = None
        super().__init__(target, eps=eps, norm=norm, steps=steps, loss=loss, eot=eot, gradient="exact", **kwargs)

    @property
    def name(self) -> str:
        return f"DiffAttack-{self.loss.upper()}"

    @staticmethod
    def supports(purifier) -> bool:
        """Whether DiffAttack applies to ``purifier`` (an ART purifier wrapper): a reverse VP-SDE (DiffPure, COUP)."""
        return isinstance(getattr(purifier, "algorithm", None), ReverseVPSDE)

    def _check_params(self) -> None:
        purifier = self.model.purifier
        if not self.supports(purifier):
            what = "an undefended classifier" if purifier is None else type(purifier).__name__
            raise ValueError(f"DiffAttack does not apply to {what}: its deviated-reconstruction loss compares the "
                             "reverse diffusion's intermediate states with the forward diffusion's, and only the "
                             "reverse VP-SDE purifiers (DiffPure, COUP) have them.")
        super()._check_params()
        if self.gradient != "exact":
            raise ValueError(f"DiffAttack runs through the 'exact' gradient mode, got {self.gradient!r}.")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) \
                or self.lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}.")
        num_steps = purifier.algorithm.num_steps
        if self.dev_steps is not None and (isinstance(self.dev_steps, bool)
                                           or not isinstance(self.dev_steps, (int, np.integer))
                                           or not 1 <= self.dev_steps <= num_steps):
            raise ValueError(f"dev_steps must be None (every step) or an integer in [1, {num_steps}] (the solver's "
                             f"steps), got {self.dev_steps!r}.")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}.")

    # ---------------------------------------------------------------------------------------------------------------
    def loss_gradient(self, x: Tensor, y: Tensor, clean: Tensor | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(gradient, loss, softmax)``: the EOT means over ``eot`` purifications of ``L_cls + lambda L_dev`` at
        ``x``, its input gradient and the classifier's softmax (what the APGD loop ascends).

        :param clean: the unperturbed images (``anchor="clean"``; default ``x``).
        :param generator: the attack's stream for the sampled steps and COUP's ``eps`` (default: a fresh one from
            ``seed``); the purification's noise comes from the purifier's own streams.
        """
        self._clean = x if clean is None else clean
        self._rng = generator or self._generator(x.device)
        try:
            return self._loss_gradient(x, y)
        finally:
            self._clean = self._rng = None

    def _attack(self, x, y):
        self._clean = x
        # its own stream (seed + 1): the random start draws from the seed's stream
        self._rng = torch.Generator(device=x.device).manual_seed(int(self.seed) + 1)
        try:
            return super()._attack(x, y)
        finally:
            self._clean = self._rng = None

    def _loss_gradient(self, x_i: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.loss_gradient(x_i, y, None, self.eot, max_rows=self.max_rows, objective=self._objective)

    def _step_weights(self, rows: int, num_steps: int, device) -> Tensor:
        """``(rows, num_steps)``: ``alpha(t_k) = 1 / K`` on each row's ``K`` uniformly sampled steps, else 0."""
        if self.dev_steps is None:
            return torch.full((rows, num_steps), 1.0 / num_steps, device=device)
        order = torch.rand(rows, num_steps, generator=self._rng, device=device).argsort(1)
        weights = torch.zeros(rows, num_steps, device=device)
        return weights.scatter_(1, order[:, :self.dev_steps], 1.0 / self.dev_steps)

    def _objective(self, rows: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        purifier = self.model.purifier
        algorithm = purifier.algorithm
        weights = self._step_weights(rows.shape[0], algorithm.num_steps, rows.device)
        eps = None
        if not algorithm.forward_diffusion:  # COUP draws no forward noise: a fresh eps from the attack's stream
            shape = algorithm.solver_units(rows).shape
            eps = torch.randn(shape, generator=self._rng, device=rows.device).to(rows.dtype)
        x0 = rows if self.anchor == "input" else self._clean[index]
        deviation = DeviationRecorder(algorithm, x0, algorithm.grid(), weights, eps)
        purified, _ = purifier.purify_with_states(rows, deviation)
        logits = self.model.classifier(purified)
        return LOSSES[self.loss](logits, labels) + self.lam * deviation.total, logits
