"""Per-image random streams, so a seeded purification of an image does not depend on the batch it was purified in.

A single generator shared by the batch hands each image different numbers when the batch is cut into chunks of
another size (the draws of one chunk shift those of the next) or when an algorithm interleaves draws of different
shapes per step (ScoreOpt draws sigma, then the noise, each step). :class:`RowGenerators` gives every row its own
generator instead; :func:`randn` and :func:`rand` draw one row at a time from them along the batch axis (or from a
plain ``torch.Generator`` / torch's global one, as before, when given one or ``None``).

The seeded ART wrappers derive row ``i`` of their ``k``-th call (counted since construction or
``reset_generator()``) from ``(seed, k, i)`` (:func:`row_seeds`): the same seed gives the same noise for that image
whatever ``batch_size`` cuts the call into. The purification then agrees across batch sizes to float rounding;
bit for bit on CPU when the network runs in fixed-size blocks too (the wrappers' ``batch_invariant=True``,
:mod:`purifiers.priors.speed`), since CPU kernels pick their blocking by batch size.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

Tensor = torch.Tensor


def row_seeds(seed: int, call: int, rows: int) -> list[int]:
    """64-bit seeds of ``rows`` images of call number ``call`` of a generator seeded with ``seed`` (numpy's
    ``SeedSequence`` mixing, so nearby seeds, calls and rows give unrelated streams)."""
    return [int(np.random.SeedSequence([int(seed) % 2**64, int(call), i]).generate_state(1, np.uint64)[0] >> 1)
            for i in range(rows)]


class RowGenerators:
    """One ``torch.Generator`` per image (row) of a batch, on ``device``; slicing keeps the rows' generators."""

    def __init__(self, seeds: Sequence[int] = (), device: torch.device | str = "cpu", *, _generators=None):
        self.device = torch.device(device)
        self.generators = list(_generators) if _generators is not None else [
            torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice) -> "RowGenerators":
        if not isinstance(rows, slice):
            raise TypeError("RowGenerators are sliced by rows (a slice).")
        return RowGenerators(device=self.device, _generators=self.generators[rows])


Generator = Union[torch.Generator, RowGenerators, None]


def _draw(fn, shape, generator: Generator, device, dtype, batch_dim: int) -> Tensor:
    shape = tuple(shape)
    if not isinstance(generator, RowGenerators):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    if shape[batch_dim] != len(generator):
        raise ValueError(f"a draw of shape {shape} has {shape[batch_dim]} rows on axis {batch_dim}, but there are "
                         f"{len(generator)} row generators.")
    row_shape = shape[:batch_dim] + shape[batch_dim + 1:]
    if not generator.generators:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.stack([fn(row_shape, generator=g, device=device, dtype=dtype) for g in generator.generators],
                       dim=batch_dim)


def randn(shape, generator: Generator = None, *, device=None, dtype=None, batch_dim: int = 0) -> Tensor:
    """``torch.randn(shape)`` from ``generator``; with :class:`RowGenerators`, row ``i`` of axis ``batch_dim`` comes
    from the ``i``-th generator."""
    return _draw(torch.randn, shape, generator, device, dtype, batch_dim)


def rand(shape, generator: Generator = None, *, device=None, dtype=None, batch_dim: int = 0) -> Tensor:
    """``torch.rand(shape)`` from ``generator``, per row as :func:`randn`."""
    return _draw(torch.rand, shape, generator, device, dtype, batch_dim)
