"""The threat models' geometry: ``l_inf`` and ``l_2`` steepest-ascent directions, projection onto the eps-ball and
the [0, 1] box, random starts."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

NORMS = ("linf", "l2")


def _per_row_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.ndim - 1)))


def ascent_direction(g: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step for a gradient ``g``: ``sign(g)`` (``l_inf``) or ``g / ||g||_2`` (``l_2``)."""
    return g.sign() if norm == "linf" else g / _per_row_norm(g)


def project(x_adv: Tensor, x0: Tensor, eps: float, norm: str, box: bool = True) -> Tensor:
    """Project onto the ``eps``-ball around ``x0`` and then onto the [0, 1] box (the box clip keeps the ball: it only
    moves coordinates towards ``x0``, which lies in the box); ``box=False`` projects onto the ball only."""
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_row_norm(delta)).clamp(max=1.0)
    return (x0 + delta).clamp(0.0, 1.0) if box else x0 + delta


def random_start(x0: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """A uniform point of the ``l_inf`` ball, or a random direction at a uniform radius in the ``l_2`` ball."""
    if norm == "linf":
        delta = (2 * torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 1) * eps
    else:
        direction = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        radius = eps * torch.rand((x0.shape[0],), generator=generator, device=x0.device, dtype=x0.dtype)
        delta = direction / _per_row_norm(direction) * radius.view(-1, *([1] * (x0.ndim - 1)))
    return project(x0 + delta, x0, eps, norm)
