"""Timing the prior network: the best of repeated runs, and seconds per image at several batch sizes (the ``speed``
and ``estimate`` commands)."""

from __future__ import annotations

import time

import torch

#: Batch sizes (rows) at which the network is timed.
ROW_BATCHES = (1, 8, 32, 128, 512)


def best_time(run, repeats: int, warm_up: int = 3) -> float:
    for _ in range(warm_up):  # the first calls of a shape allocate and build their kernels (~1.5x slower, measured)
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def network_times(prior, image_shape, row_batches=ROW_BATCHES, repeats: int = 3, sigma: float = 0.25,
                  device="cpu", warm_up: int = 3) -> dict:
    """``{rows: (forward s/image, forward+backward s/image)}`` of the prior's network at pixel ``sigma``."""
    times = {}
    for rows in row_batches:
        x, sigmas = torch.rand(rows, *image_shape, device=device), torch.full((rows,), sigma, device=device)

        def forward():
            with torch.no_grad():
                prior.denoise_unchecked(x, sigmas)

        def forward_backward():
            x_var = x.clone().requires_grad_(True)
            torch.autograd.grad(prior.denoise_unchecked(x_var, sigmas).sum(), x_var)

        times[rows] = (best_time(forward, repeats, warm_up) / rows, best_time(forward_backward, repeats, warm_up) / rows)
    return times
