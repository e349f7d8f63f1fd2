"""The part every purifier's ART wrapper shares: input checks, layout, internal batching, gradient modes and EOT.

| Please keep in mind the limitations of defences. While adversarial purification can be effective against attacks
  that ignore it, it can be evaded by adaptive attacks that differentiate through it or approximate it; for details
  see https://arxiv.org/abs/1802.00420 (Athalye et al.), https://arxiv.org/abs/1902.06705 (Carlini et al.) and
  https://arxiv.org/abs/2202.13711 (Croce et al., adaptive test-time defenses).

Gradient modes live inside ``forward``, because ``PyTorchClassifier`` backpropagates through ``forward`` and never
calls ``estimate_forward`` when every preprocessing step is a ``PreprocessorPyTorch`` (ART's
``PyTorchClassifier._apply_preprocessing``). ``forward`` knows it is inside a gradient computation when autograd is on
and the input requires a gradient; only then does it use the gradient mode and expand the batch for EOT.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
from torch import nn
from tqdm import tqdm

from purifiers.noise import RowGenerators, row_seeds
from purifiers.priors.speed import SpeedOptions
from purifiers.validation import as_network_dtype, check_images

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


def gradient_mode(name: str):
    """Marks a wrapper method ``method(self, x, generator) -> Tensor`` as the gradient mode ``name``: a differentiable
    function of the validated NCHW batch whose value is a purification of it. A wrapper's ``gradient_modes`` are the
    names of its marked methods (its base classes' first, in the order they are defined), and ``gradient=name``
    selects the method."""

    def mark(method):
        method.gradient_mode_name = name
        return method

    return mark


def _collect_gradient_modes(cls) -> None:
    methods = dict(getattr(cls, "_gradient_methods", {}))
    methods.update({m.gradient_mode_name: m for m in vars(cls).values() if hasattr(m, "gradient_mode_name")})
    cls._gradient_methods = methods
    cls.gradient_modes = tuple(methods)


def straight_through(x: Tensor, purified: Tensor) -> Tensor:
    """BPDA with the identity (Athalye et al. 2018): the value of ``purified``, the gradient of the identity."""
    return x + (purified - x).detach()


class AlgorithmSetting:
    """A wrapper attribute that lives on the pure-torch algorithm (``wrapper.algorithm``), so ART's ``set_params``
    changes the algorithm in place and ``_check_params`` validates it there."""

    def __init__(self, doc: str = ""):
        self.__doc__ = doc

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, wrapper, owner=None):
        return self if wrapper is None else getattr(wrapper.algorithm, self.name)

    def __set__(self, wrapper, value):
        setattr(wrapper.algorithm, self.name, value)


class PurifierPyTorch(PreprocessorPyTorch):
    """Base ART wrapper around a pure-torch purification algorithm ``algorithm(x, generator=...) -> x_purified``.

    Subclasses build ``self.algorithm`` and add gradient modes as methods marked with :func:`gradient_mode`; ``bpda``
    (straight-through identity, :meth:`_bpda`) is always available. ``gradient_modes`` lists them.

    :param gradient: how a gradient is taken through the purifier (see the subclass docstring for its modes).
    :param eot_samples: while a gradient is taken, each input is purified ``eot_samples`` times (one batched call of
        ``N * eot_samples`` rows, chunked by ``batch_size``) and the loss averages over them, so ``loss_gradient``
        returns the EOT-averaged gradient; ``predict`` (no gradient) keeps N rows.
    :param clip_values: ``(min, max)`` of the input images; must be ``(0, 1)`` up to scale (see ``_check_params``).
    :param channels_first: ``True`` for NCHW input, ``False`` for NHWC.
    :param batch_size: rows purified at once without a gradient (ART hands ``predict``'s whole input to ``forward``).
    :param verbose: show a progress bar over batches.
    :param seed: seed of the purifier's own random streams, or ``None`` for torch's global generator. With a seed,
        row ``i`` of the ``k``-th call since construction or :meth:`reset_generator` draws all its noise from its own
        stream seeded by ``(seed, k, i)`` (:mod:`purifiers.noise`): the sequence of calls is reproducible, and an
        image's noise does not depend on ``batch_size``; its purification agrees across batch sizes to float rounding,
        bit for bit on CPU with ``batch_invariant=True``.
    :param device_type: ART's convention: ``"gpu"`` (CUDA when available) or ``"cpu"``; ``None`` (default): ``"gpu"``
        when CUDA is available, else ``"cpu"``. It sets where ART's ``__call__`` puts numpy input; the purification
        itself runs on the device of the input tensor (the prior moves there).
    :param channels_last, compile, amp, batch_invariant: options of the prior network
        (:class:`purifiers.priors.speed.SpeedOptions`: ``channels_last`` memory format, ``torch.compile``, CUDA mixed
        precision ``"fp16"``/``"bf16"`` (refused on CPU), fixed-size network blocks so that a seeded purification is
        bit-identical on CPU whatever the batch size). All off by default.

    Any floating input dtype is accepted, the same way by every purifier: the purification runs in the prior network's
    dtype (float64 numpy input is cast) and returns the input's dtype.
    """

    params = ["gradient", "eot_samples", "clip_values", "channels_first", "batch_size", "verbose", "seed"]
    gradient_modes: tuple[str, ...]  # set from the methods marked with @gradient_mode (_collect_gradient_modes)
    #: The values ``purify`` accepts. A subclass or instance may widen it for inputs that legitimately carry additive
    #: noise (ART's randomized smoothing adds Gaussian noise before the preprocessing defences, without clipping).
    input_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, algorithm: nn.Module, *, gradient: str = "bpda", eot_samples: int = 1,
                 clip_values: tuple[float, float] = (0.0, 1.0), channels_first: bool = True, batch_size: int = 128,
                 verbose: bool = False, seed: int | None = None, device_type: str | None = None,
                 channels_last: bool = False, compile: bool | dict = False, amp: str | None = None,
                 batch_invariant: bool = False):
        if device_type is None:
            device_type = "gpu" if torch.cuda.is_available() else "cpu"
        if device_type not in ("cpu", "gpu"):
            raise ValueError(f"device_type must be 'cpu' or 'gpu' (ART's convention), got {device_type!r}.")
        super().__init__(device_type=device_type, is_fitted=True, apply_fit=False, apply_predict=True)
        self.device_type = device_type
        self.algorithm = algorithm
        self.gradient = gradient
        self.eot_samples = eot_samples
        self.clip_values = clip_values
        self.channels_first = channels_first
        self.batch_size = batch_size
        self.verbose = verbose
        self.seed = seed
        self._calls = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self.speed = SpeedOptions(channels_last=channels_last, compile=compile, amp=amp,
                                  batch_invariant=batch_invariant)
        if self.speed.amp is not None and device_type == "cpu":
            raise ValueError(f"amp={amp!r} is for CUDA inputs (mixed precision is off on CPU, where autocast is slower "
                             "than float32); leave amp=None with device_type='cpu'.")
        self._check_params()
        prior = getattr(self.algorithm, "prior", None)
        if prior is not None:
            prior.set_speed_options(self.speed)

    # ---------------------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.gradient not in self.gradient_modes:
            raise ValueError(f"gradient must be one of {self.gradient_modes}, got {self.gradient!r}.")
        if not isinstance(self.eot_samples, (int, np.integer)) or self.eot_samples < 1:
            raise ValueError(f"eot_samples must be a positive integer, got {self.eot_samples!r}.")
        if len(self.clip_values) != 2:
            raise ValueError("'clip_values' should be a tuple of 2 floats (min, max).")
        if self.clip_values[0] >= self.clip_values[1]:
            raise ValueError("Invalid 'clip_values': min >= max.")
        if tuple(float(v) for v in self.clip_values) != (0.0, 1.0):
            raise ValueError(f"clip_values must be (0, 1): the priors work on [0, 1] images, got {self.clip_values}. "
                             "Rescale the data (e.g. divide 0-255 images by 255).")
        if not isinstance(self.channels_first, bool):
            raise ValueError("channels_first must be a bool.")
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.verbose, bool):
            raise ValueError("The argument `verbose` has to be of type bool.")
        if self.seed is not None and not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}.")
        check_algorithm = getattr(self.algorithm, "check_params", None)
        if check_algorithm is not None:
            check_algorithm()

    def set_params(self, **kwargs) -> None:
        super().set_params(**kwargs)
        if "seed" in kwargs:
            self.reset_generator()

    # ---------------------------------------------------------------------------------------------------------------
    def generator(self, device: torch.device, rows: int | None = None) -> RowGenerators | torch.Generator | None:
        """The noise source of the next call (of ``rows`` rows) on ``device``; ``None`` without a seed (torch's global
        RNG). With a seed: per-row streams seeded by ``(seed, call number, row)`` (the call counter advances) when the
        algorithm draws through :mod:`purifiers.noise` (``row_generators = True``: ADP, ScoreOpt, COUP, DiffPure);
        for any other algorithm (``algorithm(x, generator=torch.Generator)``) the wrapper's one seeded stream."""
        if self.seed is None:
            return None
        device = torch.device(device)
        if getattr(self.algorithm, "row_generators", False) and rows is not None:
            seeds = row_seeds(int(self.seed), self._calls, int(rows))
            self._calls += 1
            return RowGenerators(seeds, device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._generators[device]

    def reset_generator(self) -> None:
        """Restart the seeded noise, so the next call draws the same noise as the first one did."""
        self._calls = 0
        self._generators.clear()

    def _builtin_unet_config(self) -> dict:
        """The built-in U-Net's config dict, where the prior has one ({} otherwise: the authors' networks keep their
        config as a dataclass, and check their input themselves)."""
        config = getattr(getattr(getattr(self.algorithm, "prior", None), "net", None), "config", None)
        return config if isinstance(config, dict) else {}

    @property
    def input_channels(self) -> int | None:
        """The channel count the prior expects, where it records one, else ``None``."""
        return self._builtin_unet_config().get("in_channels")

    @property
    def input_multiple(self) -> int:
        """Image height and width must be multiples of this (the built-in U-Net halves them at each of its levels)."""
        mults = self._builtin_unet_config().get("channel_mults")
        return 2 ** (len(mults) - 1) if mults else 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _collect_gradient_modes(cls)

    @gradient_mode("bpda")
    def _bpda(self, x: Tensor, generator) -> Tensor:
        return straight_through(x, self._purify_no_grad(x, generator))

    def _purify_no_grad(self, x: Tensor, generator) -> Tensor:
        with torch.no_grad():
            return self._run_algorithm(x, generator)

    def _run_algorithm(self, x: Tensor, generator) -> Tensor:
        """The algorithm on validated input: its unchecked path where it has one."""
        run = getattr(self.algorithm, "purify_unchecked", None)
        return run(x, generator) if run is not None else self.algorithm(x, generator=generator)

    # ---------------------------------------------------------------------------------------------------------------
    def _to_nchw(self, x: Tensor) -> Tensor:
        return x if self.channels_first else x.permute(0, 3, 1, 2)

    def _from_nchw(self, x: Tensor) -> Tensor:
        return x if self.channels_first else x.permute(0, 2, 3, 1)

    def purify(self, x: Tensor, with_gradient: bool, gradient: str | None = None) -> Tensor:
        """Purify an NCHW tensor in [0, 1]: through a gradient mode when ``with_gradient`` (``gradient``, default the
        wrapper's own ``self.gradient``), else in batches without graph.

        This is what :class:`purifiers.PurifiedClassifier` calls; it never expands the batch for EOT. The one place the
        input is validated (the algorithms' inner loops do not check again); any floating dtype is accepted, computed
        in the prior network's dtype and returned in the input's.
        """
        mode = self.gradient if gradient is None else gradient
        if mode not in self.gradient_modes:
            raise ValueError(f"{type(self).__name__} has no gradient mode {mode!r}; it has {self.gradient_modes}.")
        if not isinstance(x, Tensor):
            raise ValueError(f"purifier input must be a torch.Tensor, got {type(x).__name__}.")
        check_images(x, name="purifier input", channels=self.input_channels, value_range=self.input_range)
        if x.shape[2] % self.input_multiple or x.shape[3] % self.input_multiple:
            raise ValueError(f"purifier input has height x width {x.shape[2]} x {x.shape[3]}; the prior's network "
                             f"needs multiples of {self.input_multiple} (shape {tuple(x.shape)}).")
        self.algorithm.to(x.device)
        self.speed.check_device(x.device)
        x_net = as_network_dtype(x, getattr(self.algorithm, "prior", self.algorithm))
        gen = self.generator(x.device, x.shape[0])
        if with_gradient:
            return self._gradient_methods[mode](self, x_net, gen).to(x.dtype)
        chunks = range(0, x.shape[0], self.batch_size)
        out = [self._purify_no_grad(x_net[i:i + self.batch_size],
                                    gen[i:i + self.batch_size] if isinstance(gen, RowGenerators) else gen)
               for i in tqdm(chunks, desc=type(self).__name__, disable=not self.verbose or len(chunks) < 2)]
        return torch.cat(out).clamp(*self.clip_values).to(x.dtype)

    def forward(self, x: Tensor, y=None):
        """ART's entry point: purify ``x`` (as laid out by ``channels_first``), returning ``(x_purified, y)``.

        Inside a gradient computation the batch is expanded ``eot_samples``-fold (and ``y`` with it); otherwise the
        output has the input's rows.
        """
        if not isinstance(x, Tensor):
            raise ValueError(f"forward expects a torch.Tensor, got {type(x).__name__}.")
        if x.ndim != 4:
            raise ValueError(f"purifier input must be a 4-D image batch, got shape {tuple(x.shape)}.")
        with_gradient = torch.is_grad_enabled() and x.requires_grad
        x_nchw = self._to_nchw(x)
        if with_gradient and self.eot_samples > 1:
            x_nchw = x_nchw.repeat_interleave(self.eot_samples, dim=0)
            y = _repeat_rows(y, self.eot_samples)
        return self._from_nchw(self.purify(x_nchw, with_gradient)), y

    def estimate_forward(self, x: Tensor, y=None) -> Tensor:
        """The same differentiable estimate ``forward`` uses (without EOT expansion, which would change the shape)."""
        return self._from_nchw(self.purify(self._to_nchw(x), torch.is_grad_enabled()))

    def __call__(self, x: np.ndarray, y=None):
        """ART's numpy entry: ``forward`` (which validates the input once) on ``x`` put on this wrapper's device."""
        if not isinstance(x, np.ndarray):
            raise ValueError(f"purifier input must be a numpy array, got {type(x).__name__}.")
        if not np.issubdtype(x.dtype, np.floating):
            check_images(x, name="purifier input")  # raises the dtype error before torch converts the array
        return super().__call__(x, y)


_collect_gradient_modes(PurifierPyTorch)  # the base's own bpda (subclasses collect theirs in __init_subclass__)


def _repeat_rows(y, k: int):
    if y is None:
        return None
    if isinstance(y, Tensor):
        return y.repeat_interleave(k, dim=0)
    return np.repeat(y, k, axis=0)


class PurifiedClassifier(nn.Module):
    """A purifier in front of a classifier, as one ``torch.nn.Module`` that AutoAttack, torchattacks and RobustBench
    accept: ``forward(x)`` takes [0, 1] NCHW images and returns scores of shape (N, classes).

    The deployed defense purifies each input ``runs`` times (batched in one call) and combines the runs:

    * ``"softmax"`` (default): log of the mean softmax (log-probabilities, which AutoAttack's CE and DLR losses accept);
    * ``"logits"``: the mean of the logits;
    * ``"vote"``: log of the vote fractions of the runs' argmaxes (not differentiable: use for scoring only).

    Gradients flow through the purifier's gradient mode (``purifier.gradient``) when the input requires one. Counts
    network evaluations per image in ``nfe`` (prior forward/backward, classifier forward).

    :param purifier: a :class:`PurifierPyTorch` (ADPPyTorch, ScoreOptPyTorch, COUPPyTorch, ...).
    :param classifier: a module mapping [0, 1] images to logits.
    """

    ENSEMBLES = ("softmax", "logits", "vote")

    def __init__(self, purifier: PurifierPyTorch, classifier: nn.Module, runs: int = 1, ensemble: str = "softmax"):
        super().__init__()
        if not isinstance(purifier, PurifierPyTorch):
            raise ValueError(f"purifier must be a PurifierPyTorch, got {type(purifier).__name__}.")
        if not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be a positive integer, got {runs!r}.")
        if ensemble not in self.ENSEMBLES:
            raise ValueError(f"ensemble must be one of {self.ENSEMBLES}, got {ensemble!r}.")
        self.purifier = purifier
        self.algorithm = purifier.algorithm  # registered, so .to() / .requires_grad_() reach the prior
        self.classifier = classifier
        self.runs = runs
        self.ensemble = ensemble
        self.classifier_evaluations = 0
        self.images_seen = 0

    @property
    def prior_nfe(self):
        """The prior's :class:`purifiers.priors.backends.NFECounter` (images through the network, forward and backward)."""
        return self.algorithm.prior.nfe

    def reset_counters(self) -> None:
        self.prior_nfe.reset()
        self.classifier_evaluations = 0
        self.images_seen = 0

    def nfe_per_image(self) -> dict:
        n = max(self.images_seen, 1)
        return {"prior_forward": self.prior_nfe.forward / n, "prior_backward": self.prior_nfe.backward / n,
                "classifier": self.classifier_evaluations / n}

    def forward(self, x: Tensor) -> Tensor:
        """Scores of the purified ``x`` (NCHW, [0, 1], any floating dtype; validated once, by the purifier)."""
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError("PurifiedClassifier input must be a 4-D torch.Tensor image batch (N, C, H, W), got "
                             f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}.")
        with_gradient = torch.is_grad_enabled() and x.requires_grad
        n = x.shape[0]
        x_runs = x.repeat(self.runs, 1, 1, 1) if self.runs > 1 else x
        purified = self.purifier.purify(x_runs, with_gradient)
        logits = self.classifier(as_network_dtype(purified, self.classifier))
        self.classifier_evaluations += logits.shape[0]
        self.images_seen += n
        logits = logits.reshape(self.runs, n, -1)
        if self.ensemble == "softmax":
            return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - np.log(self.runs)
        if self.ensemble == "logits":
            return logits.mean(0)
        votes = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float().mean(0)
        return votes.clamp_min(1e-12).log()
