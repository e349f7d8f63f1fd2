"""The defense registry: every fact about a defense in one record, and one way to get a configured purifier.

    from benchmarks.defenses import defense
    purifier = defense("adp", dataset="mnist", gradient="exact")     # ADPPyTorch with the MNIST settings
    purifier = defense("coup", dataset="cifar10", prior=my_prior, classifier=my_net)   # the paper's settings

A record holds the purifier's ART wrapper, the paper (title, authors, venue, link: the RobustBench entry's fields),
the paper's own settings (``paper_settings``: the CIFAR-10 settings of the paper, which are also the wrapper class's
defaults), our settings per dataset chosen on that dataset's validation split (``settings``; a dataset without an
entry uses the paper's), the size of the deployed ensemble, the papers' published numbers we compare with, and the
relative cost of one quickstart evaluation (used only to order work between worker processes).

Every command, test and the README build defenses through :func:`defense` (or :func:`deployed_model`); a user's own
defense is a factory ``module:function`` called ``function(prior, classifier, **overrides)``
(:func:`build_purifier`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from benchmarks.factories import import_spec
from purifiers.adp_pytorch import ADPPyTorch
from purifiers.art_base import PurifiedClassifier, PurifierPyTorch
from purifiers.scoreopt_pytorch import ScoreOptPyTorch
from purifiers.vpsde_pytorch import COUPPyTorch, DiffPurePyTorch

NO_DEFENSE = "none"  # the bare classifier


@dataclass(frozen=True)
class Paper:
    name: str
    authors: str
    venue: str
    link: str


@dataclass(frozen=True)
class PublishedNumber:
    """A number a paper prints (clean %, robust %) under one of the attacks this package runs."""

    dataset: str
    attack: str   # "BlindPGD", "BPDA+EOT", "PGD+EOT" or "AutoAttack" (benchmarks.harness.protocols.ATTACKS)
    clean: float
    robust: float
    source: str


@dataclass(frozen=True)
class DefenseRecord:
    name: str
    wrapper: Callable[..., PurifierPyTorch]  # the ART wrapper class (or a function with its signature)
    needs_classifier: bool             # COUP's guidance needs the classifier
    paper: Paper
    paper_settings: dict               # the paper's CIFAR-10 settings (= the wrapper's defaults)
    settings: dict = field(default_factory=dict)   # dataset -> settings chosen on that dataset's validation split
    runs: int = 1                      # purifications per prediction of the deployed defense
    published: tuple = ()              # PublishedNumber, ...
    quickstart_seconds: float = 1.0    # relative cost in the quickstart (one CPU thread), for scheduling only
    wrapper_defaults: dict = field(default_factory=dict)  # seed, batch size of the registry's purifiers
    # The network of the paper's CIFAR-10 prior: (checkpoint format, config) of purifiers.priors.checkpoints.untrained_prior.
    paper_network: tuple[str, str] | None = None

    def settings_for(self, dataset: str) -> dict:
        """Our validation-chosen settings for ``dataset``, else the paper's."""
        return dict(self.settings.get(dataset, self.paper_settings))


REGISTRY: dict[str, DefenseRecord] = {
    "adp": DefenseRecord(
        name="adp", wrapper=ADPPyTorch, needs_classifier=False,
        paper=Paper("Adversarial Purification with Score-based Generative Models (ADP)",
                    "Jongmin Yoon, Sung Ju Hwang, Juho Lee", "ICML 2021", "https://arxiv.org/abs/2106.06041"),
        # §5: sigma 0.25, lambda 0.05, delta 1e-5, tau 1e-3, T = 10; the S = 10 ensemble of eq. (13).
        paper_settings=dict(sigma=0.25, lam=0.05, steps=10, step_rule="paper"),
        # `python -m benchmarks adp-study sweep --n 200 --runs 1` on MNIST val[:200] (benchmarks/measured/adp/); the
        # same with `--dataset fashion_mnist` on Fashion-MNIST val[:200], sigma 0.03-0.15 x lam 0.05-0.4 x injected /
        # tracked / running conditioning (adp_fashion_mnist_val_sweep.json): the most robust setting within 1.5 clean
        # points of the classifier. On Fashion-MNIST the S = 1 sweep's candidates near the clean bound were measured
        # again with the deployed S = 10 ensemble (`--runs 10`, the same file), which chose sigma 0.1 over the S = 1
        # choice (sigma 0.03, tracked, lam 0.2: 92.5% clean at S = 10, outside the bound).
        settings={"mnist": dict(sigma=0.15, conditioning="injected", lam=0.4, steps=10, step_rule="paper"),
                  "fashion_mnist": dict(sigma=0.1, conditioning="injected", lam=0.1, steps=10, step_rule="paper")},
        runs=10,
        published=(PublishedNumber("mnist", "BlindPGD", 98.07, 96.41, "ADP supplement Table 9 (MNIST, eps 0.3, Clf pgd)"),
                   PublishedNumber("fashion_mnist", "BlindPGD", 93.19, 86.62,
                                   "ADP supplement Table 9 (FashionMNIST, eps 8/255, Clf pgd)"),
                   PublishedNumber("cifar10", "BlindPGD", 86.14, 80.24, "ADP Table 2 (WRN-28-10)"),
                   PublishedNumber("cifar10", "BPDA+EOT", 86.14, 70.01, "ADP Table 3 (BPDA 40+EOT)")),
        quickstart_seconds=42, wrapper_defaults=dict(seed=0, batch_size=250),
        paper_network=("ncsnv2", "cifar10")),  # ADP released none; Croce et al. evaluate it on NCSNv2's
    "scoreopt": DefenseRecord(
        name="scoreopt", wrapper=ScoreOptPyTorch, needs_classifier=False,
        paper=Paper("Enhancing Adversarial Robustness via Score-Based Optimization (ScoreOpt)",
                    "Boya Zhang, Weijian Luo, Zhihua Zhang", "NeurIPS 2023", "https://arxiv.org/abs/2307.04333"),
        # Table 10, CIFAR-10 BPDA+EOT row of ScoreOpt-O (noise range as EDM sigma on [-1, 1]).
        paper_settings=dict(variant="O", loss="diff", steps=5, lr=0.1, noise_range=(0.4, 0.6)),
        # `python -m benchmarks scoreopt-study tune` on MNIST val[:200] with the 15,685-step prior (EDM sigma 0.6-0.8
        # with the previous 3,660-step one; benchmarks/measured/scoreopt/). The same with `--dataset fashion_mnist` on
        # Fashion-MNIST val[:200] (its eps 8/255 needs smaller noise).
        settings={"mnist": dict(variant="O", loss="diff", steps=20, lr=0.1, noise_range=(1.0, 1.2)),
                  "fashion_mnist": dict(variant="O", loss="diff", steps=5, lr=0.02, noise_range=(0.1, 0.2))},
        published=(PublishedNumber("cifar10", "BPDA+EOT", 90.78, 82.85, "ScoreOpt Table 1 (ScoreOpt-O)"),),
        quickstart_seconds=53, wrapper_defaults=dict(seed=0),
        paper_network=("edm-state-dict", "edm-cifar10-32x32-uncond-vp")),
    "scoreopt-n": DefenseRecord(
        name="scoreopt-n", wrapper=ScoreOptPyTorch, needs_classifier=False,
        paper=Paper("Enhancing Adversarial Robustness via Score-Based Optimization (ScoreOpt-N)",
                    "Boya Zhang, Weijian Luo, Zhihua Zhang", "NeurIPS 2023", "https://arxiv.org/abs/2307.04333"),
        paper_settings=dict(variant="N", loss="diff", steps=1, inner_steps=5, lr=0.1, noise_range=(0.5, 0.5)),
        settings={"mnist": dict(variant="N", loss="sr", steps=1, inner_steps=10, lr=0.1, noise_range=(0.75, 0.75)),
                  "fashion_mnist": dict(variant="N", loss="sr", steps=1, inner_steps=10, lr=0.1,
                                        noise_range=(0.2, 0.2))},
        quickstart_seconds=53, wrapper_defaults=dict(seed=0),
        paper_network=("edm-state-dict", "edm-cifar10-32x32-uncond-vp")),
    "coup": DefenseRecord(
        name="coup", wrapper=COUPPyTorch, needs_classifier=True,
        paper=Paper("Classifier Guidance Enhances Diffusion-Based Adversarial Purification by Preserving Predictive "
                    "Information (COUP)", "Mingkun Zhang, Jianing Li, Wei Chen, Jiafeng Guo, Xueqi Cheng",
                    "ECAI 2024", "https://arxiv.org/abs/2408.05900"),
        # §5.1 / §5.4: t* = 0.1 (l_inf), lambda = 1, 100 Euler steps.
        paper_settings=dict(t_star=0.1, guidance_scale=1.0, dt=1e-3),
        # `python -m benchmarks vpsde-study sweep --n 64` on MNIST val[:64] with the 15,685-step prior (t* = 0.2 with
        # the previous 3,660-step one; benchmarks/measured/vpsde/). The same with `--dataset fashion_mnist --n 100` on
        # Fashion-MNIST val[:100].
        settings={"mnist": dict(t_star=0.1, guidance_scale=1.0, dt=1e-3),
                  "fashion_mnist": dict(t_star=0.05, guidance_scale=2.0, dt=1e-3)},
        published=(PublishedNumber("cifar10", "AutoAttack", 90.04, 73.05, "COUP Table 1"),
                   PublishedNumber("cifar10", "BPDA+EOT", 90.04, 83.20, "COUP Table 3")),
        quickstart_seconds=384, wrapper_defaults=dict(seed=0, batch_size=100),
        paper_network=("score_sde", "vp/cifar10_ddpmpp_deep_continuous")),
    "diffpure": DefenseRecord(
        name="diffpure", wrapper=DiffPurePyTorch, needs_classifier=False,
        paper=Paper("Diffusion Models for Adversarial Purification (DiffPure)",
                    "Weili Nie, Brandon Guo, Yujia Huang, Chaowei Xiao, Arash Vahdat, Anima Anandkumar", "ICML 2022",
                    "https://arxiv.org/abs/2205.07460"),
        # DiffPure §5: t* = 0.1 on CIFAR-10 l_inf, 100 steps; on ImageNet t* = 0.15 with 224x224 inputs purified at
        # the 256x256 of guided-diffusion's prior (its code's resize).
        paper_settings=dict(t_star=0.1, dt=1e-3),
        settings={"mnist": dict(t_star=0.2, dt=1e-3), "fashion_mnist": dict(t_star=0.05, dt=1e-3),
                  "imagenet": dict(t_star=0.15, dt=1e-3, resize_to=256)},
        published=(PublishedNumber("cifar10", "AutoAttack", 89.02, 70.64, "COUP Table 1 (DiffPure)"),
                   PublishedNumber("cifar10", "BPDA+EOT", 89.02, 81.40, "COUP Table 3 (DiffPure)")),
        quickstart_seconds=259, wrapper_defaults=dict(seed=0, batch_size=100),
        paper_network=("score_sde", "vp/cifar10_ddpmpp_deep_continuous")),
}
#: The four methods of the project, in the order tables list them.
METHODS = ("adp", "scoreopt", "coup", "diffpure")


def record(name: str) -> DefenseRecord:
    """The registry's record of ``name``; a clear error naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}: choose one of {sorted(REGISTRY)}, {NO_DEFENSE!r} (the bare "
                         "classifier), or give a factory as 'module:function'.")
    return REGISTRY[name]


def defense(name: str, dataset: str = "mnist", *, prior=None, classifier: nn.Module | None = None,
            gradient: str | None = None, **overrides) -> PurifierPyTorch:
    """A configured purifier: the registry's wrapper of ``name`` with the settings for ``dataset`` (ours, chosen on
    its validation split, where we have them; else the paper's), the registry's seed and batch size, then
    ``gradient`` and ``overrides``.

    :param prior: a :class:`purifiers.Prior` or anything :func:`purifiers.load_prior` takes; ``None`` loads the prior
        shipped for ``dataset`` (MNIST).
    :param classifier: the classifier ([0, 1] images -> logits); COUP's guidance needs it; ``None`` loads the shipped
        one for ``dataset``.
    """
    entry = record(name)
    if prior is None or (classifier is None and entry.needs_classifier):
        from benchmarks.models import load_reference_models

        shipped_classifier, shipped_prior = load_reference_models(dataset)
        prior = shipped_prior if prior is None else prior
        classifier = shipped_classifier if classifier is None else classifier
    if not hasattr(prior, "denoise"):
        from purifiers.priors.loading import load_prior

        prior = load_prior(prior)
    settings = {**entry.wrapper_defaults, **entry.settings_for(dataset), **overrides}
    if gradient is not None:
        settings["gradient"] = gradient
    if entry.needs_classifier:
        return entry.wrapper(prior, classifier, **settings)
    return entry.wrapper(prior, **settings)


def build_purifier(spec: str, prior, classifier: nn.Module | None, dataset: str = "mnist",
                   **overrides) -> PurifierPyTorch:
    """``spec`` is a registry name (:func:`defense`) or a user's factory ``"module:function"``, called
    ``function(prior, classifier, **overrides)``, which must return a :class:`purifiers.PurifierPyTorch`."""
    if spec in REGISTRY or ":" not in spec:
        return defense(spec, dataset, prior=prior, classifier=classifier, **overrides)
    purifier = import_spec(spec)(prior, classifier, **overrides)
    if not isinstance(purifier, PurifierPyTorch):
        raise ValueError(f"the factory {spec!r} returned a {type(purifier).__name__}, not a PurifierPyTorch.")
    return purifier


def deployed_runs(name: str) -> int:
    """Purifications per prediction of the deployed defense (ADP's S = 10 ensemble; 1 for others and user factories)."""
    return REGISTRY[name].runs if name in REGISTRY else 1


def deployed_model(purifier: PurifierPyTorch | None, classifier: nn.Module, runs: int = 1,
                   ensemble: str = "softmax") -> nn.Module:
    """The model an attack or AutoAttack sees: the purifier in front of the classifier (``runs`` purifications
    combined by ``ensemble``), or the bare classifier when ``purifier`` is ``None``; in eval mode with frozen
    parameters (input gradients still flow; AutoAttack's ``check_dynamic`` runs outside ``no_grad``)."""
    model = classifier if purifier is None else PurifiedClassifier(purifier, classifier, runs=runs, ensemble=ensemble)
    return model.eval().requires_grad_(False)


def published(dataset: str) -> list[tuple[str, PublishedNumber]]:
    """``(defense, number)`` for every paper number on ``dataset`` that ``python -m benchmarks reproduce`` compares
    with."""
    return [(entry.name, p) for entry in REGISTRY.values() for p in entry.published if p.dataset == dataset]


def paper_of(name: str) -> Paper | None:
    return REGISTRY[name].paper if name in REGISTRY else None
