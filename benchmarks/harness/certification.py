"""``python -m benchmarks certify``: certified ``l_2`` accuracy of denoised smoothing, and the bracket.

What is certified is the smoothed classifier ``g(x) = argmax_c P(f(D(x + delta)) = c)``, ``delta ~ N(0, sigma^2 I)``
(Cohen, Rosenfeld, Kolter, ICML 2019, https://arxiv.org/abs/1902.02918, eq. (1) and Theorem 1), with the denoiser
``D`` in front of the classifier ``f`` (denoised smoothing: Salman et al., NeurIPS 2020,
https://arxiv.org/abs/2003.01908), never the purifier deployed without the smoothing noise. ``D`` is

* ``one-shot`` (default): one call of the prior's denoiser at the smoothing sigma (Carlini et al., ICLR 2023,
  https://arxiv.org/abs/2206.10550, Algorithm 1; :class:`purifiers.one_shot.OneShotPyTorch`), or
* ``full``: the registry purifier of ``--defense`` with its deployed settings for the dataset, one purification per
  noise draw, fed the noisy images as they are: it was designed for clean or adversarial [0, 1] images, not for
  Gaussian noise of the smoothing sigma, and every row says so.

Per sigma the smoothed classifier is ART's ``PyTorchRandomizedSmoothing`` (a ``PyTorchClassifier`` with
``preprocessing_defences=[D]``, ``scale=sigma``, ``sample_size=n0``, ``alpha``), certified by its ``certify(x, n)``:
Cohen et al.'s CERTIFY (Algorithm "certify", section 3.2.2): the class of the most of ``n0 = sample_size`` noisy
predictions, its Clopper-Pearson one-sided ``(1 - alpha)`` lower bound ``p_A`` from ``n`` fresh noisy predictions
(``statsmodels``' ``proportion_confint(count, n, alpha=2 alpha, method="beta")[0]``), radius ``sigma Phi^-1(p_A)``,
abstain (prediction -1, radius 0) when ``p_A < 1/2``. ART adds the noise (std ``scale`` on the classifier's [0, 1]
input scale, numpy's global generator, unclipped) in ``_noisy_samples`` before the preprocessing defences run, which
is denoised smoothing's order. The certified accuracy at ``r`` is the fraction of images whose certified prediction is
the label with radius ``>= r``.

``--bracket`` attacks the same smoothed classifier on the same images with :class:`attacks_adaptive.SmoothAdv`
(Salman et al., NeurIPS 2019, https://arxiv.org/abs/1906.04584) at ``l_2`` eps = each table radius, and scores the
attacked point with the smoothed classifier's own prediction: ART's ``predict`` (Cohen et al.'s PREDICT, section
3.2.1, with ``bracket_n`` noise draws and the binomial test at ``alpha``), the clean point counting as an attacked
point too. An image is broken when PREDICT returns a wrong class at either point; an abstention proves nothing
(PREDICT abstains where ``p_A`` is near 1/2, as it is at the edge of a certificate), so the attacked accuracy is an
upper bound on the smoothed classifier's robust accuracy up to PREDICT's ``alpha`` (Cohen et al.'s Theorem 2), as the
certified accuracy is a lower bound up to CERTIFY's: certified accuracy at ``r`` <= attacked accuracy at ``r`` on the
same images, and the true robust accuracy of the smoothed classifier lies in the bracket. The rows also give the
accuracy with abstentions counted as errors (``robust_acc_abstain_wrong``: the Monte-Carlo classifier as deployed),
which may fall below the certified accuracy at the edge of certificates without any certificate being wrong.

``l_inf`` by inclusion: the ``l_inf`` ball of radius ``eps`` lies in the ``l_2`` ball of radius ``eps sqrt(d)``, so
the certified ``l_2`` accuracy at ``eps sqrt(d)`` is a certified lower bound on the smoothed classifier's ``l_inf``
accuracy at ``eps`` (on Fashion-MNIST 8/255 is 0.878 in ``l_2``).

Every image's certificate (and bracket) is saved as it lands under ``<out>/certify_state/<run>/sigma_<s>/``; a rerun
resumes, and refuses a folder written with other settings. ``--shard i/N`` runs the images ``i, i + N, ...``; the run
that finds every image done writes ``<out>/certify_<run>.json`` and the curve ``certify_<run>.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from attacks_adaptive.files import StateError, atomic_write, differing_keys, read_state_json
from attacks_adaptive.rows import make_row
from benchmarks.harness.plotting import pyplot, save_figure
from benchmarks.harness.sharding import Shard, wait_for_all
from benchmarks.results import collect_meta, format_table, portable_path, prior_fields, write_results

ATTACK = "randomized smoothing (Cohen et al. CERTIFY)"
DENOISERS = ("one-shot", "full")
DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0, 1.5)
DEFAULT_LINF_EPS = 8 / 255
DATASETS = ("mnist", "fashion_mnist")
#: Noise draws of the cost estimate's calibration (one image, the first sigma), at most the run's own.
CALIBRATION_N0, CALIBRATION_N = 16, 128


@dataclass(frozen=True)
class CertifySettings:
    """A certification run; :meth:`check` raises ``ValueError`` naming a bad value."""

    dataset: str = "mnist"
    sigmas: tuple = (0.25, 0.5, 1.0)
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    n_images: int = 100
    denoiser: str = "one-shot"
    defense: str | None = None
    seed: int = 0
    split: str = "test"
    radii: tuple = DEFAULT_RADII
    linf_eps: float = DEFAULT_LINF_EPS
    bracket: bool = False
    bracket_n: int | None = None  # PREDICT's draws at the attacked points (None: n)
    attack_steps: int = 20
    attack_samples: int = 8
    attack_gradient: str = "exact"
    batch_size: int = 256
    speed: dict = field(default_factory=dict)

    def check(self) -> None:
        def count(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        def positive(name, values):
            if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                 or v <= 0 for v in values):
                raise ValueError(f"{name} must be positive finite numbers, got {values!r}.")

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}.")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser must be one of {DENOISERS}, got {self.denoiser!r}.")
        if self.denoiser == "full" and not self.defense:
            raise ValueError("--denoiser full certifies the purifier of --defense: name one (e.g. --defense adp).")
        if self.denoiser == "one-shot" and self.defense:
            raise ValueError(f"--defense {self.defense} names the full purifier of --denoiser full; one-shot "
                             "denoising takes only the prior (leave --defense out).")
        positive("sigmas", self.sigmas)
        positive("radii", self.radii)
        positive("linf_eps", (self.linf_eps,))
        if len(set(self.sigmas)) != len(self.sigmas):
            raise ValueError(f"sigmas must be distinct, got {self.sigmas}.")
        for name in ("n0", "n", "n_images", "attack_steps", "attack_samples", "batch_size"):
            count(name, getattr(self, name))
        if self.bracket_n is not None:
            count("bracket_n", self.bracket_n)
        if not (isinstance(self.alpha, float) and 0 < self.alpha < 0.5):
            raise ValueError(f"alpha (the certificate's failure probability) must be in (0, 0.5), got {self.alpha!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}.")
        if self.split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {self.split!r}.")

    @property
    def label(self) -> str:
        """The ``defense`` of the rows: ``one-shot`` or ``<defense> (full purifier)``."""
        return "one-shot" if self.denoiser == "one-shot" else f"{self.defense} (full purifier)"

    @property
    def run_name(self) -> str:
        from attacks_adaptive.runner import slug

        return slug("one-shot" if self.denoiser == "one-shot" else f"{self.defense}_full")

    @property
    def predict_n(self) -> int:
        return self.bracket_n or self.n


# ---------------------------------------------------------------------------------------------------------------------
def build_denoiser(settings: CertifySettings, sigma: float, prior, classifier, device_type: str):
    """The preprocessing defence ``D`` of the smoothed classifier at ``sigma``: one-shot denoising at ``sigma``, or the
    registry's full purifier (its input range widened to the noisy images it is fed, as :mod:`purifiers.art_base`
    allows)."""
    from purifiers.one_shot import NOISE_SIGMAS, OneShotPyTorch

    if settings.denoiser == "one-shot":
        return OneShotPyTorch(prior, sigma=sigma, gradient=settings.attack_gradient, batch_size=settings.batch_size,
                              device_type=device_type, **settings.speed)
    from benchmarks.defenses import build_purifier

    purifier = build_purifier(settings.defense, prior, classifier, dataset=settings.dataset, device_type=device_type,
                              batch_size=settings.batch_size, **settings.speed)
    purifier.input_range = (-NOISE_SIGMAS * sigma, 1.0 + NOISE_SIGMAS * sigma)
    if settings.bracket:
        if settings.attack_gradient not in purifier.gradient_modes:
            raise ValueError(f"--attack-gradient {settings.attack_gradient}: {settings.defense} has the gradient "
                             f"modes {purifier.gradient_modes}.")
        purifier.set_params(gradient=settings.attack_gradient)
    return purifier


def smoothed_classifier(denoiser, classifier, sigma: float, sample_size: int, alpha: float, input_shape,
                        nb_classes: int, device_type: str):
    """ART's ``PyTorchRandomizedSmoothing`` of ``classifier`` with ``preprocessing_defences=[denoiser]``, ``scale`` =
    ``sigma`` (the noise std on the [0, 1] input scale), ``sample_size`` (``certify``'s ``n0``, ``predict``'s draws)
    and ``alpha``."""
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    with warnings.catch_warnings():
        # ART warns that its noise comes after the preprocessing defences: true of fit and of loss_gradient(sampling=
        # True), not of certify and predict (_noisy_samples runs first), the only methods used here.
        warnings.filterwarnings("ignore", message="(?s).*AFTER the application of preprocessing defences")
        return PyTorchRandomizedSmoothing(classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=input_shape,
                                          nb_classes=nb_classes, clip_values=(0.0, 1.0), channels_first=True,
                                          preprocessing_defences=[denoiser], device_type=device_type,
                                          sample_size=sample_size, scale=sigma, alpha=alpha)


def reseed(smoothed, seed: int) -> None:
    """Seed what a certificate or prediction draws: numpy's global generator (ART's noise), torch's, and the
    purifier's own streams."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    purifier = smoothed.preprocessing_operations[0]
    purifier.seed = seed
    purifier.reset_generator()


def draw_seed(seed: int, sigma: float, index: int, purpose: int = 0) -> int:
    """The seed of one image's draws at one sigma (``purpose``: 0 the certificate, 1 the clean PREDICT, 2 + k the
    attack and PREDICT at the k-th radius): the same whatever the shard."""
    return int(np.random.SeedSequence([seed, index, round(sigma * 1e6), purpose]).generate_state(1)[0] % (2**31))


def smoothed_prediction(predictor, x: np.ndarray, batch_size: int) -> int:
    """ART's ``predict`` (Cohen et al.'s PREDICT) of one image: the class, or -1 where it abstains (a zero row)."""
    row = predictor.predict(x, batch_size=batch_size, is_abstain=True)[0]
    return int(row.argmax()) if row.sum() > 0 else -1


def certified_accuracy(labels, predictions, radii, r: float) -> float:
    """Cohen et al.'s certified accuracy at ``r``: the fraction certified correct with radius ``>= r``."""
    labels, predictions, radii = map(np.asarray, (labels, predictions, radii))
    return float(np.mean((predictions == labels) & (radii >= r)))


# ---------------------------------------------------------------------------------------------------------------------
class _SigmaState:
    """One sigma's folder: ``run.json`` (the settings its images were made with) and one JSON per image
    (``img_<i>.json``, ``bracket_<i>.json``), written atomically as each lands."""

    def __init__(self, folder: str, certify: dict, bracket: dict | None):
        self.folder = folder
        path = os.path.join(folder, "run.json")
        manifest = json.loads(json.dumps({"certify": certify, "bracket": bracket}))
        if os.path.exists(path):
            saved = read_state_json(path)
            differ = differing_keys(saved.get("certify"), manifest["certify"], "certify")
            if saved.get("bracket") is not None and bracket is not None:
                differ += differing_keys(saved["bracket"], manifest["bracket"], "bracket")
            if differ:
                raise StateError(f"{path} holds a certification with other settings (differs in {differ}); use "
                                 "another --out folder (or delete that one) to run new settings.")
            manifest["bracket"] = manifest["bracket"] or saved.get("bracket")
        self._manifest = (path, manifest)  # written with the first image, so that --estimate leaves no trace
        self.keys = {"img": json.dumps(manifest["certify"], sort_keys=True),
                     "bracket": json.dumps(manifest["bracket"], sort_keys=True)}

    def path(self, kind: str, index: int) -> str:
        return os.path.join(self.folder, f"{kind}_{index:06d}.json")

    def load(self, kind: str, index: int, image_sha: str) -> dict | None:
        path = self.path(kind, index)
        if not os.path.exists(path):
            return None
        state = read_state_json(path)
        if state.get("config") != self.keys[kind] or state.get("image_sha256") != image_sha:
            raise StateError(f"{path} was written with other settings or for another image; delete it (or its "
                             "folder) to run it again.")
        return state

    def save(self, kind: str, index: int, image_sha: str, **values) -> dict:
        if self._manifest is not None:
            path, manifest = self._manifest
            atomic_write(path, lambda f: json.dump(manifest, f, indent=2), mode="w")
            self._manifest = None
        state = {"config": self.keys[kind], "image_sha256": image_sha, **values}
        atomic_write(self.path(kind, index), lambda f: json.dump(state, f), mode="w")
        return state


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _weights_sha(*modules) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Sigma:
    """The smoothed classifier at one sigma: ``certifier`` (``sample_size = n0``) and ``predictor`` (``sample_size =
    bracket_n``, what the bracket attacks and scores), sharing one denoiser; and its state folder."""

    def __init__(self, settings: CertifySettings, sigma: float, prior, classifier, prior_name, out_dir: str, x):
        device_type = "gpu" if torch.cuda.is_available() else "cpu"
        self.settings, self.sigma = settings, sigma
        self.denoiser = build_denoiser(settings, sigma, prior, classifier, device_type)
        common = (self.denoiser, classifier, sigma)
        shape, classes = tuple(x.shape[1:]), int(classifier(torch.as_tensor(x[:1])).shape[1])
        self.certifier = smoothed_classifier(*common, settings.n0, settings.alpha, shape, classes, device_type)
        self.predictor = smoothed_classifier(*common, settings.predict_n, settings.alpha, shape, classes, device_type)
        purifier = {k: repr(getattr(self.denoiser, k, None)) for k in self.denoiser.params
                    if k not in ("verbose", "batch_size", "seed", "gradient")}
        certify = {"dataset": settings.dataset, "split": settings.split, "sigma": sigma, "n0": settings.n0,
                   "n": settings.n, "alpha": settings.alpha, "seed": settings.seed, "denoiser": settings.denoiser,
                   "defense": settings.defense, "purifier": {"class": type(self.denoiser).__name__, **purifier},
                   "speed": str(self.denoiser.speed), "prior": prior_name,
                   "weights_sha256": _weights_sha(classifier, self.denoiser.algorithm)}
        bracket = {"radii": list(settings.radii), "predict_n": settings.predict_n, "steps": settings.attack_steps,
                   "samples": settings.attack_samples, "gradient": settings.attack_gradient} \
            if settings.bracket else None
        self.state = _SigmaState(os.path.join(out_dir, "certify_state", settings.run_name, f"sigma_{sigma:g}"),
                                 certify, bracket)

    def certify(self, x_i: np.ndarray, index: int) -> tuple[int, float]:
        """ART's ``certify`` of one image (``n0 = sample_size`` draws to select, ``n`` to estimate)."""
        reseed(self.certifier, draw_seed(self.settings.seed, self.sigma, index))
        prediction, radius = self.certifier.certify(x_i, n=self.settings.n, batch_size=self.settings.batch_size)
        return int(prediction[0]), float(radius[0])

    def attack(self, x_i: np.ndarray, label: int, eps: float, index: int, k: int, steps: int | None = None):
        """SmoothAdv's point at ``eps`` (``steps``: default the settings'), the predictor reseeded for its PREDICT."""
        from attacks_adaptive.smoothadv import SmoothAdv

        seed = draw_seed(self.settings.seed, self.sigma, index, 2 + k)
        reseed(self.predictor, seed)
        attack = SmoothAdv(self.predictor, eps=eps, steps=steps or self.settings.attack_steps,
                           samples=self.settings.attack_samples, gradient=self.settings.attack_gradient, seed=seed)
        device = next(self.predictor.model.parameters()).device
        x_adv = attack.perturb(torch.as_tensor(x_i, device=device), torch.tensor([label], device=device)).x_adv
        reseed(self.predictor, seed)
        return x_adv.cpu().numpy()

    def bracket(self, x_i: np.ndarray, label: int, index: int) -> dict:
        """PREDICT at the clean point and, per table radius, at SmoothAdv's point (-1: abstained)."""
        batch = self.settings.batch_size
        reseed(self.predictor, draw_seed(self.settings.seed, self.sigma, index, 1))
        clean = smoothed_prediction(self.predictor, x_i, batch)
        attacked = [smoothed_prediction(self.predictor, self.attack(x_i, label, r, index, k), batch)
                    for k, r in enumerate(self.settings.radii)]
        return {"clean_prediction": clean, "attacked_predictions": attacked}


def _timed(run):
    cpu, wall = time.process_time(), time.time()
    value = run()
    return value, time.process_time() - cpu, time.time() - wall


# ---------------------------------------------------------------------------------------------------------------------
def load_data(settings: CertifySettings, data_dir: str | None = None):
    from benchmarks.data import load_fashion_mnist, load_mnist

    if settings.dataset == "mnist":
        return load_mnist(settings.split, n=settings.n_images)
    return load_fashion_mnist(settings.split, data_dir=data_dir, n=settings.n_images)


def run_certification(out_dir: str, settings: CertifySettings, prior_path: str | None = None,
                      data_dir: str | None = None, verbose: bool = True, shard: Shard | None = None,
                      estimate: str | None = None) -> dict | None:
    """Certify (and with ``settings.bracket`` attack) the first ``n_images`` of the split at every sigma; returns
    ``{"rows", "meta"}`` once every image is done (``None`` for a shard that leaves images to others, or with
    ``estimate="only"``). ``estimate``: ``"first"`` prints the projected cost before running, ``"only"`` prints it
    and runs nothing."""
    from benchmarks.models import load_reference_models, reference_paths

    settings.check()
    prior_file = prior_path or reference_paths(settings.dataset)[1]
    classifier, prior = (m.requires_grad_(False) for m in load_reference_models(settings.dataset, prior=prior_file))
    x, y = load_data(settings, data_dir)
    prior_name = prior_fields(prior_file) if os.path.exists(prior_file) else {"prior": portable_path(prior_file)}
    sigmas = [_Sigma(settings, s, prior, classifier, prior_name, out_dir, x) for s in settings.sigmas]
    mine = [i for i in range(len(y)) if shard is None or shard.owns(i)]
    if estimate is not None:
        print_estimate(sigmas[0], x, y, len(mine))
        if estimate == "only":
            return None
    for sig in sigmas:
        for i in mine:
            _run_image(sig, x[i:i + 1], int(y[i]), i, verbose)
    wait_for_all(shard)
    if shard is not None and shard.distributed and not shard.gathers:
        return None
    missing = [(s.sigma, i) for s in sigmas for i in range(len(y))
               if not os.path.exists(s.state.path("img", i))
               or (settings.bracket and not os.path.exists(s.state.path("bracket", i)))]
    if missing:
        print(f"shard {shard.index}/{shard.count} done; {len(missing)} image certificates are another shard's. When "
              "every shard is done, run the same command without --shard to write the results.")
        return None
    return write_certification(out_dir, settings, sigmas, x, y, prior_name, verbose)


def _run_image(sig: _Sigma, x_i: np.ndarray, label: int, index: int, verbose: bool) -> None:
    sha = _sha(x_i)
    state = sig.state.load("img", index, sha)
    if state is None:
        nfe = sig.denoiser.algorithm.prior.nfe.forward
        (prediction, radius), cpu, wall = _timed(lambda: sig.certify(x_i, index))
        state = sig.state.save("img", index, sha, label=label, prediction=prediction, radius=radius, cpu_seconds=cpu,
                               wall_seconds=wall, prior_forward=sig.denoiser.algorithm.prior.nfe.forward - nfe)
        if verbose:
            print(f"sigma {sig.sigma:g} image {index}: label {label}, prediction {prediction}, radius {radius:.3f} "
                  f"({cpu:.1f} CPU s)", flush=True)
    if sig.settings.bracket and sig.state.load("bracket", index, sha) is None:
        result, cpu, wall = _timed(lambda: sig.bracket(x_i, label, index))
        sig.state.save("bracket", index, sha, **result, cpu_seconds=cpu, wall_seconds=wall)
        if verbose:
            print(f"sigma {sig.sigma:g} image {index}: PREDICT {result['clean_prediction']} clean, "
                  f"{result['attacked_predictions']} attacked at {list(sig.settings.radii)} ({cpu:.1f} CPU s)",
                  flush=True)


def print_estimate(sig: _Sigma, x, y, images: int) -> dict:
    """Calibrate on the first image at the first sigma (``certify`` with at most :data:`CALIBRATION_N0` +
    :data:`CALIBRATION_N` draws; SmoothAdv at 1 and 2 steps, :func:`benchmarks.harness.cost.linear_projection`),
    project to ``images`` images at every sigma with the run's ``n0``, ``n`` and bracket, print and return it (CPU
    seconds: the calibration's process time)."""
    from benchmarks.harness.cost import linear_projection

    s = sig.settings
    n0, n = min(s.n0, CALIBRATION_N0), min(s.n, CALIBRATION_N)
    x0, label = x[:1], int(y[0])
    certifier = smoothed_classifier(sig.denoiser, sig.certifier.model, sig.sigma, n0, s.alpha, x.shape[1:],
                                    sig.certifier.nb_classes, "gpu" if torch.cuda.is_available() else "cpu")
    reseed(certifier, s.seed)
    _, cpu, _ = _timed(lambda: certifier.certify(x0, n=n, batch_size=s.batch_size))
    per_draw = cpu / (n0 + n)
    per_image = {"certify": per_draw * (s.n0 + s.n)}
    if s.bracket:
        def cost(iterations):
            return {}, _timed(lambda: sig.attack(x0, label, s.radii[0], 0, 0, steps=iterations))[1]

        per_image["bracket"] = len(s.radii) * linear_projection(cost, {"iterations": s.attack_steps})[1] \
            + per_draw * s.predict_n * (1 + len(s.radii))
    total = sum(per_image.values()) * images * len(s.sigmas)
    print(f"Estimated cost ({s.label}, calibrated on 1 image with n0 = {n0}, n = {n}: {per_draw * 1e3:.2f} CPU ms "
          f"per noise draw): per image and sigma " + ", ".join(f"{k} {v:.1f} s" for k, v in per_image.items())
          + f"; {images} images x {len(s.sigmas)} sigmas: {total / 3600:.2f} CPU h", flush=True)
    return {"per_draw_seconds": per_draw, "per_image_seconds": per_image, "projected_seconds": total}


# ---------------------------------------------------------------------------------------------------------------------
def write_certification(out_dir: str, settings: CertifySettings, sigmas: list, x, y, prior_name: dict,
                        verbose: bool = True) -> dict:
    """``certify_<run>.json`` (rows: certified per sigma and table radius, the implied ``l_inf`` bound, and with the
    bracket SmoothAdv's smoothed-prediction rows) and ``certify_<run>.png`` (the curves), from the state folders."""
    rows, curves = [], {}
    dim = int(np.prod(x.shape[1:]))
    for sig in sigmas:
        sha = [_sha(x[i:i + 1]) for i in range(len(y))]
        states = [sig.state.load("img", i, sha[i]) for i in range(len(y))]
        pred, radius = np.array([s["prediction"] for s in states]), np.array([s["radius"] for s in states])
        curves[sig.sigma] = (pred, radius)
        common = dict(defense=settings.label, n=len(y), seed=settings.seed, denoiser=settings.denoiser,
                      sigma=sig.sigma, n0=settings.n0, n_noise=settings.n, alpha=settings.alpha,
                      note=_note(settings, sig.sigma))
        certified = dict(common, attack=ATTACK, gradient=None, scoring="certified",
                         clean_acc=certified_accuracy(y, pred, radius, 0.0), abstain_rate=float(np.mean(pred == -1)),
                         seconds=sum(s["cpu_seconds"] for s in states),
                         seconds_per_image=float(np.mean([s["cpu_seconds"] for s in states])),
                         wall_seconds=sum(s["wall_seconds"] for s in states),
                         nfe_per_image={"prior_forward": float(np.mean([s["prior_forward"] for s in states]))})
        for r in settings.radii:
            rows.append(make_row(**certified, eps=r, norm="L2", robust_acc=certified_accuracy(y, pred, radius, r)))
        l2 = settings.linf_eps * math.sqrt(dim)
        rows.append(make_row(**certified, eps=settings.linf_eps, norm="Linf", l2_radius=l2,
                             robust_acc=certified_accuracy(y, pred, radius, l2),
                             bound=f"certified l_2 accuracy at eps sqrt(d) = {l2:.3f} (d = {dim}): a lower bound on "
                                   "the smoothed classifier's l_inf accuracy at eps, not on the deployed purifier's"))
        if settings.bracket:
            brackets = [sig.state.load("bracket", i, sha[i]) for i in range(len(y))]
            labels = np.asarray(y)[:, None]
            clean = np.array([b["clean_prediction"] for b in brackets])[:, None]
            attacked = np.array([b["attacked_predictions"] for b in brackets])
            broken = ((clean != -1) & (clean != labels)) | ((attacked != -1) & (attacked != labels))
            right = (clean == labels) & (attacked == labels)
            for k, r in enumerate(settings.radii):
                lower, upper = certified_accuracy(y, pred, radius, r), float(1 - broken[:, k].mean())
                certified_here = (pred == np.asarray(y)) & (radius >= r)
                rows.append(make_row(**common, attack="SmoothAdv",
                                     gradient=settings.attack_gradient, scoring="smoothed_prediction", eps=r,
                                     norm="L2", robust_acc=upper, robust_acc_abstain_wrong=float(right[:, k].mean()),
                                     clean_acc=float(np.mean(clean == labels)), bracket=[lower, upper],
                                     violations=int(np.sum(certified_here & broken[:, k])),
                                     predict_n=settings.predict_n, iterations=settings.attack_steps,
                                     eot=settings.attack_samples, seconds=sum(b["cpu_seconds"] for b in brackets),
                                     wall_seconds=sum(b["wall_seconds"] for b in brackets)))
    meta = collect_meta(settings.dataset, f"{settings.split}[:{len(y)}]", **prior_name,
                        settings={k: v for k, v in asdict(settings).items() if k != "speed"},
                        speed=settings.speed, certified="the smoothed classifier g(x) = argmax_c P(f(D(x + delta)) = "
                        "c), not the purifier deployed without smoothing noise",
                        n0_and_n="ART's certify selects the class from sample_size = n0 draws and estimates p_A "
                                 "from n fresh draws")
    name = os.path.join(out_dir, f"certify_{settings.run_name}")
    write_results(name + ".json", rows, meta)
    plot_curves(curves, y, settings, name + ".png")
    if verbose:
        print(format_table(rows))
        print(f"wrote {name}.json and {name}.png")
    return {"rows": rows, "meta": meta}


def _note(settings: CertifySettings, sigma: float) -> str:
    if settings.denoiser == "one-shot":
        return f"one-shot denoising D(x + delta, {sigma:g}) of the prior (Carlini et al. 2023)"
    return (f"the full purifier of {settings.defense} as deployed ({settings.dataset} registry settings, one "
            f"purification per noise draw), fed x + N(0, {sigma:g}^2) unclipped: it was not designed for Gaussian "
            f"noise of sigma {sigma:g}")


def plot_curves(curves: dict, labels, settings: CertifySettings, path: str) -> str:
    """Certified accuracy against the ``l_2`` radius, one curve per sigma (Cohen et al.'s Figure 6 style)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([float(r.max()) for _, r in curves.values()] + [max(settings.radii)]) * 1.05
    grid = np.linspace(0.0, top, 400)
    for sigma, (pred, radius) in curves.items():
        ax.plot(grid, [certified_accuracy(labels, pred, radius, r) for r in grid], label=f"sigma = {sigma:g}")
    ax.set_xlabel("l_2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{settings.label}, {settings.dataset} {settings.split}[:{len(labels)}], n = {settings.n}, "
                 f"alpha = {settings.alpha:g}", fontsize=9)
    ax.legend()
    return save_figure(fig, path)
