"""Input checks shared by the priors, the purifiers and the data loaders: bad input fails loudly, never silently."""

from __future__ import annotations

import numpy as np
import torch


def check_images(x, *, name: str = "x", channels: int | None = None, value_range: tuple[float, float] | None = (0.0, 1.0),
                 allow_empty: bool = False) -> None:
    """Raise ``ValueError`` naming the problem if ``x`` is not a float NCHW batch of finite images in ``value_range``.

    :param x: a ``torch.Tensor`` or ``np.ndarray``.
    :param channels: the expected channel count (axis 1), or ``None`` to accept any.
    :param value_range: ``(low, high)`` the values must lie in (with a 1e-4 tolerance), or ``None`` to skip the check
        (noisy images legitimately leave [0, 1]).
    """
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}.")
    is_float = x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
    if not is_float:
        raise ValueError(f"{name} has dtype {x.dtype}; expected floating point images in [0, 1] "
                         "(convert integer 0-255 images with x.astype(np.float32) / 255).")
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D batch of images (N, C, H, W), got shape {tuple(x.shape)}.")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}).")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels on axis 1, expected {channels} "
                         f"(shape {tuple(x.shape)}; is it channels-last?).")
    if x.shape[0] == 0:
        return
    if isinstance(x, torch.Tensor):
        x = x.detach()
    finite = torch.isfinite(x).all().item() if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values.")
    if value_range is not None:
        low, high = value_range
        x_min, x_max = (float(x.min()), float(x.max()))
        if x_max > high + 1e-4 and x_max > 1.5:
            raise ValueError(f"{name} has values up to {x_max:g}, outside [{low}, {high}]: this looks like 0-255 images; "
                             "divide by 255.")
        if x_min < low - 1e-4 or x_max > high + 1e-4:
            raise ValueError(f"{name} has values in [{x_min:g}, {x_max:g}], outside the expected range [{low}, {high}].")


def network_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (the network a purifier runs), or ``None`` when it
    has none (e.g. the closed-form Gaussian prior, which computes in the input's dtype)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def as_network_dtype(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``x`` cast (differentiably) to :func:`network_dtype` of ``module``: every purifier accepts any floating input
    dtype (float64 from numpy, float16, ...), computes in its network's dtype and returns the input's dtype."""
    dtype = network_dtype(module)
    return x if dtype is None or x.dtype == dtype else x.to(dtype)
