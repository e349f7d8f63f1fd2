"""``python -m benchmarks plots <kind>``: figures people would rather look at than read (matplotlib, Agg backend).

* ``curves FILE.json ...``: robust accuracy against eps, one panel per defense, one line per attack and scoring, from
  results files of this package (any command's rows); clean accuracy is drawn at eps 0.
* ``grid``: clean, attacked and purified images, one row per purifier, on the first MNIST test images: the attack is
  preprocessor-blind PGD on the classifier (the same adversarial images for every purifier), each purifier then
  purifies them once; titles give the classifier's prediction (green: correct, red: wrong).
* ``scorenorm``: ADP's Fig. 3 (and App. F, Fig. 9a): histograms of the score norm ``|s(x)|_2`` (ADP's unconditional
  score, :func:`purifiers.adp.score_norm`, at ADP's detection level) of natural images, adversarial images
  (classifier PGD), and both after one deterministic ADP step (Algorithm 1's update, no noise injection).

Figures go to ``benchmarks/figures/`` by default (PNG), which the README shows.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import numpy as np
import torch

from benchmarks.harness.arguments import (defense_name, existing_path, non_negative_int, positive_int, prior_source,
                                          unit_interval)
from benchmarks.harness.plotting import FIGURES_DIR, pyplot, save_figure

# ---------------------------------------------------------------------------------------------------------------------
# Robust accuracy against eps

def plot_robustness_curves(rows: list[dict], path: str, title: str | None = None) -> str:
    """One panel per defense; a line per (attack, scoring) through its (eps, robust accuracy) points; clean accuracy
    (the mean over the defense's rows) at eps 0. Rows without eps or robust accuracy are skipped."""
    plt = pyplot()
    by_defense: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    clean: dict[str, list] = defaultdict(list)
    for row in rows:
        if row.get("clean_acc") is not None:
            clean[row["defense"]].append(row["clean_acc"])
        if row.get("eps") is None or row.get("robust_acc") is None:
            continue
        by_defense[row["defense"]][(row["attack"], row.get("scoring"))].append((row["eps"], row["robust_acc"]))
    if not by_defense:
        raise ValueError("no rows with both eps and robust_acc to plot.")
    defenses = sorted(by_defense)
    fig, axes = plt.subplots(1, len(defenses), figsize=(4.2 * len(defenses), 3.6), squeeze=False, sharey=True)
    for ax, defense in zip(axes[0], defenses):
        for (attack, scoring), points in sorted(by_defense[defense].items(), key=lambda kv: str(kv[0])):
            points = sorted(points)
            eps = [0.0] + [p[0] for p in points] if clean[defense] else [p[0] for p in points]
            acc = ([float(np.mean(clean[defense]))] if clean[defense] else []) + [p[1] for p in points]
            label = attack if not scoring else f"{attack} ({scoring})"
            ax.plot(eps, [100 * a for a in acc], marker="o", label=label)
        ax.set_title(defense)
        ax.set_xlabel("eps")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("robust accuracy (%)")
    if any(row.get("scaled_down") for row in rows):
        title = (title or "") + " [scaled-down settings: not a robustness claim]"
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Image grid

def plot_image_grid(x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, purified: dict[str, torch.Tensor],
                    classifier: torch.nn.Module, path: str, title: str | None = None) -> str:
    """Rows: clean, attacked, then each purifier's output on the attacked images; columns: images."""
    plt = pyplot()
    panels = {"clean": x, "attacked": x_adv, **{f"{name}(attacked)": out for name, out in purified.items()}}
    n = x.shape[0]
    fig, axes = plt.subplots(len(panels), n, figsize=(1.3 * n + 1.2, 1.45 * len(panels)), squeeze=False)
    with torch.no_grad():
        predictions = {name: classifier(images).argmax(1) for name, images in panels.items()}
    for r, (name, images) in enumerate(panels.items()):
        for c in range(n):
            ax = axes[r][c]
            image = images[c].detach().cpu().permute(1, 2, 0).numpy().clip(0, 1)
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            pred = int(predictions[name][c])
            ax.set_title(str(pred), fontsize=8, color="green" if pred == int(y[c]) else "red")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# ADP's score-norm histograms (Fig. 3)

def plot_score_norms(norms: dict[str, np.ndarray], path: str, title: str | None = None) -> str:
    """Density histograms of score norms, one per named set, on shared bins (as ADP's Fig. 3)."""
    plt = pyplot()
    values = np.concatenate([np.asarray(v) for v in norms.values()])
    bins = np.linspace(values.min(), values.max(), 40)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, v in norms.items():
        ax.hist(np.asarray(v), bins=bins, density=True, alpha=0.5, label=name)
    ax.set_xlabel("score norm |s(x)|_2")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def score_norm_sets(adp, classifier, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40,
                    seed: int = 0) -> tuple[dict[str, np.ndarray], float]:
    """``({natural, adversarial, pur_n, pur_a}: score norms, level)`` for an :class:`purifiers.ADP` module:
    adversarial = classifier PGD (ADP Fig. 9a); pur = after one deterministic step of Algorithm 1 with ``adp``'s
    settings; norms at the level ADP's detection gate uses (``adp.detection_sigma``)."""
    import inspect

    from attacks_adaptive import BlindPGD
    from purifiers.adp import ADP, score_norm

    x_adv = BlindPGD(classifier, eps=eps, steps=steps, seed=seed).perturb(x, y).x_adv
    settings = {k: getattr(adp, k) for k in inspect.signature(ADP).parameters if k != "steps"}
    one_step = ADP(**settings, steps=1)
    with torch.no_grad():
        sigma = torch.full((x.shape[0],), float(adp.sigma))
        pur_n, pur_a = one_step.update(x, sigma).clamp(0, 1), one_step.update(x_adv, sigma).clamp(0, 1)
    sets = {"natural": x, "adversarial": x_adv, "pur_n": pur_n, "pur_a": pur_a}
    level = adp.detection_sigma
    return {name: score_norm(adp.prior, images, level).numpy() for name, images in sets.items()}, level


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    curves = sub.add_parser("curves", help="robust accuracy against eps from results files")
    curves.add_argument("files", nargs="+", type=existing_path)
    curves.add_argument("--out", default=os.path.join(FIGURES_DIR, "robust_accuracy_vs_eps.png"))
    curves.add_argument("--title", default=None)
    grid = sub.add_parser("grid", help="clean / attacked / purified images per purifier")
    grid.add_argument("--defenses", nargs="+", default=["adp", "scoreopt", "coup", "diffpure"],
                      type=defense_name(bare=False))
    grid.add_argument("--n", type=positive_int, default=6)
    grid.add_argument("--eps", type=unit_interval, default=0.3, help="l_inf radius")
    grid.add_argument("--steps", type=positive_int, default=40, help="PGD iterations")
    grid.add_argument("--out", default=os.path.join(FIGURES_DIR, "purification_grid.png"))
    norms = sub.add_parser("scorenorm", help="ADP Fig. 3: score-norm histograms, natural vs adversarial")
    norms.add_argument("--n", type=positive_int, default=200)
    norms.add_argument("--eps", type=unit_interval, default=0.3, help="l_inf radius")
    norms.add_argument("--steps", type=positive_int, default=40, help="PGD iterations")
    norms.add_argument("--out", default=os.path.join(FIGURES_DIR, "adp_score_norms.png"))
    for p in (grid, norms):
        p.add_argument("--prior", type=prior_source, default=None, help="prior file (default: the shipped prior)")
        p.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args(argv[1:])
    torch.manual_seed(getattr(args, "seed", 0))

    if args.kind == "curves":
        from benchmarks.results import read_results

        rows = [row for path in args.files for row in read_results(path)["rows"]]
        print(f"wrote {plot_robustness_curves(rows, args.out, args.title)}")
        return

    from attacks_adaptive import BlindPGD
    from benchmarks.data import load_mnist
    from benchmarks.defenses import build_purifier
    from benchmarks.models import load_reference_models
    from purifiers.priors.loading import load_prior

    classifier, shipped_prior = load_reference_models("mnist")
    classifier.requires_grad_(False)
    prior = load_prior(args.prior) if args.prior else shipped_prior
    x, y = (torch.from_numpy(a) for a in load_mnist("test", n=args.n))
    if args.kind == "grid":
        x_adv = BlindPGD(classifier, eps=args.eps, steps=args.steps, seed=args.seed).perturb(x, y).x_adv
        purified = {}
        for name in args.defenses:
            purifier = build_purifier(name, prior, classifier)
            purifier.set_params(seed=args.seed)
            purified[name] = purifier.purify(x_adv, with_gradient=False)
        title = (f"MNIST test[:{args.n}], classifier PGD eps={args.eps} ({args.steps} it.), one purification each; "
                 "title = prediction")
        print(f"wrote {plot_image_grid(x, y, x_adv, purified, classifier, args.out, title)}")
    else:
        adp = build_purifier("adp", prior, classifier).algorithm
        norms, level = score_norm_sets(adp, classifier, x, y, args.eps, args.steps, args.seed)
        title = f"MNIST test[:{args.n}], classifier PGD eps={args.eps}, |s(x)| at sigma={level}"
        print(f"wrote {plot_score_norms(norms, args.out, title)}")
