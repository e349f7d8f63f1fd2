"""Options of a prior's network: ``channels_last`` memory format, ``torch.compile``, CUDA mixed precision, and
batch-invariant blocks (bit-identical rows whatever the batch size).

On by default, because it is exact: without autograd the network runs under ``torch.inference_mode``
(:meth:`purifiers.priors.backends.Prior.denoise_unchecked`), the no-gradient paths of every purifier. ``inference_mode=False``
runs them under plain ``no_grad`` instead, the eager path before this option, which ``python -m benchmarks speed``
times as its baseline.

Opt-in (the wrappers' ``channels_last=``, ``compile=``, ``amp=``, ``batch_invariant=``; all off by default):

* ``channels_last``: the network's 4-D weights and its input in NHWC memory order, which oneDNN and cuDNN
  convolutions run faster. Outputs equal the default layout's within float rounding (convolutions sum in another
  order), not bit for bit.
* ``compile``: ``torch.compile`` of the prior's denoiser (``True``, or a dict of ``torch.compile`` keyword arguments).
  The first call compiles (tens of seconds on a CPU), later calls reuse it. Equal within float rounding.
* ``batch_invariant``: run the network in blocks of exactly :data:`BLOCK_ROWS` rows (the last block padded with
  zeros), so a row's result does not depend on the batch it came in. CPU convolutions and matrix products pick their
  kernels and blockings by batch size, which changes a row's last bits (~1e-6) between batch sizes; with this option
  and a seed, purification is bit-identical on CPU whatever the batch size and the wrapper's chunking. It costs the
  padding: up to ``BLOCK_ROWS``x the network time for a batch of one row, nothing measurable from 32 rows up.
* ``amp``: ``"fp16"`` or ``"bf16"`` autocast around the network, for CUDA inputs only. On a CPU input it is refused
  with a ``ValueError`` (bf16 autocast on CPUs without native bf16 runs several times slower than float32). The
  network output is cast back to the input's dtype. Values change at the precision of the chosen format.

The options are set on the prior (shared by every purifier that uses it) by
:meth:`purifiers.priors.backends.Prior.set_speed_options`; a wrapper built with all options off leaves its prior's
options as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: Rows per network call under ``batch_invariant``.
BLOCK_ROWS = 8


@dataclass(frozen=True)
class SpeedOptions:
    """See the module docstring."""

    channels_last: bool = False
    compile: bool | dict = False
    amp: str | None = None
    batch_invariant: bool = False
    inference_mode: bool = True

    def __post_init__(self):
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool, got {self.channels_last!r}.")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"compile must be a bool or a dict of torch.compile arguments, got {self.compile!r}.")
        for name in ("batch_invariant", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None, 'fp16' or 'bf16', got {self.amp!r}.")

    @property
    def is_default(self) -> bool:
        return (not self.channels_last and self.compile is False and self.amp is None and not self.batch_invariant
                and self.inference_mode)

    def check_device(self, device: torch.device) -> None:
        """Refuse mixed precision on a non-CUDA input (see the module docstring)."""
        if self.amp is not None and torch.device(device).type != "cuda":
            raise ValueError(f"amp={self.amp!r} needs a CUDA input, got one on {torch.device(device)}: mixed precision "
                             "is off on CPU (slower than float32 there); use amp=None.")


def in_blocks(fn, x: Tensor, *row_args: Tensor) -> Tensor:
    """``fn(x, *row_args)`` computed in blocks of exactly :data:`BLOCK_ROWS` rows (the last padded with zeros for
    ``x`` and copies of the first row for ``row_args``), so a row's result does not depend on the batch size."""
    if x.shape[0] == 0:
        return fn(x, *row_args)
    outs = []
    for start in range(0, x.shape[0], BLOCK_ROWS):
        xb = x[start:start + BLOCK_ROWS]
        args = [a[start:start + BLOCK_ROWS] for a in row_args]
        rows = xb.shape[0]
        if rows < BLOCK_ROWS:
            xb = torch.cat([xb, xb.new_zeros((BLOCK_ROWS - rows, *xb.shape[1:]))])
            args = [torch.cat([a, a[:1].detach().expand(BLOCK_ROWS - rows, *a.shape[1:])]) for a in args]
        outs.append(fn(xb, *args)[:rows])
    return torch.cat(outs)
