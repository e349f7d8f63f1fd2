"""``python -m benchmarks masking-check --defense NAME``: the gradient-masking checks of Carlini et al. (2019, §5 and
its appendix checklist) and Athalye et al. (2018, §3.1) on one deployed defense, as ``masking_<defense>.json`` and
``.md``; the checks, their sources and tolerances are :mod:`benchmarks.harness.masking`."""

from __future__ import annotations

import argparse

from benchmarks.harness import masking
from benchmarks.harness.arguments import (check_eps, defense_name, non_negative_int, positive_int, positive_number,
                                          prior_source)
from benchmarks.harness.cpu import set_up_cpu_process


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks masking-check", description=masking.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", required=True, type=defense_name(),
                        help="'none', adp, scoreopt, coup, diffpure, or a factory 'module:function'")
    parser.add_argument("--out", default="results", help="output folder (masking_<defense>.json and .md go there)")
    parser.add_argument("--preset", default="cpu", choices=sorted(masking.PRESETS),
                        help="cpu (default: 16 images, small attacks, cheaper still for COUP and DiffPure), smoke "
                             "(checks that it runs), paper (the papers' budgets, for a GPU)")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="first n images of the split (default: the preset's)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--eps", type=positive_number, default=0.3,
                        help="the base radius (every check but the eps sweep runs at it); fractions like 8/255")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--sweep-eps", type=positive_number, nargs="+", default=None,
                        help="the radii of the eps sweep (default: from --eps to the radius at which any image is "
                             "reachable, l_inf 1; --eps is always included)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior file (default: the shipped MNIST prior)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 on a shared machine: more threads than free cores stall)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--estimate", action="store_true",
                        help="print the planned cells and their projected cost (calibrated on one image) and exit; "
                             "without it the estimate is printed before the run unless --quiet")
    args = parser.parse_args(argv[1:])
    check_eps(parser, args.eps, args.norm)
    for radius in args.sweep_eps or ():
        check_eps(parser, radius, args.norm)
        if radius < args.eps:
            parser.error(f"argument --sweep-eps: the sweep starts at --eps {args.eps:g}, got {radius:g} below it")
    set_up_cpu_process(args.threads)
    masking.run_masking_check(args.out, args.defense, args.preset, n=args.n, split=args.split, eps=args.eps,
                              norm=args.norm, seed=args.seed, prior_path=args.prior, sweep=args.sweep_eps,
                              verbose=not args.quiet,
                              estimate="only" if args.estimate else None if args.quiet else "first")
