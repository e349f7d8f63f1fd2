"""ScoreOpt on bundled MNIST or Fashion-MNIST: tuning on the validation split, held-out numbers on the test split, and
curves.

``python -m benchmarks scoreopt-study <tune|test|curves|memory> [--dataset mnist|fashion_mnist] [--prior PATH] [--n N]
[--out DIR]``

* ``tune``: every setting of the dataset's grid (:data:`GRID`) over variant, loss, noise range, steps and learning
  rate, scored on the validation split ("val") only: clean accuracy and accuracy under the dataset's
  preprocessor-blind PGD (:data:`benchmarks.studies.tuning.BLIND_PGD_BY_DATASET`: MNIST eps 0.3, Fashion-MNIST eps 8/255;
  cached under ``--cache-dir``). Per variant it selects by :data:`benchmarks.studies.tuning.SELECTION_RULE` and prints the
  selection with the registry line that records it. Writes ``<out>/<ds>val_tuning_O.json`` and
  ``<out>/<ds>val_tuning_N.json``; ``--grid`` replaces the dataset's grid.
* ``test``: the undefended classifier and the registry's settings of the dataset (chosen by ``tune``; a dataset
  without them is refused, naming the missing entry and the ``tune`` command), plus the paper's Table 10 CIFAR-10
  settings as they stand (and, for ScoreOpt-N, with Algorithm 2's pseudo-code target taken literally), on the
  held-out test split. Writes ``<out>/<ds>test_O.json`` and ``<out>/<ds>test_N.json``.
* ``curves``: accuracy versus noise level and versus steps around each variant's registry settings, on "val".
  Writes ``<out>/<ds>curves_<variant>.json`` and ``.png``.
* ``memory`` (MNIST): peak memory of one ``exact`` gradient (through the whole unrolled optimisation) for M = 5, 10,
  20 steps, with and without step checkpointing, each in a fresh process. Writes ``<out>/memory.json``.

``<ds>`` is empty for MNIST (the committed names in ``benchmarks/measured/scoreopt/``) and ``fashion_mnist_`` for
Fashion-MNIST (:func:`benchmarks.studies.tuning.file_prefix`; ``--data-dir``: the folder of its idx files).

Every robustness number here is against a transfer attack that ignores the purifier: it says how much of a
classifier-only perturbation ScoreOpt removes, not how robust ScoreOpt is to an attacker who knows it
(``python -m benchmarks attacks`` runs the adaptive attacks).
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np

from benchmarks.defenses import defense
from benchmarks.harness.arguments import json_value, non_negative_int, positive_int, prior_source
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.results import collect_meta, format_table, portable_path, read_results, write_results
from benchmarks.studies.tuning import (CLEAN_TOLERANCE, DATASET_NAMES, ROBUST_TARGETS, MissingSettingsError,
                                       add_dataset_arguments, blind_pgd_config, blind_row, defended_accuracy, eps_text,
                                       exact_gradient_memory, file_prefix, registry_line, registry_settings, same_prior,
                                       select, shipped_prior_path, study_inputs, study_meta, undefended_accuracy)
from purifiers import ScoreOptPyTorch, load_prior

OUT_DIR = os.path.join("results", "scoreopt")

# The registry's records of the two variants (their MNIST settings were chosen by `tune`; O, "scoreopt", is the more
# robust one on val and the deployed one).
VARIANT_DEFENSE = {"O": "scoreopt", "N": "scoreopt-n"}

# The grid `tune` scores, per dataset and variant a list of sub-grids (each the product of its axes). Noise ranges are
# EDM sigma on [-1, 1] (pixel sigma is half). MNIST's eps = 0.3 is about ten times CIFAR-10's 8/255, so its grid
# extends Table 10's noise ranges upwards; for O, Adam moves a pixel by at most about lr per step, so lr x M bounds how
# far x can travel from x_a (0.3 on [0, 1] is 0.6 on [-1, 1]). Fashion-MNIST's eps = 8/255 (0.031; 0.063 on [-1, 1])
# is about a tenth of MNIST's, so its noise levels are about a tenth too (0.05-0.3, below Table 10's 0.4-0.6 for
# CIFAR-10's same eps, as the smaller prior is the worse denoiser) and lr x M (0.1-0.5) still exceeds the
# perturbation's 0.063 with room for the denoising. About ten settings per variant, each a real cost on the CPU.
GRID = {
    "mnist": {
        "O": [{"loss": ("diff",), "noise_range": ((0.6, 0.8), (0.8, 1.0), (1.0, 1.2)),
               "steps_lr": ((10, 0.1), (10, 0.2), (20, 0.1))},
              {"loss": ("sr",), "noise_range": ((0.8, 1.0),), "steps_lr": ((10, 0.2),)}],
        "N": [{"loss": ("diff", "sr"), "noise_range": ((0.75, 0.75), (1.0, 1.0), (1.25, 1.25)),
               "steps_inner": ((1, 5), (1, 10), (2, 5)), "lr": (0.1,)}],
    },
    "fashion_mnist": {
        "O": [{"loss": ("diff",), "noise_range": ((0.05, 0.1), (0.1, 0.2), (0.2, 0.3)),
               "steps_lr": ((5, 0.02), (10, 0.02), (10, 0.05))},
              {"loss": ("sr",), "noise_range": ((0.1, 0.2),), "steps_lr": ((10, 0.02),)}],
        "N": [{"loss": ("diff", "sr"), "noise_range": ((0.1, 0.1), (0.2, 0.2), (0.3, 0.3)),
               "steps_inner": ((1, 5), (1, 10)), "lr": (0.1,)}],
    },
}
# Axes that set two hyper-parameters together.
PAIRED_AXES = {"steps_lr": ("steps", "lr"), "steps_inner": ("steps", "inner_steps")}
# The curves' noise levels, per dataset scaled to its eps as the grid is.
CURVE_NOISE = {
    "mnist": {"O": ((0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0), (1.0, 1.2)),
              "N": ((0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (1.0, 1.0), (1.25, 1.25))},
    "fashion_mnist": {"O": ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4)),
                      "N": ((0.05, 0.05), (0.1, 0.1), (0.2, 0.2), (0.3, 0.3), (0.5, 0.5))},
}
# Step axes of the curves: O's M; N's inner N and outer M.
CURVE_STEPS = {"O": {"steps": (1, 2, 5, 10, 20, 40)}, "N": {"inner_steps": (1, 2, 5, 10, 20), "steps": (1, 2, 3, 4)}}


def chosen_settings(variant: str, dataset: str = "mnist") -> dict:
    """The registry's settings of ScoreOpt-``variant`` chosen on ``dataset``'s validation split (a clear error naming
    the entry and the ``tune`` command where there are none)."""
    return registry_settings(VARIANT_DEFENSE[variant], dataset,
                             f"python -m benchmarks scoreopt-study tune --dataset {dataset} --variants {variant}")


def make_scoreopt(prior, variant: str, dataset: str = "mnist", **overrides) -> ScoreOptPyTorch:
    """ScoreOpt-``variant`` with the registry's settings of ``dataset``, ``overrides`` on top."""
    return defense(VARIANT_DEFENSE[variant], dataset, prior=prior, **{**chosen_settings(variant, dataset), **overrides})


# ---------------------------------------------------------------------------------------------------------------------
def settings_of(purifier: ScoreOptPyTorch) -> dict:
    return {name: getattr(purifier, name) for name in ScoreOptPyTorch.ALGORITHM_PARAMS if name != "checkpoint_steps"}


def _row(settings: dict, scores: dict, split: str, n: int, seed: int, dataset: str, **extra) -> dict:
    return blind_row(f"ScoreOpt-{settings['variant']}", scores, split=split, seed=seed, n=n, settings=settings,
                     attack=blind_pgd_config(dataset), **extra)


def _undefended_row(classifier, x, x_adv, y, split, seed, dataset: str) -> dict:
    return blind_row("none", undefended_accuracy(classifier, x, x_adv, y), split=split, seed=seed, n=len(y), runs=0,
                     attack=blind_pgd_config(dataset))


def _grid(subgrids: list[dict], variant: str):
    for axes in subgrids:
        for values in itertools.product(*axes.values()):
            settings = {"variant": variant}
            for axis, value in zip(axes, values):
                settings.update(zip(PAIRED_AXES[axis], value) if axis in PAIRED_AXES else {axis: value})
            yield settings


# ---------------------------------------------------------------------------------------------------------------------
def tuning_path(out_dir: str, variant: str, dataset: str = "mnist") -> str:
    return os.path.join(out_dir, f"{file_prefix('', dataset)}val_tuning_{variant}.json")


def run_tune(out_dir: str, prior_path: str | None = None, n: int = 200, seed: int = 0, variants=("O", "N"),
             verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None, cache_dir: str = "/tmp",
             grid: dict | None = None) -> dict:
    """Score the dataset's grid (or ``grid``: ``{variant: [sub-grid, ...]}``) on the validation split and select per
    variant; one file per variant, ``<out>/<ds>val_tuning_<variant>.json``, from which a rerun resumes."""
    prior_path = prior_path or shipped_prior_path(dataset)
    grids = {**GRID[dataset], **(grid or {})}
    return {variant: _tune_variant(out_dir, prior_path, n, seed, variant, verbose, dataset, data_dir, cache_dir,
                                   grids[variant]) for variant in variants}


def _tune_variant(out_dir: str, prior_path: str, n: int, seed: int, variant: str, verbose: bool, dataset: str,
                  data_dir: str | None, cache_dir: str, subgrids: list[dict]) -> dict:
    from tqdm import tqdm

    classifier, prior, x, y, x_adv = study_inputs(dataset, "val", n, prior_path, data_dir, cache_dir)
    path = tuning_path(out_dir, variant, dataset)
    undefended = _undefended_row(classifier, x, x_adv, y, "val", seed, dataset)
    old = read_results(path) if os.path.exists(path) else None
    rows = [r for r in old["rows"] if r["defense"] != "none" and r["n"] == len(y)] \
        if old and same_prior(old["meta"], prior_path) else []
    done = [_normalised(r["settings"]) for r in rows]
    meta = study_meta(dataset, "val", len(y), prior=prior_path, grid=subgrids, clean_tolerance=CLEAN_TOLERANCE)
    for settings in tqdm(list(_grid(subgrids, variant)), desc=f"ScoreOpt-{variant} grid", disable=not verbose):
        purifier = ScoreOptPyTorch(prior, seed=seed, device_type="cpu", **settings)
        if _normalised(settings_of(purifier)) in done:
            continue
        rows.append(_row(settings_of(purifier), defended_accuracy(purifier, classifier, x, x_adv, y), "val", len(y),
                         seed, dataset, prior=portable_path(prior_path)))
        write_results(path, [undefended] + rows, meta)
    row = select([r for r in rows if r["defense"] == f"ScoreOpt-{variant}"], undefended["clean_acc"])
    meta["selected"] = row and row["settings"]
    write_results(path, [undefended] + rows, meta)
    if verbose:
        print(format_table([undefended] + rows))
        print(f"selected ScoreOpt-{variant}: " + ("none meets the clean-accuracy rule" if row is None else
              f"{row['settings']} (val clean {row['clean_acc']:.3f}, blind PGD {row['robust_acc']:.3f})"))
        if row is not None:
            print(registry_line(VARIANT_DEFENSE[variant], dataset, row["settings"]))
        print(f"wrote {path}")
    return {"rows": [undefended] + rows, "meta": meta}


def run_test(out_dir: str, prior_path: str | None = None, n: int = 1000, seed: int = 0, variants=("O", "N"),
             table10: bool = True, verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
             cache_dir: str = "/tmp") -> dict:
    """The registry's settings of ``dataset`` (and the paper's Table 10 settings) on the held-out test split, one file
    per variant, ``<out>/<ds>test_<variant>.json``; refused before any work where the registry has no settings of
    ``dataset`` for one of ``variants``."""
    prior_path = prior_path or shipped_prior_path(dataset)
    for variant in variants:
        chosen_settings(variant, dataset)
    return {variant: _test_variant(out_dir, prior_path, n, seed, variant, table10, verbose, dataset, data_dir,
                                   cache_dir) for variant in variants}


def _test_variant(out_dir: str, prior_path: str, n: int, seed: int, variant: str, table10: bool, verbose: bool,
                  dataset: str, data_dir: str | None, cache_dir: str) -> dict:
    tuning = tuning_path(out_dir, variant, dataset)
    selected = read_results(tuning)["meta"].get("selected") if os.path.exists(tuning) else None
    shipped = settings_of(make_scoreopt(load_prior("gaussian"), variant, dataset))
    if selected is not None and _normalised(selected) != _normalised(shipped):
        print(f"WARNING: the registry's {dataset} settings of ScoreOpt-{variant} = {shipped} differ from the "
              f"validation selection {selected} in {tuning}.")
    classifier, prior, x, y, x_adv = study_inputs(dataset, "test", n, prior_path, data_dir, cache_dir)
    rows = [_undefended_row(classifier, x, x_adv, y, "test", seed, dataset)]
    candidates = [("chosen on val", make_scoreopt(prior, variant, dataset, seed=seed, device_type="cpu"))]
    if table10:
        candidates.append(("paper Table 10 (CIFAR-10 BPDA+EOT row) as is",
                           ScoreOptPyTorch(prior, variant=variant, seed=seed, device_type="cpu")))
    if table10 and variant == "N":
        candidates.append(("paper Table 10 with Algorithm 2's pseudo-code target taken literally (n_target=outer)",
                           ScoreOptPyTorch(prior, variant=variant, n_target="outer", seed=seed, device_type="cpu")))
    meta = study_meta(dataset, "test", len(y), prior=prior_path, val_selection=selected)
    path = os.path.join(out_dir, f"{file_prefix('', dataset)}test_{variant}.json")
    for note, purifier in candidates:
        scores = defended_accuracy(purifier, classifier, x, x_adv, y)
        rows.append(_row(settings_of(purifier), scores, "test", len(y), seed, dataset, prior=portable_path(prior_path),
                         note=note))
        write_results(path, rows, meta)
        if verbose:
            print(format_table(rows[-1:]))
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def _normalised(settings: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def run_curves(out_dir: str, prior_path: str | None = None, n: int = 200, seed: int = 0, variants=("O", "N"),
               verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
               cache_dir: str = "/tmp") -> dict:
    """Accuracy versus noise level (:data:`CURVE_NOISE` of ``dataset``) and versus steps (O: M; N: inner N and outer
    M), others at the registry's settings of ``dataset``, on "val"; one file per variant,
    ``<out>/<ds>curves_<variant>.json`` and ``.png``. Resumable: points already in the file (same prior, n and seed)
    are kept, not recomputed."""
    prior_path = prior_path or shipped_prior_path(dataset)
    around = {variant: chosen_settings(variant, dataset) for variant in variants}
    classifier, prior, x, y, x_adv = study_inputs(dataset, "val", n, prior_path, data_dir, cache_dir)
    results = {}
    for variant in variants:
        rows = [_undefended_row(classifier, x, x_adv, y, "val", seed, dataset)]
        sweeps = [("noise_range", {"noise_range": r}) for r in CURVE_NOISE[dataset][variant]]
        sweeps += [(axis, {axis: s}) for axis, values in CURVE_STEPS[variant].items() for s in values]
        meta = study_meta(dataset, "val", len(y), prior=prior_path, around=around[variant])
        name = f"{file_prefix('', dataset)}curves_{variant}"
        path = os.path.join(out_dir, f"{name}.json")
        finished = []
        if os.path.exists(path):
            old = read_results(path)
            if same_prior(old["meta"], prior_path) and old["meta"].get("split") == meta["split"]:
                finished = [r for r in old["rows"] if r["defense"] != "none" and r.get("seed") == seed]
        for axis, change in sweeps:
            purifier = make_scoreopt(prior, variant, dataset, seed=seed, device_type="cpu", **change)
            done = [r for r in finished if r.get("curve") == axis
                    and _normalised(r["settings"]) == _normalised(settings_of(purifier))]
            if done:
                rows.append(done[0])
                continue
            rows.append(_row(settings_of(purifier), defended_accuracy(purifier, classifier, x, x_adv, y), "val",
                             len(y), seed, dataset, prior=portable_path(prior_path), curve=axis))
            write_results(path, rows, meta)
            if verbose:
                print(format_table(rows[-1:]))
        plot_curves(rows, os.path.join(out_dir, f"{name}.png"), dataset)
        if verbose:
            print(f"wrote {path} and {name}.png")
        results[variant] = {"rows": rows, "meta": meta}
    return results


def plot_curves(rows: list[dict], path: str, dataset: str = "mnist") -> None:
    from benchmarks.harness.plotting import pyplot, save_figure

    plt = pyplot()

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
            ax.plot(xs, [100 * r["robust_acc"] for r in points], "s-",
                    label=f"blind PGD (eps {eps_text(blind_pgd_config(dataset))})")
            ax.axhline(100 * undefended["clean_acc"], color="gray", ls=":", label="undefended clean")
            target = 100 * ROBUST_TARGETS[dataset]
            ax.axhline(target, color="red", ls="--", lw=0.8, label=f"{target:g}% robust target")
            ax.set_xlabel({"noise_range": "noise level (EDM sigma on [-1, 1], range centre)",
                           "steps": "outer steps M", "inner_steps": "inner steps N"}[axis])
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"ScoreOpt-{variant}, val n={points[0]['n'] if points else 0}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def run_memory(out_dir: str, prior_path: str | None = None, n: int = 8, seed: int = 0, verbose: bool = True) -> dict:
    """Peak memory of ScoreOpt-O's exact gradient versus the number of steps, with and without checkpointing
    (:func:`benchmarks.studies.tuning.exact_gradient_memory`)."""
    prior_path = prior_path or shipped_prior_path("mnist")
    grid = [dict(steps=steps, checkpoint_steps=c) for steps in (5, 10, 20) for c in (True, False)]
    rows = exact_gradient_memory("scoreopt", grid, n, prior_path, verbose)
    meta = collect_meta(DATASET_NAMES["mnist"], f"val[:{n}]", prior=prior_path,
                        settings={k: v for k, v in chosen_settings("O").items() if k != "steps"})
    path = write_results(os.path.join(out_dir, "memory.json"), rows, meta)
    if verbose:
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scoreopt-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=("tune", "test", "curves", "memory"))
    add_dataset_arguments(parser, mnist_only=("memory",))
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior .safetensors (default: the one shipped for --dataset)")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="images (default: tune 200, test 1000, curves 200, memory 8)")
    parser.add_argument("--variants", nargs="+", default=["O", "N"], choices=["O", "N"])
    parser.add_argument("--grid", type=json_value, default=None,
                        help='tune: JSON {variant: [sub-grid, ...]} replacing the dataset\'s grid (GRID) of those '
                             'variants, e.g. \'{"O": [{"loss": ["diff"], "noise_range": [[0.1, 0.2]], '
                             '"steps_lr": [[5, 0.02]]}]}\'')
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--no-table10", action="store_true", help="test: skip the paper's Table 10 settings")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    set_up_cpu_process(1)
    if args.job == "memory" and args.dataset != "mnist":
        parser.error("memory measures the MNIST prior only; drop --dataset.")
    common = dict(prior_path=args.prior, seed=args.seed, variants=tuple(args.variants), verbose=not args.quiet,
                  dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    try:
        if args.job == "tune":
            run_tune(args.out, n=args.n or 200, grid=args.grid, **common)
        elif args.job == "test":
            run_test(args.out, n=args.n or 1000, table10=not args.no_table10, **common)
        elif args.job == "curves":
            run_curves(args.out, n=args.n or 200, **common)
        else:
            run_memory(args.out, n=args.n or 8, prior_path=args.prior, seed=args.seed, verbose=not args.quiet)
    except MissingSettingsError as err:
        parser.error(str(err))
