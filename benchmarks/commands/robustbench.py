"""``python -m benchmarks robustbench``: a RobustBench-style entry (:mod:`benchmarks.harness.robustbench`)."""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from benchmarks.defenses import NO_DEFENSE, paper_of
from benchmarks.harness import robustbench
from benchmarks.harness.arguments import check_eps, existing_path, positive_int
from benchmarks.harness.autoattack import (add_autoattack_arguments, add_defense_arguments, config_from_args,
                                           estimate_first, load_defense, run_autoattack)
from benchmarks.harness.robustbench import DATASETS, load_data, write_robustbench
from benchmarks.harness.sharding import add_shard_argument, current_shard, save_harness, writes_results
from benchmarks.models import load_classifier


def evaluate(args) -> dict:
    """The ``robustbench`` command: returns ``{"model_info": entry, "path": ..., "rows": ..., "result": ...}``, or
    ``{}`` for a shard that does not write the results."""
    shard = current_shard(args.shard)
    x, y = load_data(args.dataset, args.n, args.data_dir)
    classifier = load_classifier(args.classifier, args.dataset, threat_model=args.norm, model_dir=args.model_dir)
    if args.defense != NO_DEFENSE and args.prior is None and args.dataset != "mnist":
        raise ValueError(f"{args.dataset} needs --prior (a diffusers folder or a built-in prior file).")
    model, purifier, info = load_defense(args, classifier, dataset=args.dataset)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.name or f"{info['name'].rsplit(':', 1)[-1]}_{type(classifier).__name__}"
    architecture = type(classifier).__name__ if purifier is None else \
        f"{type(classifier).__name__} + {type(purifier.algorithm.prior).__name__} prior"
    known = paper_of(info["name"])
    paper = dataclasses.asdict(known) if known else dict(name=name, authors="", venue="", link=None)
    if args.link:
        paper["link"] = args.link
    checkpoint_dir = args.checkpoint_dir or os.path.join(args.out, "checkpoints", f"robustbench_{name}")
    config = config_from_args(args)
    if estimate_first(args, shard, model.to(device), x, y, config, name, args.dataset, f"test[:{len(y)}]"):
        return {}
    harness = save_harness(args.out, checkpoint_dir, "robustbench", {
        "name": name, "dataset": args.dataset, "threat_model": args.norm, "architecture": architecture, "paper": paper,
        "gradient": purifier.gradient if purifier is not None else None, "attacks_json": args.attacks_json}, shard)
    run_autoattack(model.to(device), x, y, config, checkpoint_dir=checkpoint_dir, defense_info=info,
                   device=device, verbose=not args.quiet, shard=shard)
    if not writes_results(shard, args.out):
        return {}
    return write_robustbench(args.out, checkpoint_dir, harness, verbose=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks robustbench", description=robustbench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", choices=DATASETS)
    parser.add_argument("--data-dir", type=existing_path, default=None,
                        help="CIFAR-10/100: folder holding cifar-10-batches-py/ etc.")
    parser.add_argument("--classifier", default=None,
                        help="robustbench:<Name> (from --model-dir) or module:function (default: the shipped "
                             "MNIST CNN)")
    parser.add_argument("--model-dir", default="models", help="robustbench's model_dir layout")
    add_defense_arguments(parser)
    add_autoattack_arguments(parser)
    parser.add_argument("--n", type=positive_int, default=64, help="first n test images")
    parser.add_argument("--name", default=None,
                        help="model id: the JSON's file name, <name>.json, as RobustBench names its model files "
                             "(default: <defense>_<classifier class>). The entry's 'name' field is the paper's title, "
                             "as in RobustBench; for a defense outside the registry it is this id")
    parser.add_argument("--link", default=None, help="paper or code link for the entry")
    parser.add_argument("--attacks-json", type=existing_path, default=None,
                        help="attacks.json of `python -m benchmarks attacks` (for 'external')")
    parser.add_argument("--out", default=".",
                        help="model_info/ goes under this folder (RobustBench writes ./model_info)")
    parser.add_argument("--quiet", action="store_true")
    add_shard_argument(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    check_eps(parser, args.eps, args.norm)
    evaluate(args)
