"""The attack base: :class:`Attack` (shared parameters, checks, iterate tracking, the projected ascent loop and
ART-style ``generate``) and :class:`AttackResult`. Attacks see their target through
:class:`attacks_adaptive.defended.DefendedModel`, maximise a loss of :mod:`attacks_adaptive.losses` and move in the
geometry of :mod:`attacks_adaptive.geometry`.

All images here are NCHW float tensors in [0, 1]; :meth:`Attack.generate` converts an ART classifier's layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.geometry import NORMS, project
from attacks_adaptive.losses import LOSSES
from attacks_adaptive.scoring import correct_draws
from purifiers.validation import check_images

Tensor = torch.Tensor

@dataclass
class AttackResult:
    """What :meth:`Attack.perturb` returns.

    :ivar x_adv: the adversarial examples (NCHW, within the threat model).
    :ivar broken: per input, whether one pass of the deployed defense misclassified any iterate (the DiffPure/ScoreOpt
        BPDA code's rule), or ``None`` when iterates were not tracked (``track_iterates=False``).
    :ivar broken_fraction: per input, the largest fraction of the ``iterate_draws`` passes of the deployed defense
        misclassified at any iterate (the running maximum both of DiffHammer's metrics need), or ``None``
        (``iterate_draws=0``).
    """

    x_adv: Tensor
    broken: Tensor | None = None
    broken_fraction: Tensor | None = None


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
    :param iterate_draws: ``N``: score every iterate with ``N`` independent passes of the deployed defense and record,
        per input, the largest fraction misclassified (needed by DiffHammer's metrics, the ``all_draws_all_iterates``
        and ``min_fraction_over_iterates`` scorings; costs ``N`` passes per iterate, the first of which
        ``track_iterates`` then reuses); 0: off.
    :param verbose: show a progress bar over iterations.

    The iterates tracked are the clean input and every point the attack moves to, restarts included.
    """

    name = "attack"
    attack_params = ["eps", "norm", "steps", "max_rows", "seed", "track_iterates", "iterate_draws", "verbose"]
    #: What :meth:`describe` leaves out: how the attack is watched or batched, not what it does.
    _unstated_params = ("verbose", "track_iterates", "iterate_draws", "max_rows")

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 40, max_rows: int = 256,
                 seed: int = 0, track_iterates: bool = False, iterate_draws: int = 0, verbose: bool = False):
        self.model = DefendedModel.from_target(target)
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.max_rows = max_rows
        self.seed = seed
        self.track_iterates = track_iterates
        self.iterate_draws = iterate_draws
        self.verbose = verbose
        self._broken: Tensor | None = None
        self._broken_fraction: Tensor | None = None
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
        if not isinstance(self.iterate_draws, (int, np.integer)) or isinstance(self.iterate_draws, bool) \
                or self.iterate_draws < 0:
            raise ValueError(f"iterate_draws must be an integer >= 0, got {self.iterate_draws!r}.")
        for name in ("track_iterates", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool.")

    @staticmethod
    def _check_positive_int(name: str, value) -> None:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    #: What ``step=None`` means, for attacks with a ``step`` parameter (a fraction of eps: ADP's protocol's eps/4).
    default_step_per_eps: float = 0.25
    default_step_text: str = "eps/4"

    @property
    def step_size(self) -> float:
        """The step of the ascent: ``step``, or :attr:`default_step_per_eps` times eps."""
        return self.step or self.default_step_per_eps * self.eps

    def _check_step(self) -> None:
        if self.step is not None and not (isinstance(self.step, (int, float)) and self.step > 0):
            raise ValueError(f"step must be positive (or None for {self.default_step_text}), got {self.step!r}.")

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
        settings = {k: getattr(self, k) for k in self.attack_params if k not in self._unstated_params}
        if "step" in self.attack_params:
            settings["step"] = self.step_size
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
        self._broken_fraction = x.new_zeros(x.shape[0]) if self.iterate_draws else None
        self._note_iterate(x)
        x_adv = self._attack(x, y).detach()
        result = AttackResult(project(x_adv, x, self.eps, self.norm), self._broken, self._broken_fraction)
        self._broken = self._broken_fraction = self._y = None
        return result

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

    def _note_iterate(self, x_i: Tensor, index: Tensor | None = None) -> None:
        """Record which inputs the deployed defense misclassifies at this iterate, and in what fraction of
        ``iterate_draws`` passes (when tracking); ``index``: the rows of the batch ``x_i`` holds (an attack's restart on
        some inputs), ``None`` for all. Running maxima per input only, so the memory does not grow with iterations."""
        if self._broken is None and self._broken_fraction is None:
            return
        index = slice(None) if index is None else index
        correct = correct_draws(self.model, x_i, self._y[index], max(self.iterate_draws, 1), self.max_rows)
        if self._broken is not None:
            self._broken[index] |= ~correct[0]
        if self._broken_fraction is not None:
            self._broken_fraction[index] = torch.maximum(self._broken_fraction[index], (~correct).float().mean(0))

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
