"""COUP, COUP without guidance and DiffPure on bundled MNIST or Fashion-MNIST: validation tuning of t* and lambda,
then the held-out evaluation, under the dataset's preprocessor-blind PGD
(:data:`benchmarks.studies.tuning.BLIND_PGD_BY_DATASET`: l_inf, MNIST eps 0.3, 40 steps of 0.01; Fashion-MNIST eps 8/255, 40
steps of 2/255; no random start; the attack sees only the undefended classifier, the defense then purifies its
adversarial examples).

    python -m benchmarks vpsde-study sweep --n 100    # "val" split only: accuracy-vs-t* and -lambda curves
    python -m benchmarks vpsde-study test --n 1000    # "test" split, the registry's MNIST settings
    python -m benchmarks vpsde-study sweep --dataset fashion_mnist   # the same on Fashion-MNIST (its models and grid)
    python -m benchmarks vpsde-study gradients        # exact vs adjoint vs surrogate vs BPDA gradients, timed (MNIST)

``sweep`` writes ``<out>/vpsde_<ds>val_sweep.json`` (results rows; resumable: finished settings are skipped) and
``<out>/vpsde_<ds>val_curves.png`` (the COUP paper's Fig. 4 analogue) and prints the selection with the lines that
record it; ``test`` writes ``<out>/vpsde_<ds>test.json``. ``<ds>`` is empty for MNIST (the committed names in
``benchmarks/measured/vpsde/``) and ``fashion_mnist_`` for Fashion-MNIST (:func:`benchmarks.studies.tuning.file_prefix`;
``--data-dir``: the folder of its idx files). Selection rule (validation only): :data:`SELECTION_RULE`.
Every score is one purification per image (as both papers deploy them), with the purifier's seed fixed.

The settings chosen here live in the registry (``benchmarks.defenses.defense("coup", dataset=...)``; COUP without
guidance, this study's ablation, in :data:`NOGUIDE_T_STAR`); ``test`` refuses a dataset without them, naming the
missing entry and the ``sweep`` command that chooses it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from benchmarks.data import load_mnist
from benchmarks.defenses import defense
from benchmarks.harness.arguments import (non_negative_int, non_negative_number, positive_int, positive_number,
                                          prior_source, unit_interval)
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.results import collect_meta, format_table, read_results, write_json, write_results
from benchmarks.studies.tuning import (CLEAN_TOLERANCE, DATASET_NAMES, DATASET_TITLES, ROBUST_TARGETS, SELECTION_RULE,
                                       MissingSettingsError, add_dataset_arguments, blind_pgd_config, blind_row,
                                       chosen_settings, defended_accuracy, eps_text, exact_gradient_memory, file_prefix,
                                       load_models, registry_line, registry_settings, same_prior, select,
                                       shipped_prior_path, study_inputs, study_meta, undefended_accuracy)

METHODS = ("coup", "coup-noguide", "diffpure")
# The sweep's grid per dataset. MNIST's t* reach 0.3 for its eps 0.3; Fashion-MNIST's eps 8/255 (0.031) is about a
# tenth of that, so less diffusion (smaller t*) should already wash it out and more only costs clean accuracy: its
# t* start at 0.02 and stop at 0.2, and its lambdas drop MNIST's strongest guidance (5). 14 settings (COUP 6).
T_STARS = {"mnist": (0.05, 0.1, 0.2, 0.3), "fashion_mnist": (0.02, 0.05, 0.1, 0.2)}
LAMBDAS = {"mnist": (0.5, 2.0, 5.0), "fashion_mnist": (0.5, 2.0)}

# The registry holds the settings chosen by `sweep` (MNIST: COUP t* = 0.1, lambda 1; DiffPure t* = 0.2; Fashion-MNIST:
# COUP t* = 0.05, lambda 2; DiffPure t* = 0.05); COUP without guidance is this study's ablation, its t* chosen on val
# here (MNIST: 0.1; Fashion-MNIST: 0.05).
NOGUIDE_T_STAR = {"mnist": 0.1, "fashion_mnist": 0.05}


def _sweep_command(dataset: str) -> str:
    return f"python -m benchmarks vpsde-study sweep --dataset {dataset}"


def method_settings(method: str, dataset: str = "mnist") -> dict:
    """The settings of ``method`` chosen on ``dataset``'s validation split: the registry's for COUP and DiffPure,
    :data:`NOGUIDE_T_STAR` for the ablation (a clear error naming the entry and the ``sweep`` where there are none)."""
    if method == "coup-noguide":
        t_star = chosen_settings(NOGUIDE_T_STAR, dataset, "benchmarks/studies/vpsde.py NOGUIDE_T_STAR",
                                 _sweep_command(dataset))
        return dict(t_star=t_star, guidance_scale=0.0)
    return {k: v for k, v in registry_settings(method, dataset, _sweep_command(dataset)).items() if k != "dt"}


def make_purifier(method: str, prior, classifier: nn.Module, dataset: str = "mnist", **settings):
    """One of :data:`METHODS` with explicit settings (``t_star``, ``guidance_scale`` for COUP)."""
    if method == "coup-noguide":
        method, settings = "coup", {**settings, "guidance_scale": 0.0}
    return defense(method, dataset, prior=prior, classifier=classifier, **settings)


# ----------------------------------------------------------------------------------------------------------------------

def _row(method: str, settings: dict, split: str, n: int, seed: int, scores: dict, dataset: str, **extra) -> dict:
    return blind_row(method, scores, split=split, seed=seed, n=n, runs=0 if method == "none" else 1,
                     attack=blind_pgd_config(dataset), t_star=settings.get("t_star"),
                     guidance_scale=settings.get("guidance_scale"), **extra)


def _undefended_row(classifier, x, x_adv, y, split, seed, dataset: str) -> dict:
    return _row("none", {}, split, len(y), seed, undefended_accuracy(classifier, x, x_adv, y), dataset)


def select_setting(rows: list[dict], method: str, undefended_clean: float) -> dict | None:
    """The validation choice of ``method`` (:data:`benchmarks.studies.tuning.SELECTION_RULE`) as its settings and scores."""
    best = select([r for r in rows if r["defense"] == method], undefended_clean)
    if best is None:
        return None
    return {"defense": method, "t_star": best["t_star"], "guidance_scale": best["guidance_scale"],
            "clean_acc": best["clean_acc"], "robust_acc": best["robust_acc"]}


def record_line(method: str, dataset: str, choice: dict) -> str:
    """Where the validation choice of ``method`` on ``dataset`` is recorded, as a line to paste."""
    if method == "coup-noguide":
        return f"record in benchmarks/studies/vpsde.py: NOGUIDE_T_STAR[{dataset!r}] = {choice['t_star']!r}"
    return registry_line(method, dataset, choice)


# ----------------------------------------------------------------------------------------------------------------------

def run_sweep(out_dir: str, prior_path: str | None = None, n: int = 100, seed: int = 0, methods=METHODS,
              t_stars=None, lambdas=None, lambda_t_star: float | None = None, verbose: bool = True,
              dataset: str = "mnist", data_dir: str | None = None, cache_dir: str = "/tmp") -> dict:
    """Accuracy-vs-t* for each method and accuracy-vs-lambda for COUP on the "val" split (resumable); ``t_stars`` and
    ``lambdas`` default to the dataset's (:data:`T_STARS`, :data:`LAMBDAS`)."""
    prior_path = prior_path or shipped_prior_path(dataset)
    t_stars = T_STARS[dataset] if t_stars is None else t_stars
    lambdas = LAMBDAS[dataset] if lambdas is None else lambdas
    classifier, prior, x, y, x_adv = study_inputs(dataset, "val", n, prior_path, data_dir, cache_dir)
    prefix = file_prefix("vpsde", dataset)
    path = os.path.join(out_dir, f"{prefix}val_sweep.json")
    rows = []
    if os.path.exists(path):
        old = read_results(path)
        if same_prior(old["meta"], prior_path) and old["meta"].get("n") == len(y):
            rows = [r for r in old["rows"] if r["defense"] != "none"]
    undefended = _undefended_row(classifier, x, x_adv, y, "val", seed, dataset)

    def done(method, settings):
        return any(r["defense"] == method and r["t_star"] == settings["t_star"]
                   and r["guidance_scale"] == settings.get("guidance_scale") for r in rows)

    def save():
        meta = study_meta(dataset, "val", len(y), prior=prior_path, n=len(y), selection_rule=SELECTION_RULE,
                          selected={m: select_setting(rows, m, undefended["clean_acc"]) for m in methods})
        write_results(path, [undefended] + rows, meta)
        plot_curves([undefended] + rows, os.path.join(out_dir, f"{prefix}val_curves.png"), dataset)
        return meta

    def score(method, settings):
        if not done(method, settings):
            purifier = make_purifier(method, prior, classifier, dataset, **settings)
            rows.append(_row(method, settings, "val", len(y), seed,
                             defended_accuracy(purifier, classifier, x, x_adv, y), dataset))
            save()

    plan = []  # by t*, so that an interrupted sweep has every method's low-t* points
    for t_star in t_stars:
        for method in methods:
            settings = {"t_star": t_star}
            if method != "diffpure":
                settings["guidance_scale"] = 1.0 if method == "coup" else 0.0
            plan.append((method, settings))
    for method, settings in tqdm(plan, desc="sweep (t*)", disable=not verbose):
        score(method, settings)
    if "coup" in methods and lambdas:
        t_lambda = lambda_t_star
        if t_lambda is None:
            choice = select_setting(rows, "coup", undefended["clean_acc"])
            t_lambda = choice and choice["t_star"]
        if t_lambda is None:
            print("no COUP setting at lambda 1 meets the clean-accuracy rule: the lambda sweep is skipped (give "
                  "--lambda-t-star to run it at a t* of your choice).")
        for lam in tqdm(lambdas if t_lambda is not None else (), desc=f"sweep (lambda at t*={t_lambda})",
                        disable=not verbose):
            score("coup", {"t_star": t_lambda, "guidance_scale": float(lam)})
    meta = save()
    if verbose:
        print(format_table([undefended] + rows))
        for method, choice in meta["selected"].items():
            print(f"selected {method}: {choice}")
            if choice is not None:
                print(record_line(method, dataset, choice))
        print(f"wrote {path}")
    return {"rows": [undefended] + rows, "meta": meta}


def run_test(out_dir: str, prior_path: str | None = None, n: int = 1000, seed: int = 0, methods=METHODS,
             verbose: bool = True, dataset: str = "mnist", data_dir: str | None = None,
             cache_dir: str = "/tmp") -> dict:
    """Held-out "test" evaluation of each method at its settings of ``dataset`` (:func:`method_settings`; refused
    before any work where one of ``methods`` has none). Rows of other methods already in ``vpsde_<ds>test.json`` (same
    prior and n) are kept, so methods can be evaluated by separate, concurrent runs."""
    prior_path = prior_path or shipped_prior_path(dataset)
    chosen = {method: method_settings(method, dataset) for method in methods}
    classifier, prior, x, y, x_adv = study_inputs(dataset, "test", n, prior_path, data_dir, cache_dir)
    prefix = file_prefix("vpsde", dataset)
    path = os.path.join(out_dir, f"{prefix}test.json")
    undefended = _undefended_row(classifier, x, x_adv, y, "test", seed, dataset)
    new_rows = []

    def save():
        rows = [undefended]
        if os.path.exists(path):  # re-read right before writing: another run may have added its methods meanwhile
            old = read_results(path)
            if same_prior(old["meta"], prior_path) and old["meta"].get("n") == len(y):
                rows += [r for r in old["rows"] if r["defense"] not in ("none", *methods)]
        rows += new_rows
        settings = {r["defense"]: method_settings(r["defense"], dataset) for r in rows if r["defense"] in METHODS}
        source = os.path.join(out_dir, f"{prefix}val_sweep.json")
        meta = study_meta(dataset, "test", len(y), prior=prior_path, n=len(y), settings=settings,
                          settings_source=f"chosen on the val split: {source}")
        write_results(path, rows, meta)
        return {"rows": rows, "meta": meta}

    for method in tqdm(methods, desc="test", disable=not verbose):
        purifier = make_purifier(method, prior, classifier, dataset, **chosen[method])
        scores = defended_accuracy(purifier, classifier, x, x_adv, y)
        new_rows.append(_row(method, chosen[method], "test", len(y), seed, scores, dataset))
        data = save()
    if verbose:
        print(format_table(data["rows"]))
        print(f"wrote {path}")
    return data


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per row (the CW margin)."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
    return true - other


def _compare(grad: torch.Tensor, ref: torch.Tensor) -> dict:
    grad, ref = grad.flatten(1).double(), ref.flatten(1).double()
    return {"cosine_to_exact_per_image": ((grad * ref).sum(1) / (grad.norm(dim=1) * ref.norm(dim=1))).tolist(),
            "relative_error_to_exact_per_image": ((grad - ref).norm(dim=1) / ref.norm(dim=1)).tolist()}


def adjoint_gap_versus_dt(purifier, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, dts, seed: int) -> list:
    """Adjoint-versus-exact gradient gap of the purifier's algorithm at each Euler step ``dt`` (same seeded noise):
    the exact gradient is that of the Euler scheme itself, the adjoint's differs by its own discretisation error."""
    algorithm, rows = purifier.algorithm, []
    saved_dt = algorithm.dt
    try:
        for dt in dts:
            algorithm.dt = dt
            noise = algorithm.draw_noise(x, torch.Generator().manual_seed(seed))
            grads = {}
            for mode, solve in (("exact", algorithm.purify), ("adjoint", algorithm.purify_adjoint)):
                x_var = x.clone().requires_grad_(True)
                grads[mode], = torch.autograd.grad(margin_loss(classifier(solve(x_var, noise)), y).sum(), x_var)
            rows.append({"dt": dt, "steps": algorithm.num_steps, **_compare(grads["adjoint"], grads["exact"])})
    finally:
        algorithm.dt = saved_dt
    return rows


def run_gradients(out_dir: str, prior_path: str | None = None, n: int = 4, seed: int = 0, method: str = "coup",
                  adjoint_dts=(), verbose: bool = True) -> dict:
    """The gradient modes on the MNIST prior: the gradient of the classifier's logit margin after one purification
    (``method_settings(method)``, the same Brownian noise for every mode) by ``exact``, ``adjoint``, ``surrogate`` and
    ``bpda``, compared with ``exact`` (cosine, relative error) and timed; then, for each of ``adjoint_dts``, the
    adjoint-versus-exact gap at that Euler step. Writes ``<out>/vpsde_gradients.json``."""
    prior_path = prior_path or shipped_prior_path("mnist")
    classifier, prior = load_models("mnist", prior_path)
    x, y = load_mnist("val", n=n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    grads, rows = {}, []
    for mode in tqdm(("exact", "adjoint", "surrogate", "bpda"), desc="gradients", disable=not verbose):
        purifier = make_purifier(method, prior, classifier, gradient=mode, seed=seed, **method_settings(method))
        x_var = x.clone().requires_grad_(True)
        nfe_before = prior.nfe.forward + prior.nfe.backward
        start = time.time()
        grad, = torch.autograd.grad(margin_loss(classifier(purifier.forward(x_var)[0]), y).sum(), x_var)
        seconds = time.time() - start
        grads[mode] = grad
        rows.append({"mode": mode, "seconds": seconds, "seconds_per_image": seconds / n,
                     "prior_evaluations_per_image": (prior.nfe.forward + prior.nfe.backward - nfe_before) / n,
                     **_compare(grad, grads["exact"]), "gradient_norm_per_image": grad.flatten(1).norm(dim=1).tolist()})
    algorithm = make_purifier(method, prior, classifier, seed=seed, **method_settings(method))
    gaps = adjoint_gap_versus_dt(algorithm, classifier, x, y, adjoint_dts, seed)
    meta = collect_meta(DATASET_NAMES["mnist"], f"val[:{n}]", prior=prior_path, defense=method,
                        settings=method_settings(method), seed=seed,
                        loss="margin z_y - max_(j != y) z_j of the classifier after one purification (its gradient "
                             "does not vanish on confident images)",
                        note="every mode sees the same Brownian noise (seeded generator)")
    data = {"rows": rows, "adjoint_versus_dt": gaps, "meta": meta}
    path = os.path.join(out_dir, "vpsde_gradients.json")
    os.makedirs(out_dir, exist_ok=True)
    write_json(path, data)
    if verbose:
        for r in rows:
            print(f"{r['mode']:>9}: {r['seconds_per_image']:.1f} s/img, cos to exact "
                  f"{np.round(r['cosine_to_exact_per_image'], 4).tolist()}, rel. err "
                  f"{np.round(r['relative_error_to_exact_per_image'], 3).tolist()}")
        for r in gaps:
            print(f"adjoint at dt={r['dt']:g} ({r['steps']} steps): rel. err "
                  f"{np.round(r['relative_error_to_exact_per_image'], 3).tolist()}")
        print(f"wrote {path}")
    return data


def run_memory(out_dir: str, prior_path: str | None = None, n: int = 16, t_stars=(0.05, 0.2),
               verbose: bool = True, diffattack: bool = False) -> dict:
    """Peak memory of the exact gradient of COUP and DiffPure at ``t_stars`` (T and 4T Euler steps), each in a fresh
    process (:func:`benchmarks.studies.tuning.exact_gradient_memory`); ``<out>/vpsde_memory.json``. ``diffattack``:
    of one DiffAttack loss gradient instead (:class:`attacks_adaptive.DiffAttack`); ``<out>/diffattack_memory.json``."""
    prior_path = prior_path or shipped_prior_path("mnist")
    rows = [row for method in ("coup", "diffpure")
            for row in exact_gradient_memory(method, [dict(t_star=t) for t in t_stars], n, prior_path, verbose,
                                             diffattack=diffattack)]
    meta = collect_meta(DATASET_NAMES["mnist"], f"val[:{n}]", prior=prior_path, t_stars=list(t_stars),
                        target="peak at 4T within 1.2x of T; 2 network forwards per Euler step")
    name = "diffattack_memory.json" if diffattack else "vpsde_memory.json"
    path = write_results(os.path.join(out_dir, name), rows, meta)
    if verbose:
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def plot_curves(rows: list[dict], path: str, dataset: str = "mnist") -> None:
    """Accuracy versus t* (each method, lambda 1 for COUP) and versus lambda (COUP), clean and robust."""
    from benchmarks.harness.plotting import pyplot, save_figure

    plt = pyplot()

    undefended = next(r for r in rows if r["defense"] == "none")
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for method, color, marker in zip(METHODS, ("C0", "C1", "C2"), ("o", "s", "^")):
        pts = sorted((r for r in rows if r["defense"] == method and r["guidance_scale"] in (None, 0.0, 1.0)),
                     key=lambda r: r["t_star"])
        pts = [r for r in pts if method != "coup" or r["guidance_scale"] == 1.0]
        if pts:
            t = [r["t_star"] for r in pts]
            ax_t.plot(t, [100 * r["clean_acc"] for r in pts], "--" + marker, color=color, ms=4, mfc="none",
                      label=f"{method} clean")
            ax_t.plot(t, [100 * r["robust_acc"] for r in pts], "-" + marker, color=color, ms=4, mfc="none",
                      label=f"{method} robust")
    coup_pts = [r for r in rows if r["defense"] == "coup"]
    if coup_pts:
        # the lambda sweep's t*: the one with the most guidance weights evaluated (ties: the larger t*)
        t_lambda = max({r["t_star"] for r in coup_pts}, key=lambda t: (sum(r["t_star"] == t for r in coup_pts), t))
        pts = sorted((r for r in coup_pts if r["t_star"] == t_lambda), key=lambda r: r["guidance_scale"])
        pts = [r for r in rows if r["defense"] == "coup-noguide" and r["t_star"] == t_lambda] + pts
        lam = [r["guidance_scale"] for r in pts]
        ax_l.plot(lam, [100 * r["clean_acc"] for r in pts], "--o", color="C0", ms=3, label="clean")
        ax_l.plot(lam, [100 * r["robust_acc"] for r in pts], "-o", color="C0", ms=3, label="robust (PGD blind)")
        ax_l.set_title(f"COUP, t* = {t_lambda}")
    for ax in (ax_t, ax_l):
        ax.axhline(100 * undefended["clean_acc"], color="k", lw=0.8, ls=":", label="undefended clean")
        ax.axhline(100 * (undefended["clean_acc"] - CLEAN_TOLERANCE), color="grey", lw=0.8, ls=":",
                   label="clean target")
        ax.axhline(100 * ROBUST_TARGETS[dataset], color="r", lw=0.8, ls=":", label="robust target")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("t*")
    ax_t.set_title(f"{DATASET_TITLES[dataset]} val (n={undefended['n']}), "
                   f"PGD eps {eps_text(blind_pgd_config(dataset))} blind")
    ax_l.set_xlabel("guidance weight lambda")
    ax_t.legend(fontsize=7)
    ax_l.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks vpsde-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("sweep", "test", "gradients", "memory"))
    add_dataset_arguments(parser, mnist_only=("gradients", "memory"))
    parser.add_argument("--out", default="results/vpsde")
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior .safetensors (default: the one shipped for --dataset)")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="images of the split (sweep: 100 val, test: 1000 test, gradients: 4 val, memory: 16 val)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--t-stars", type=unit_interval, nargs="+", default=None,
                        help=f"sweep: the t* (default: the dataset's, {T_STARS})")
    parser.add_argument("--lambdas", type=non_negative_number, nargs="*", default=None,
                        help=f"sweep: COUP's guidance weights (default: the dataset's, {LAMBDAS}; the option "
                             "alone: no lambda sweep)")
    parser.add_argument("--lambda-t-star", type=unit_interval, default=None,
                        help="t* of the lambda sweep (default: the t* selected for COUP at lambda 1)")
    parser.add_argument("--adjoint-dts", type=positive_number, nargs="*", default=[],
                        help="gradients: also the adjoint-vs-exact gap at these Euler steps")
    parser.add_argument("--diffattack", action="store_true",
                        help="memory: of one DiffAttack loss gradient (CE + deviated reconstruction) instead")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    set_up_cpu_process(1)
    torch.manual_seed(args.seed)
    if args.stage in ("gradients", "memory") and args.dataset != "mnist":
        parser.error(f"{args.stage} measures the MNIST prior only; drop --dataset.")
    data = dict(dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    try:
        if args.stage == "sweep":
            run_sweep(args.out, args.prior, n=args.n or 100, seed=args.seed, methods=args.methods,
                      t_stars=args.t_stars, lambdas=args.lambdas, lambda_t_star=args.lambda_t_star,
                      verbose=not args.quiet, **data)
        elif args.stage == "memory":
            run_memory(args.out, args.prior, n=args.n or 16, verbose=not args.quiet, diffattack=args.diffattack)
        elif args.stage == "test":
            run_test(args.out, args.prior, n=args.n or 1000, seed=args.seed, methods=args.methods,
                     verbose=not args.quiet, **data)
        else:
            run_gradients(args.out, args.prior, n=args.n or 4, seed=args.seed, method=args.methods[0],
                          adjoint_dts=args.adjoint_dts, verbose=not args.quiet)
    except MissingSettingsError as err:
        parser.error(str(err))
