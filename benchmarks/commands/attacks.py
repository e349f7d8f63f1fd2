"""``python -m benchmarks attacks``: the adaptive attacks of a preset on the registry's defenses and the worst-case
table; the suite and its results files are :mod:`benchmarks.harness.adaptive`."""

from __future__ import annotations

import argparse

from attacks_adaptive.scoring import ALL_SCORINGS, ITERATE_DRAW_SCORINGS, SCORINGS
from benchmarks.harness import adaptive
from benchmarks.harness.adaptive import PRESETS, SELECTED_BY_DEFAULT, run_attacks
from benchmarks.harness.arguments import (check_eps, defense_name, non_negative_int, positive_int, positive_number,
                                          prior_source)
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.harness.sharding import add_shard_argument, current_shard
from benchmarks.harness.switches import add_speed_arguments, speed_settings


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks attacks", description=adaptive.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output folder (attacks.json goes there)")
    parser.add_argument("--defenses", nargs="+", default=list(SELECTED_BY_DEFAULT),
                        type=defense_name(import_factories=False),
                        help="'none', adp, scoreopt, coup, diffpure, or a factory 'module:function'")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--n", type=positive_int, default=None,
                        help="first n images of the split (default: the preset's)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--eps", type=positive_number, default=0.3, help="radius; fractions like 8/255 allowed")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior file (default: the shipped MNIST prior)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 on a shared machine: more threads than free cores stall)")
    parser.add_argument("--attacks", nargs="+", default=None,
                        help="only these attacks of the suite (names as in the table, e.g. 'PGD+EOT[surrogate]')")
    parser.add_argument("--scorings", nargs="+", default=None, choices=ALL_SCORINGS, metavar="SCORING",
                        help=f"protocols to score (default: {' '.join(SCORINGS)}; also "
                             f"{' '.join(ITERATE_DRAW_SCORINGS)}, DiffHammer's per-iterate metrics)")
    parser.add_argument("--iterate-draw-attacks", nargs="+", default=None, metavar="ATTACK",
                        help="the attacks that record the per-iterate draws of DiffHammer's metrics (default: the "
                             "DiffHammer attack; each costs N deployed passes per iterate)")
    parser.add_argument("--quiet", action="store_true")
    add_shard_argument(parser)
    parser.add_argument("--estimate", action="store_true",
                        help="print the projected cost (network evaluations, wall time on this device, calibrated on "
                             "the first batch) of each defense's attacks and exit; without it the estimate is printed "
                             "before the run unless --quiet")
    add_speed_arguments(parser)
    args = parser.parse_args(argv[1:])
    check_eps(parser, args.eps, args.norm)
    set_up_cpu_process(args.threads)
    shard = current_shard(args.shard)
    first_shard = shard is None or shard.index == 0  # one calibration is enough for all shards
    run_attacks(args.out, args.defenses, args.preset, n=args.n, split=args.split, eps=args.eps, norm=args.norm,
                seed=args.seed, prior_path=args.prior, attacks=args.attacks, verbose=not args.quiet, shard=shard,
                estimate="only" if args.estimate else "first" if not args.quiet and first_shard else None,
                speed=speed_settings(args), scorings=args.scorings, iterate_draw_attacks=args.iterate_draw_attacks)
