"""The one activation-checkpointing mechanism of the package: a loop piece run without a graph in the forward pass
and recomputed, with its graph, in the backward pass.

ADP (each score evaluation), ScoreOpt (each optimiser step) and the reverse VP-SDE of COUP and DiffPure (each
Euler-Maruyama step) differentiate through an unrolled loop; each wraps its loop piece in :func:`checkpointed`, so
only one piece's graph is alive at a time and memory does not grow with the number of steps beyond the pieces'
inputs.

Why not ``torch.utils.checkpoint``: a piece that itself takes a gradient (ScoreOpt's optimiser step, COUP's classifier
guidance with ``create_graph=True``) makes torch.utils.checkpoint unpack its saved tensors during the forward pass,
which recomputes the piece there and keeps the recomputed graph: memory grows with the steps and each step runs the
network three times instead of two. Here the forward pass runs the piece once with autograd off (a gradient the piece
takes for its own value is still taken, without ``create_graph``), and the backward pass runs it once more with
``differentiable=True`` and backpropagates through that graph (second-order terms included). The gradient flows to
the piece's tensor inputs, not to module parameters (the purifiers differentiate with respect to their input only).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


class _RecomputedInBackward(torch.autograd.Function):
    """``run(differentiable, *inputs) -> tuple of tensors``, recomputed with ``differentiable=True`` in backward."""

    @staticmethod
    def forward(ctx, run, *inputs):
        ctx.run = run
        ctx.save_for_backward(*inputs)
        return tuple(out.detach() for out in run(False, *inputs))

    @staticmethod
    def backward(ctx, *grad_outputs):
        needs = ctx.needs_input_grad[1:]
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            outputs = ctx.run(True, *inputs)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs) if out.requires_grad and grad is not None]
        wanted = [t for t, need in zip(inputs, needs) if need]
        grads = iter(torch.autograd.grad([out for out, _ in pairs], wanted, [grad for _, grad in pairs],
                                         allow_unused=True) if pairs and wanted else [None] * len(wanted))
        return (None, *(next(grads) if need else None for need in needs))


def checkpointed(run: Callable[..., Sequence[Tensor]], *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """Run ``run(differentiable, *inputs)`` (a tuple of tensors out) under activation checkpointing.

    ``run`` must compute the same values whatever ``differentiable`` says: ``False`` in the forward pass (no graph
    needed; autograd is off unless ``run`` turns it on for a gradient of its own), ``True`` in the backward
    recomputation (autograd on, inputs requiring a gradient; a gradient ``run`` takes inside must then use
    ``create_graph=True`` so its second-order term reaches the input). Non-tensor arguments go in a closure
    (``functools.partial``); ``None`` inputs are allowed.
    """
    return _RecomputedInBackward.apply(run, *inputs)


def maybe_checkpointed(run: Callable[..., Sequence[Tensor]], enabled: bool,
                       *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """:func:`checkpointed` when ``enabled`` and a gradient is being recorded through a tensor input; else
    ``run(differentiable, *inputs)`` directly (``differentiable``: autograd records and an input requires a grad)."""
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if enabled and differentiable:
        return checkpointed(run, *inputs)
    return tuple(run(differentiable, *inputs))
