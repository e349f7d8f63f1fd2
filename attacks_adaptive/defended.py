"""The defended-model adapter every attack uses: one torch-level view of the three targets an attack accepts (an ART
``PyTorchClassifier`` whose ``preprocessing_defences`` hold a :class:`purifiers.PurifierPyTorch`, a
:class:`purifiers.PurifiedClassifier`, or a bare ``nn.Module`` classifier): the purifier, the classifier, the deployed
defense (its ensemble), the EOT gradient and the count of network evaluations.

* :meth:`DefendedModel.loss_gradient`: the EOT gradient, one batched forward/backward over the ``k`` stochastic copies
  of every input, chunked to a row budget (``max_rows``), never a Python loop over samples; combined (mean, sign vote)
  or per copy. The purifier's ``gradient`` mode (``bpda``, ``exact``, a ``surrogate``) decides how the gradient
  passes through it. :meth:`DefendedModel.purifier_vjp` pulls an output gradient back through one purification.
* :meth:`DefendedModel.count`: network evaluations inside a block (:class:`NFEMeter`), the one meter of the package's
  harnesses.

All images here are NCHW float tensors in [0, 1].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from purifiers.art_base import PurifiedClassifier, PurifierPyTorch

Tensor = torch.Tensor
#: What one query of a gradient-free attack runs (:meth:`DefendedModel.query_logits`).
QUERIES = ("deployed", "single")


class _ARTSteps(nn.Module):
    """Preprocessing steps of an ART ``PyTorchClassifier`` (their ``forward``, in order, as ART chains them) on NCHW
    input permuted to the estimator's layout. With ``model``: what the classifier applies after its purifier (the
    remaining steps, e.g. its standardisation, and the model); without: the steps before the purifier, their output
    permuted back to NCHW."""

    def __init__(self, estimator, ops, model: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.ops = list(ops)
        self.channels_first = bool(estimator.channels_first)

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_first:
            x = x.permute(0, 2, 3, 1)
        for op in self.ops:
            x, _ = op.forward(x, None)
        if self.model is not None:
            return self.model(x)
        return x if self.channels_first else x.permute(0, 3, 1, 2)


@dataclass
class NFEMeter:
    """Network evaluations while a ``with model.count() as meter:`` block ran, in images: prior forward and backward
    passes (the prior's own counter) and classifier forward passes (a forward hook on the classifier)."""

    prior_forward: int = 0
    prior_backward: int = 0
    classifier: int = 0


class DefendedModel:
    """The torch-level view of a defended classifier that every attack uses.

    :param classifier: maps NCHW [0, 1] images to logits.
    :param purifier: the :class:`purifiers.PurifierPyTorch` in front of it, or ``None`` for an undefended model.
    :param runs: purifications the deployed defense averages per input (``PurifiedClassifier.runs``).
    :param deployed: the deployed defense as a module (a ``PurifiedClassifier``), or ``None`` to use one purification.
    :param layout: ``"nchw"`` or ``"nhwc"``, the layout :meth:`Attack.generate` receives (an ART estimator's).
    :param before: what runs before the purifier (an ART classifier's PyTorch preprocessing steps that precede it), a
        module from NCHW images to NCHW images in [0, 1] differentiated as it is; ``None``: nothing.
    """

    def __init__(self, classifier: nn.Module, purifier: PurifierPyTorch | None = None, *, runs: int = 1,
                 deployed: nn.Module | None = None, layout: str = "nchw", before: nn.Module | None = None):
        self.classifier = classifier
        self.purifier = purifier
        self.before = before
        self.runs = runs
        self.deployed = deployed
        self.layout = layout

    @classmethod
    def from_target(cls, target) -> "DefendedModel":
        """Build the view of an ART ``PyTorchClassifier``, a ``PurifiedClassifier``, a ``DefendedModel`` or a bare
        ``nn.Module`` classifier (undefended)."""
        if isinstance(target, DefendedModel):
            return target
        if isinstance(target, PurifiedClassifier):
            return cls(target.classifier, target.purifier, runs=target.runs, deployed=target)
        from art.estimators.classification import PyTorchClassifier

        if isinstance(target, PyTorchClassifier):
            return cls._from_art(target)
        if isinstance(target, nn.Module):
            return cls(target)
        raise ValueError(f"an attack target must be an ART PyTorchClassifier, a purifiers.PurifiedClassifier or a "
                         f"torch.nn.Module classifier, got {type(target).__name__}.")

    @classmethod
    def _from_art(cls, estimator) -> "DefendedModel":
        """The steps ART applies when predicting (``apply_predict``) in its order: those before the purifier run before
        it (:attr:`before`, their own gradients; the purifier checks that they leave [0, 1] images), the others and
        the model after it (the classifier)."""
        from art.defences.preprocessor.preprocessor import PreprocessorPyTorch

        ops = list(estimator.preprocessing_operations)
        if not all(isinstance(op, PreprocessorPyTorch) for op in ops):
            raise ValueError("every preprocessing step of the ART classifier must be a PreprocessorPyTorch (ART then "
                             "backpropagates through them); found " + ", ".join(type(op).__name__ for op in ops) + ".")
        ops = [op for op in ops if op.apply_predict]
        purifier_at = [i for i, op in enumerate(ops) if isinstance(op, PurifierPyTorch)]
        if len(purifier_at) > 1:
            raise ValueError("the ART classifier holds more than one PurifierPyTorch; attack one purifier at a time.")
        if estimator.clip_values is not None and tuple(np.ravel(estimator.clip_values).tolist()) != (0.0, 1.0):
            raise ValueError(f"the ART classifier's clip_values must be (0, 1), got {estimator.clip_values}.")
        layout = "nchw" if estimator.channels_first else "nhwc"
        if not purifier_at:
            model = estimator.model
            if isinstance(model, PurifiedClassifier) and len(ops) == 1:
                return cls(model.classifier, model.purifier, runs=model.runs, deployed=model, layout=layout)
            return cls(_ARTSteps(estimator, ops, estimator.model), layout=layout)
        at = purifier_at[0]
        return cls(_ARTSteps(estimator, ops[at + 1:], estimator.model), ops[at], layout=layout,
                   before=_ARTSteps(estimator, ops[:at]) if at else None)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        """Whether a purifier stands in front of the classifier (then every forward pass may differ)."""
        return self.purifier is not None

    @property
    def prior(self):
        if self.purifier is None:
            raise ValueError("this attack needs the purifier's prior, but the target is an undefended classifier.")
        return self.purifier.algorithm.prior

    @property
    def gradient(self) -> str:
        """The gradient mode the purifier is set to (``"none"`` for an undefended model)."""
        return "none" if self.purifier is None else self.purifier.gradient

    def check_gradient_mode(self, mode: str | None) -> None:
        """``mode`` must be one of the purifier's gradient modes (``None``, or no purifier: nothing to check)."""
        if mode is not None and self.purifier is not None and mode not in self.purifier.gradient_modes:
            raise ValueError(f"{type(self.purifier).__name__} has no gradient mode {mode!r}; "
                             f"it has {self.purifier.gradient_modes}.")

    @contextlib.contextmanager
    def count(self):
        """Count network evaluations inside the block (see :class:`NFEMeter`)."""
        meter = NFEMeter()
        prior = None if self.purifier is None else self.purifier.algorithm.prior
        start = (prior.nfe.forward, prior.nfe.backward) if prior is not None else (0, 0)

        def hook(module, inputs, output):
            meter.classifier += output.shape[0]

        handle = self.classifier.register_forward_hook(hook)
        try:
            yield meter
        finally:
            handle.remove()
            if prior is not None:
                meter.prior_forward = prior.nfe.forward - start[0]
                meter.prior_backward = prior.nfe.backward - start[1]

    # ---------------------------------------------------------------------------------------------------------------
    def purify(self, x: Tensor, with_gradient: bool, gradient: str | None = None) -> Tensor:
        """One purification of every row, after the steps :attr:`before` it (through the gradient mode ``gradient``,
        default the purifier's own, when ``with_gradient``)."""
        if self.before is not None:
            x = self.before(x)
        return self.purifier.purify(x, with_gradient, gradient)

    def purified_logits(self, x: Tensor, with_gradient: bool, gradient: str | None = None) -> Tensor:
        """Classifier logits of one purification of every row (see :meth:`purify`)."""
        if self.purifier is not None:
            x = self.purify(x, with_gradient, gradient)
        return self.classifier(x)

    @torch.no_grad()
    def deployed_logits(self, x: Tensor, max_rows: int = 256) -> Tensor:
        """Scores of the deployed defense (its ensemble of ``runs`` purifications) for each row, without gradient."""
        chunk = max(1, max_rows // self.runs)
        forward = self.deployed if self.deployed is not None else lambda v: self.purified_logits(v, False)
        return torch.cat([forward(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    @torch.no_grad()
    def query_logits(self, x: Tensor, query: str = "deployed", max_rows: int = 256) -> Tensor:
        """What one query of a gradient-free attack sees at each row: the deployed defense (``"deployed"``, its
        ensemble) or, ``runs`` times cheaper and noisier, one purification (``"single"``)."""
        if query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {query!r}.")
        if query == "deployed":
            return self.deployed_logits(x, max_rows)
        return torch.cat([self.purified_logits(x[i:i + max_rows], False) for i in range(0, x.shape[0], max_rows)])

    def loss_gradient(self, x: Tensor, y: Tensor, loss_fn, eot: int = 1, *, reduce: str = "mean",
                      max_rows: int = 256, through_purifier: bool = True, gradient: str | None = None,
                      objective=None):
        """The EOT gradient of ``loss_fn`` at ``x``: every input is repeated ``eot`` times and purified (one batched
        forward/backward per chunk of at most ``max_rows`` rows), each copy's loss is differentiated, and the copies'
        gradients are combined.

        :param reduce: ``"mean"``: the average of the copies' gradients (EOT, Athalye et al. 2018);
            ``"sign_vote"``: the sum of their signs (ADP's reference BPDA code: a majority vote of signs);
            ``"none"``: no combination, every copy's own gradient, loss and softmax (for attacks that weigh the
            copies, e.g. :class:`attacks_adaptive.DiffHammer`).
        :param through_purifier: ``False`` differentiates the classifier alone (preprocessor-blind).
        :param gradient: the purifier's gradient mode for this gradient (``None``: the purifier's own setting).
        :param objective: ``objective(rows, labels, index) -> (loss, logits)`` in place of ``loss_fn`` on the purified
            logits, for a loss that sees more than the logits (:class:`attacks_adaptive.DiffAttack`'s intermediate
            states): ``rows`` the stochastic copies (requiring a gradient), ``index`` which row of ``x`` each is a
            copy of; it purifies the rows itself.
        :return: ``(gradient, loss, probs)``: the combined gradient (shape of ``x``), the copies' mean loss (N,) and
            the copies' mean softmax (N, classes); with ``reduce="none"`` the per-copy values, of shapes
            ``(N, k, *x.shape[1:])``, ``(N, k)`` and ``(N, k, classes)``, where ``k`` is ``eot`` (1 for a deterministic target).
        """
        if reduce not in ("mean", "sign_vote", "none"):
            raise ValueError(f"reduce must be 'mean', 'sign_vote' or 'none', got {reduce!r}.")
        k = eot if (through_purifier and self.stochastic) else 1  # deterministic copies would be identical
        copies = min(k, max_rows)
        inputs = max(1, max_rows // copies)
        grad, loss_sum, prob_sum = torch.zeros_like(x), x.new_zeros(x.shape[0]), None
        per_copy = reduce == "none"
        if per_copy:
            grad, loss_sum = x.new_zeros(x.shape[0], k, *x.shape[1:]), x.new_zeros(x.shape[0], k)
        for i in range(0, x.shape[0], inputs):
            x_i, y_i = x[i:i + inputs].detach(), y[i:i + inputs]
            for j in range(0, k, copies):
                kc = min(copies, k - j)
                rows = x_i.repeat_interleave(kc, dim=0).requires_grad_(True)
                with torch.enable_grad():
                    if objective is not None:
                        index = torch.arange(i, i + x_i.shape[0], device=x.device).repeat_interleave(kc)
                        loss, logits = objective(rows, y_i.repeat_interleave(kc), index)
                    else:
                        logits = (self.purified_logits(rows, True, gradient) if through_purifier
                                  else self.classifier(rows))
                        loss = loss_fn(logits, y_i.repeat_interleave(kc))
                    (g,) = torch.autograd.grad(loss.sum(), rows)
                g = g.view(x_i.shape[0], kc, *x.shape[1:])
                if per_copy:
                    grad[i:i + inputs, j:j + kc] = g
                    loss_sum[i:i + inputs, j:j + kc] = loss.detach().view(-1, kc)
                    probs = logits.detach().softmax(-1).view(x_i.shape[0], kc, -1)
                    if prob_sum is None:
                        prob_sum = x.new_zeros(x.shape[0], k, probs.shape[-1])
                    prob_sum[i:i + inputs, j:j + kc] = probs
                    continue
                grad[i:i + inputs] += g.sum(1) if reduce == "mean" else g.sign().sum(1)
                loss_sum[i:i + inputs] += loss.detach().view(-1, kc).sum(1)
                probs = logits.detach().softmax(-1).view(x_i.shape[0], kc, -1).sum(1)
                if prob_sum is None:
                    prob_sum = x.new_zeros(x.shape[0], probs.shape[1])
                prob_sum[i:i + inputs] += probs
        if per_copy:
            return grad, loss_sum, prob_sum
        if reduce == "mean":
            grad /= k
        return grad, loss_sum / k, prob_sum / k

    def purifier_vjp(self, x: Tensor, v: Tensor, max_rows: int = 256, gradient: str | None = None) -> Tensor:
        """``J(x)^T v``: a vector ``v`` at the purified output pulled back to the input through ONE purification of
        every row, in the gradient mode ``gradient`` (default the purifier's own; the "grafting" of an output gradient
        onto one full-gradient path), and through the steps :attr:`before` it. ``bpda`` (and an undefended model) pull
        back by the identity, without purifying, where no step precedes the purifier."""
        if self.purifier is None or (self.before is None and (gradient or self.purifier.gradient) == "bpda"):
            return v.detach().clone()
        out = torch.zeros_like(x)
        for i in range(0, x.shape[0], max_rows):
            rows = x[i:i + max_rows].detach().requires_grad_(True)
            with torch.enable_grad():
                purified = self.purify(rows, True, gradient)
                (g,) = torch.autograd.grad(purified, rows, grad_outputs=v[i:i + max_rows].detach())
            out[i:i + max_rows] = g
        return out
