"""The small base every attack of this package shares.

* :class:`DefendedModel`: one torch-level view of the three targets an attack accepts (an ART ``PyTorchClassifier``
  whose ``preprocessing_defences`` hold a :class:`purifiers.PurifierPyTorch`, a :class:`purifiers.PurifiedClassifier`,
  or a bare ``nn.Module`` classifier): the purifier, the classifier, and the deployed defense (its ensemble).
* :meth:`DefendedModel.loss_gradient`: the EOT gradient, one batched forward/backward over the ``k`` stochastic copies
  of every input, chunked to a row budget (``max_rows``), never a Python loop over samples; combined (mean, sign vote)
  or per copy. The purifier's ``gradient`` mode (``bpda``, ``exact``, a ``surrogate``) decides how the gradient
  passes through it. :meth:`DefendedModel.purifier_vjp` pulls an output gradient back through one purification.
* the losses (CE, DLR, margin), the ``l_inf`` / ``l_2`` geometry (steepest-ascent direction, projection, random start)
  and :class:`Attack`, the shared constructor, checks, any-iteration tracking and ART-style ``generate``.

All images here are NCHW float tensors in [0, 1]; :meth:`Attack.generate` converts an ART classifier's layout.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from purifiers.art_base import PurifiedClassifier, PurifierPyTorch
from purifiers.validation import check_images

Tensor = torch.Tensor

NORMS = ("linf", "l2")


# --------------------------------------------------------------------------------------------------------------------
# Losses (per row; every attack maximises them)
# --------------------------------------------------------------------------------------------------------------------

def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each row."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020, eq. 6): ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``, shift and
    scale invariant in the logits; it needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}.")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _max_other(logits, y)) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Logit margin ``max_{i!=y} z_i - z_y`` (the loss Uesato et al. 2018 use for SPSA; positive once misclassified)."""
    return _max_other(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def _max_other(logits: Tensor, y: Tensor) -> Tensor:
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(dim=1).values


LOSSES = {"ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}


# --------------------------------------------------------------------------------------------------------------------
# Threat-model geometry
# --------------------------------------------------------------------------------------------------------------------

def _per_row_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.ndim - 1)))


def ascent_direction(g: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step for a gradient ``g``: ``sign(g)`` (``l_inf``) or ``g / ||g||_2`` (``l_2``)."""
    return g.sign() if norm == "linf" else g / _per_row_norm(g)


def project(x_adv: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the ``eps``-ball around ``x0`` and then onto the [0, 1] box (the box clip keeps the ball: it only
    moves coordinates towards ``x0``, which lies in the box)."""
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_row_norm(delta)).clamp(max=1.0)
    return (x0 + delta).clamp(0.0, 1.0)


def random_start(x0: Tensor, eps: float, norm: str, generator: torch.Generator) -> Tensor:
    """A uniform point of the ``l_inf`` ball, or a random direction at a uniform radius in the ``l_2`` ball."""
    if norm == "linf":
        delta = (2 * torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 1) * eps
    else:
        direction = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        radius = eps * torch.rand((x0.shape[0],), generator=generator, device=x0.device, dtype=x0.dtype)
        delta = direction / _per_row_norm(direction) * radius.view(-1, *([1] * (x0.ndim - 1)))
    return project(x0 + delta, x0, eps, norm)


# --------------------------------------------------------------------------------------------------------------------
# The defended model
# --------------------------------------------------------------------------------------------------------------------

class _ARTHead(nn.Module):
    """What an ART ``PyTorchClassifier`` applies after its purifier: the remaining preprocessing (e.g. its
    standardisation) and the model, on NCHW input (permuted to the estimator's layout)."""

    def __init__(self, estimator, ops):
        super().__init__()
        self.model = estimator.model
        self.ops = list(ops)
        self.channels_first = bool(estimator.channels_first)

    def forward(self, x: Tensor) -> Tensor:
        if not self.channels_first:
            x = x.permute(0, 2, 3, 1)
        for op in self.ops:
            x, _ = op.forward(x, None)
        return self.model(x)


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
    """

    def __init__(self, classifier: nn.Module, purifier: PurifierPyTorch | None = None, *, runs: int = 1,
                 deployed: nn.Module | None = None, layout: str = "nchw"):
        self.classifier = classifier
        self.purifier = purifier
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
        from art.defences.preprocessor.preprocessor import PreprocessorPyTorch

        ops = list(estimator.preprocessing_operations)
        if not all(isinstance(op, PreprocessorPyTorch) for op in ops):
            raise ValueError("every preprocessing step of the ART classifier must be a PreprocessorPyTorch (ART then "
                             "backpropagates through them); found " + ", ".join(type(op).__name__ for op in ops) + ".")
        purifier_at = [i for i, op in enumerate(ops) if isinstance(op, PurifierPyTorch)]
        if len(purifier_at) > 1:
            raise ValueError("the ART classifier holds more than one PurifierPyTorch; attack one purifier at a time.")
        if purifier_at and purifier_at[0] != 0:
            raise ValueError("the purifier must be the first preprocessing defence of the ART classifier (it expects "
                             "[0, 1] images).")
        if estimator.clip_values is not None and tuple(np.ravel(estimator.clip_values).tolist()) != (0.0, 1.0):
            raise ValueError(f"the ART classifier's clip_values must be (0, 1), got {estimator.clip_values}.")
        layout = "nchw" if estimator.channels_first else "nhwc"
        if not purifier_at:
            model = estimator.model
            if isinstance(model, PurifiedClassifier) and len(ops) == 1:
                return cls(model.classifier, model.purifier, runs=model.runs, deployed=model, layout=layout)
            return cls(_ARTHead(estimator, ops), layout=layout)
        return cls(_ARTHead(estimator, ops[1:]), ops[0], layout=layout)

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

    @contextlib.contextmanager
    def gradient_mode(self, mode: str | None):
        """Temporarily set the purifier's gradient mode (``None`` keeps it)."""
        if mode is None or self.purifier is None:
            yield
            return
        if mode not in self.purifier.gradient_modes:
            raise ValueError(f"{type(self.purifier).__name__} has no gradient mode {mode!r}; "
                             f"it has {self.purifier.gradient_modes}.")
        previous = self.purifier.gradient
        self.purifier.gradient = mode
        try:
            yield
        finally:
            self.purifier.gradient = previous

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
    def purified_logits(self, x: Tensor, with_gradient: bool) -> Tensor:
        """Classifier logits of one purification of every row (through the purifier's gradient mode when
        ``with_gradient``)."""
        if self.purifier is not None:
            x = self.purifier.purify(x, with_gradient)
        return self.classifier(x)

    @torch.no_grad()
    def deployed_logits(self, x: Tensor, max_rows: int = 256) -> Tensor:
        """Scores of the deployed defense (its ensemble of ``runs`` purifications) for each row, without gradient."""
        chunk = max(1, max_rows // self.runs)
        forward = self.deployed if self.deployed is not None else lambda v: self.purified_logits(v, False)
        return torch.cat([forward(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def loss_gradient(self, x: Tensor, y: Tensor, loss_fn, eot: int = 1, *, reduce: str = "mean",
                      max_rows: int = 256, through_purifier: bool = True):
        """The EOT gradient of ``loss_fn`` at ``x``: every input is repeated ``eot`` times and purified (one batched
        forward/backward per chunk of at most ``max_rows`` rows), each copy's loss is differentiated, and the copies'
        gradients are combined.

        :param reduce: ``"mean"``: the average of the copies' gradients (EOT, Athalye et al. 2018);
            ``"sign_vote"``: the sum of their signs (ADP's reference BPDA code: a majority vote of signs);
            ``"none"``: no combination, every copy's own gradient, loss and softmax (for attacks that weigh the
            copies, e.g. :class:`attacks_adaptive.DiffHammer`).
        :param through_purifier: ``False`` differentiates the classifier alone (preprocessor-blind).
        :return: ``(gradient, loss, probs)``: the combined gradient (shape of ``x``), the copies' mean loss (N,) and
            the copies' mean softmax (N, classes); with ``reduce="none"`` the per-copy values, of shapes
            (N, k, *x.shape[1:]), (N, k) and (N, k, classes), where ``k`` is ``eot`` (1 for a deterministic target).
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
                    logits = self.purified_logits(rows, True) if through_purifier else self.classifier(rows)
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

    def purifier_vjp(self, x: Tensor, v: Tensor, max_rows: int = 256) -> Tensor:
        """``J(x)^T v``: a vector ``v`` at the purified output pulled back to the input through ONE purification of
        every row, in the purifier's gradient mode (the "grafting" of an output gradient onto one full-gradient path).
        ``bpda`` (and an undefended model) pull back by the identity, without purifying."""
        if self.purifier is None or self.purifier.gradient == "bpda":
            return v.detach().clone()
        out = torch.zeros_like(x)
        for i in range(0, x.shape[0], max_rows):
            rows = x[i:i + max_rows].detach().requires_grad_(True)
            with torch.enable_grad():
                purified = self.purifier.purify(rows, True)
                (g,) = torch.autograd.grad(purified, rows, grad_outputs=v[i:i + max_rows].detach())
            out[i:i + max_rows] = g
        return out


# --------------------------------------------------------------------------------------------------------------------
# Attack base
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class AttackResult:
    """What :meth:`Attack.perturb` returns.

    :ivar x_adv: the adversarial examples (NCHW, within the threat model).
    :ivar broken: per input, whether the deployed defense misclassified any iterate (the DiffPure/ScoreOpt BPDA code's
        rule), or ``None`` when iterates were not tracked (``track_iterates=False``).
    """

    x_adv: Tensor
    broken: Tensor | None = None


class Attack:
    """Base of every attack: shared parameters, checks, the any-iteration tracker and ART-style ``generate``.

    :param target: an ART ``PyTorchClassifier`` with a purifier among its ``preprocessing_defences``, a
        :class:`purifiers.PurifiedClassifier`, or an ``nn.Module`` classifier (undefended).
    :param eps: radius of the threat model, in [0, 1] pixel units.
    :param norm: ``"linf"`` or ``"l2"``.
    :param steps: iterations.
    :param max_rows: the most images one forward/backward pass holds (the memory budget of EOT batches).
    :param seed: seed of the attack's own randomness (random starts, SPSA directions).
    :param track_iterates: score every iterate with the deployed defense and record, per input, whether any was
        misclassified (needed by the ``any_iteration`` scoring; costs one deployed forward pass per iterate).
    :param verbose: show a progress bar over iterations.
    """

    name = "attack"
    attack_params = ["eps", "norm", "steps", "max_rows", "seed", "track_iterates", "verbose"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 40, max_rows: int = 256,
                 seed: int = 0, track_iterates: bool = False, verbose: bool = False):
        self.model = DefendedModel.from_target(target)
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.max_rows = max_rows
        self.seed = seed
        self.track_iterates = track_iterates
        self.verbose = verbose
        self._broken: Tensor | None = None
        self._y: Tensor | None = None

    # ---------------------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}.")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}.")
        for name in ("steps", "max_rows"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("track_iterates", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool.")

    @staticmethod
    def _check_positive_int(name: str, value) -> None:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    @staticmethod
    def _check_loss(loss) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")

    def set_params(self, **kwargs) -> None:
        for key, value in kwargs.items():
            if key not in self.attack_params:
                raise ValueError(f"{type(self).__name__} has no parameter {key!r}; it has {self.attack_params}.")
            setattr(self, key, value)
        self._check_params()

    def describe(self) -> dict:
        """The settings a results row states (attack, gradient mode, EOT, iterations, ...)."""
        settings = {k: getattr(self, k) for k in self.attack_params if k not in ("verbose", "track_iterates", "max_rows")}
        return {**settings, "attack": self.name, "gradient": self.gradient_description(),
                "eot": getattr(self, "eot", 1), "iterations": self.steps}

    def gradient_description(self) -> str:
        return self.model.gradient

    def config_key(self) -> str:
        """A JSON string of :meth:`describe`, used by the runner to refuse resuming with different settings."""
        return json.dumps(self.describe(), sort_keys=True, default=str)

    # ---------------------------------------------------------------------------------------------------------------
    def perturb(self, x: Tensor, y: Tensor) -> AttackResult:
        """Attack NCHW [0, 1] images ``x`` with labels ``y``; see :class:`AttackResult`."""
        self._check_params()
        check_images(x, name="attack input")
        y = torch.as_tensor(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}.")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}.")
        x, y = x.detach().float(), y.to(device=x.device, dtype=torch.int64)
        self._y = y
        self._broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if self.track_iterates else None
        self._note_iterate(x)
        x_adv = self._attack(x, y).detach()
        broken = self._broken
        self._broken = self._y = None
        return AttackResult(project(x_adv, x, self.eps, self.norm), broken)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """torchattacks-style: the adversarial images (NCHW tensor)."""
        return self.perturb(x, y).x_adv

    def generate(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """ART-style: numpy images in the target's layout (labels as indices or one-hot; ``None``: the deployed
        defense's predictions), returning numpy adversarial images in the same layout."""
        x_t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if self.model.layout == "nhwc":
            x_t = x_t.permute(0, 3, 1, 2)
        if y is None:
            y_t = self.model.deployed_logits(x_t, self.max_rows).argmax(1)
        else:
            y = np.asarray(y)
            y_t = torch.as_tensor(y.argmax(1) if y.ndim == 2 else y).long()
        x_adv = self.perturb(x_t, y_t).x_adv
        if self.model.layout == "nhwc":
            x_adv = x_adv.permute(0, 2, 3, 1)
        return x_adv.cpu().numpy()

    # ---------------------------------------------------------------------------------------------------------------
    def _attack(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _note_iterate(self, x_i: Tensor) -> None:
        """Record which inputs the deployed defense misclassifies at this iterate (when tracking)."""
        if self._broken is not None:
            self._broken |= self.model.deployed_logits(x_i, self.max_rows).argmax(1) != self._y

    def _generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(self.seed))

    def _iterations(self):
        return tqdm(range(self.steps), desc=self.name, disable=not self.verbose)

    def _ascend(self, x0: Tensor, x_start: Tensor, step: float, direction_of) -> Tensor:
        """The projected ascent loop shared by the PGD-type attacks: ``x <- P(x + step * direction_of(x))`` for
        ``steps`` iterations (``direction_of`` returns a unit step: a sign, or an ``l_2``-normalised vector)."""
        x_adv = x_start
        for _ in self._iterations():
            x_adv = project(x_adv + step * direction_of(x_adv), x0, self.eps, self.norm)
            self._note_iterate(x_adv)
        return x_adv
