"""ART wrappers of COUP and DiffPure (:mod:`purifiers.vpsde`) with exact, adjoint, surrogate and BPDA gradients.

| Paper link (COUP): https://arxiv.org/abs/2408.05900
| Paper link (DiffPure): https://arxiv.org/abs/2205.07460

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420 (Athalye et al.), https://arxiv.org/abs/1902.06705 (Carlini et al.) and
  https://arxiv.org/abs/2202.13711 (Croce et al.).

Gradient modes (``gradient=``); each is the gradient of one purification whose value is the defense's own:

* ``"bpda"``: the straight-through identity (Athalye et al. 2018). Cheap and weak.
* ``"exact"``: backpropagation through every Euler-Maruyama step with the Brownian noise fixed, the guidance kept
  differentiable (``create_graph=True``, so the classifier-Hessian term of COUP's augmented SDE, section 4.2.1, is
  included); each step is checkpointed, so memory grows by one state per step, not by the network's activations.
* ``"adjoint"``: torchsde's stochastic adjoint (``sdeint_adjoint``, Euler forward, torchsde's default adjoint method),
  as the reference code computes gradients, on the same Brownian path. It reconstructs the trajectory backwards from
  the output, so its gradient differs from ``"exact"`` by the adjoint solver's discretisation error.
* ``"surrogate"``: the same SDE on a coarse sub-grid (``surrogate_steps``, 20 by default) driven by the same Brownian
  path, fully backpropagated (Lee & Kim 2023's attack surrogate); the value is the defense's own purification, the
  gradient the surrogate's.

EOT (``eot_samples``) expands the batch inside a gradient computation, as in every wrapper of this package.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from purifiers.art_base import AlgorithmSetting, PurifierPyTorch, gradient_mode
from purifiers.priors.backends import Prior
from purifiers.validation import as_network_dtype
from purifiers.vpsde import COUP, DEFAULT_T_END, DiffPure, ReverseVPSDE, SDENoise

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


class _ReverseVPSDEPyTorch(PurifierPyTorch):
    """Shared ART wrapper of :class:`purifiers.vpsde.ReverseVPSDE` purifiers (see the module docstring)."""

    params = PurifierPyTorch.params + ["t_star", "dt", "forward_alpha", "resize_to", "surrogate_steps"]

    t_star = AlgorithmSetting("diffusion time the reverse SDE starts at")
    dt = AlgorithmSetting("Euler-Maruyama step")
    forward_alpha = AlgorithmSetting("'continuous' or 'ddpm' alpha_bar of the forward diffusion")
    resize_to = AlgorithmSetting("square side the purification runs at (None: the input's)")

    def __init__(self, algorithm: ReverseVPSDE, *, surrogate_steps: int = 20, **kwargs):
        self.surrogate_steps = surrogate_steps
        super().__init__(algorithm, **kwargs)

    def _check_params(self) -> None:
        super()._check_params()
        if not isinstance(self.surrogate_steps, (int, np.integer)) or not 1 <= self.surrogate_steps:
            raise ValueError(f"surrogate_steps must be a positive integer, got {self.surrogate_steps!r}.")
        if self.gradient == "surrogate" and self.surrogate_steps > self.algorithm.num_steps:
            raise ValueError(f"surrogate_steps ({self.surrogate_steps}) must not exceed the solver's "
                             f"{self.algorithm.num_steps} steps: the surrogate is a coarser grid.")
        # forward_alpha is the alpha_bar of the forward diffusion: without one (COUP's default) a "ddpm" would be
        # silently ignored, and a run meant to follow the reference code's discrete schedule would not.
        if self.forward_alpha != "continuous" and not self.algorithm.forward_diffusion:
            raise ValueError(f"forward_alpha={self.forward_alpha!r} sets the alpha_bar of the forward diffusion, which "
                             "this purifier does not run; pass forward_diffusion=True (COUP) to diffuse the input "
                             "first.")

    # The base class has validated the input (against this wrapper's ``input_range``), so these call the solver
    # directly rather than the algorithm's ``forward``, which validates for standalone use.
    def _purify_no_grad(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            return self._exact(x, generator)

    @gradient_mode("exact")
    def _exact(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.algorithm.purify(x, self.algorithm.draw_noise(x, generator))

    def purify_with_states(self, x: Tensor, on_state) -> tuple[Tensor, SDENoise]:
        """The ``exact`` mode's purification of an NCHW [0, 1] batch that also calls ``on_state(k, x_k, noise)`` with
        the reverse SDE's state after each solver step ``k`` and the purification's noise (its return value, if not
        ``None``, replaces the state: :func:`purifiers.vpsde.solve_reverse_vp`), for attacks whose loss sees the
        intermediate states (:class:`attacks_adaptive.DiffAttack`). The noise is drawn as :meth:`purify` draws it (the
        same per-row seeded streams); the input is not validated again (the attack has validated it).

        :return: the purified batch (in the input's dtype) and the noise of the purification (its ``start`` is the
            forward diffusion's ``eps``, ``None`` when the reverse SDE starts at the input).
        """
        self.algorithm.to(x.device)
        x_net = as_network_dtype(x, self.algorithm.prior)
        noise = self.algorithm.draw_noise(x_net, self.generator(x.device, x.shape[0]))
        purified = self.algorithm.purify(x_net, noise, on_state=lambda k, state: on_state(k, state, noise))
        return purified.to(x.dtype), noise

    @gradient_mode("adjoint")
    def _adjoint(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.algorithm.purify_adjoint(x, self.algorithm.draw_noise(x, generator))

    @gradient_mode("surrogate")
    def _surrogate(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = self.algorithm.draw_noise(x, generator)
        with torch.no_grad():
            defended = self.algorithm.purify(x, noise)
        coarse = self.algorithm.purify(x, noise, num_steps=self.surrogate_steps)
        return coarse + (defended - coarse).detach()


class COUPPyTorch(_ReverseVPSDEPyTorch):
    """COUP (Zhang et al., ECAI 2024) as an ART ``PreprocessorPyTorch``: the reverse VP-SDE from the input, guided by
    the classifier's confidence (eq. 5, Algorithm 1).

    | Paper link: https://arxiv.org/abs/2408.05900
    | Please keep in mind the limitations of defences: purification can be evaded by adaptive attacks (see
      https://arxiv.org/abs/1802.00420 and https://arxiv.org/abs/2202.13711); evaluate it with ``gradient="exact"``
      or ``"surrogate"`` and EOT, not only with ``"bpda"``.

    :param prior: the score prior (:func:`purifiers.load_prior`).
    :param classifier: the classifier whose confidence guides the purification ([0, 1] images -> logits, eval mode).
    :param t_star: diffusion time the reverse SDE starts at (0.1 for l_inf, 0.075 for l_2).
    :param guidance_scale: lambda (1.0; 0 is the "w/o guidance" ablation).
    :param dt: Euler-Maruyama step (1e-3: 100 steps at t* = 0.1).
    :param t_end: end time of the reverse SDE (1e-5).
    :param forward_diffusion: diffuse the input to t* first (the reference's ``--mode diffPure``); default off.
    :param forward_alpha: with ``forward_diffusion``: ``"continuous"`` alpha_bar(t*) (DiffPure's paper) or ``"ddpm"``
        (the reference code's discrete one); without it only ``"continuous"`` (the setting has nothing to act on).
    :param guidance_gradient: ``"full"`` (differentiable guidance) or ``"detached"`` (the reference code's).
    :param resize_to: purify at this square side (bilinear resize in and out; 256 for guided-diffusion's ImageNet
        model on 224x224 inputs, DiffPure's convention); the guidance classifier then sees images of that side too.
        ``None`` (default): at the input size.
    :param surrogate_steps: steps of the coarse solver of ``gradient="surrogate"``.
    :param gradient: ``"bpda"``, ``"exact"``, ``"adjoint"`` or ``"surrogate"`` (module docstring).

    Further keyword arguments (``eot_samples``, ``clip_values``, ``channels_first``, ``batch_size``, ``verbose``,
    ``seed``, ``device_type``, ``channels_last``, ``compile``, ``amp``): see :class:`purifiers.PurifierPyTorch`.
    """

    params = _ReverseVPSDEPyTorch.params + ["guidance_scale", "guidance_gradient"]

    guidance_scale = AlgorithmSetting("lambda, the weight of the classifier guidance")
    guidance_gradient = AlgorithmSetting("'full' or 'detached' guidance gradient")

    def __init__(self, prior: Prior, classifier: nn.Module, t_star: float = 0.1, guidance_scale: float = 1.0,
                 dt: float = 1e-3, t_end: float = DEFAULT_T_END, forward_diffusion: bool = False,
                 forward_alpha: str = "continuous", guidance_gradient: str = "full", resize_to: int | None = None,
                 surrogate_steps: int = 20, **kwargs):
        algorithm = COUP(prior, classifier, t_star=t_star, guidance_scale=guidance_scale, dt=dt, t_end=t_end,
                         forward_diffusion=forward_diffusion, forward_alpha=forward_alpha,
                         guidance_gradient=guidance_gradient, resize_to=resize_to)
        super().__init__(algorithm, surrogate_steps=surrogate_steps, **kwargs)


class DiffPurePyTorch(_ReverseVPSDEPyTorch):
    """DiffPure (Nie et al., ICML 2022) as an ART ``PreprocessorPyTorch``: forward diffusion to t*, then the unguided
    reverse VP-SDE.

    | Paper link: https://arxiv.org/abs/2205.07460
    | Please keep in mind the limitations of defences: purification can be evaded by adaptive attacks (see
      https://arxiv.org/abs/1802.00420 and https://arxiv.org/abs/2202.13711); evaluate it with ``gradient="exact"``
      or ``"surrogate"`` and EOT, not only with ``"bpda"``.

    :param prior: the score prior (:func:`purifiers.load_prior`).
    :param t_star: diffusion time (0.1 for l_inf, 0.075 for l_2 on CIFAR-10).
    :param dt: Euler-Maruyama step (1e-3).
    :param t_end: end time of the reverse SDE (1e-5).
    :param forward_alpha: ``"continuous"`` alpha_bar(t*) (paper) or ``"ddpm"`` (the reference code's discrete one).
    :param resize_to: purify at this square side (bilinear resize in and out): 256 reproduces DiffPure's ImageNet
        protocol (224x224 inputs, guided-diffusion's 256x256 model, ``t_star=0.15``); ``None`` (default): no resize.
    :param surrogate_steps: steps of the coarse solver of ``gradient="surrogate"``.
    :param gradient: ``"bpda"``, ``"exact"``, ``"adjoint"`` or ``"surrogate"`` (module docstring).

    Further keyword arguments: see :class:`purifiers.PurifierPyTorch`.
    """

    def __init__(self, prior: Prior, t_star: float = 0.1, dt: float = 1e-3, t_end: float = DEFAULT_T_END,
                 forward_alpha: str = "continuous", resize_to: int | None = None, surrogate_steps: int = 20, **kwargs):
        algorithm = DiffPure(prior, t_star=t_star, dt=dt, t_end=t_end, forward_alpha=forward_alpha,
                             resize_to=resize_to)
        super().__init__(algorithm, surrogate_steps=surrogate_steps, **kwargs)
