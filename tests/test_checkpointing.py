"""purifiers.recompute: the one checkpointing mechanism gives the gradient of the uncheckpointed computation,
second-order terms of a gradient taken inside the piece included, and runs the piece once per pass."""

import torch

from purifiers.recompute import checkpointed, maybe_checkpointed


def _piece(calls, differentiable, x, w):
    calls.append(differentiable)
    with torch.enable_grad():
        x_in = x if differentiable else x.detach().requires_grad_(True)
        inner, = torch.autograd.grad((x_in.sin() * w).sum(), x_in, create_graph=differentiable)
    return (x + 0.1 * inner + x * w, (x * w).sum(1))


def _loss(outputs):
    return outputs[0].pow(2).sum() + outputs[1].sum()


def test_checkpointed_gradient_equals_the_plain_gradient_hessian_term_included():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    plain_x, plain_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    expected = torch.autograd.grad(_loss(_piece([], True, plain_x, plain_w)), (plain_x, plain_w))
    calls = []
    ck_x, ck_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = torch.autograd.grad(_loss(checkpointed(lambda d, a, b: _piece(calls, d, a, b), ck_x, ck_w)), (ck_x, ck_w))
    assert calls == [False, True]  # once without a graph in forward, once with it in backward
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_only_inputs_that_require_a_gradient_get_one_and_no_grad_runs_plainly():
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64)
    calls = []
    out = maybe_checkpointed(lambda d, a, b: _piece(calls, d, a, b), True, x, w)
    grad, = torch.autograd.grad(_loss(out), x)
    assert calls == [False, True] and grad.shape == x.shape
    calls.clear()
    with torch.no_grad():
        maybe_checkpointed(lambda d, a, b: _piece(calls, d, a, b), True, x, w)
    assert calls == [False]


def test_the_memory_probe_reports_the_peak_and_the_network_evaluations_of_one_exact_gradient():
    from tiny import tiny_coup_exact

    from benchmarks.harness.profiling import exact_gradient_peak_memory

    result = exact_gradient_peak_memory(tiny_coup_exact, 3)
    assert result["peak_above_before"] >= 0 and result["grad_finite"] and result["rows"] == 2
    assert result["prior_forward"] == 2 * 3 * 2  # two network forwards per step and image (purifiers.recompute)
    assert result["prior_backward"] == 3 * 2
