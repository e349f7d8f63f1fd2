"""``python -m benchmarks reproduce``: paper-versus-ours tables (:mod:`benchmarks.harness.protocols`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from benchmarks.defenses import METHODS, build_purifier, deployed_model, deployed_runs
from benchmarks.harness import protocols
from benchmarks.harness.arguments import (check_eps, defense_name, device_name, existing_path, non_negative_int,
                                          positive_int, positive_number, prior_source)
from benchmarks.harness.protocols import (ATTACKS, DEFAULT_EPS, defense_part, evaluate_defense, full_protocol,
                                          protocol_dict, scaled_protocol, write_reproduce)
from benchmarks.harness.sharding import add_shard_argument, current_shard, save_harness, writes_results
from benchmarks.harness.switches import add_speed_arguments, speed_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reproduce", description=protocols.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    parser.add_argument("--defenses", nargs="+", default=list(METHODS), type=defense_name(bare=False))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--n", type=positive_int, default=8, help="first n test images")
    parser.add_argument("--eps", type=positive_number, default=None, help="default: 0.3 (MNIST), 8/255 (CIFAR-10)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--full", action="store_true", help="the papers' attack settings (for a GPU)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="MNIST: default the shipped prior; CIFAR-10: a diffusers folder or "
                        "an authors' checkpoint (score_sde checkpoint_8.pth, NCSNv2 checkpoint.pth, EDM .pkl)")
    parser.add_argument("--data-dir", type=existing_path, default=None,
                        help="CIFAR-10: the folder holding cifar-10-batches-py/")
    parser.add_argument("--classifier", default=None, help="CIFAR-10: robustbench:<Name> or module:function")
    parser.add_argument("--model-dir", default="models", help="robustbench's model_dir layout")
    parser.add_argument("--coup-toy-runs", type=non_negative_int, default=None,
                        help="paths per setting of COUP's toy (paper: 100,000; scaled-down default 10,000; 0 skips)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images attacked at once, the unit of resuming and of --shard (default: the protocol's)")
    parser.add_argument("--device", type=device_name, default=None)
    parser.add_argument("--out", default="results/reproduce")
    parser.add_argument("--quiet", action="store_true")
    add_shard_argument(parser)
    add_speed_arguments(parser)
    return parser


def load_setting(args):
    """``(classifier, prior, x, y, purifier factory)`` for the dataset of ``args``."""
    from purifiers.priors.loading import load_prior

    if args.dataset == "mnist":
        from benchmarks.data import load_mnist
        from benchmarks.models import load_reference_models

        classifier, shipped_prior = load_reference_models("mnist")
        prior = load_prior(args.prior) if args.prior else shipped_prior
        x, y = load_mnist("test", n=args.n)
        return classifier, prior, x, y, lambda name: build_purifier(name, prior, classifier, **speed_settings(args))
    from benchmarks.data import load_cifar10
    from benchmarks.models import load_classifier

    if args.prior is None or args.data_dir is None or args.classifier is None:
        raise ValueError("the CIFAR-10 protocol needs --data-dir, --prior (a diffusers folder or an authors' checkpoint) "
                         "and --classifier.")
    classifier = load_classifier(args.classifier, "cifar10", threat_model="Linf" if args.norm == "linf" else "L2",
                                 model_dir=args.model_dir)
    prior = load_prior(args.prior)
    x, y = load_cifar10(args.data_dir, "test", n=args.n)
    return classifier, prior, x, y, lambda name: build_purifier(name, prior, classifier, dataset="cifar10",
                                                                **speed_settings(args))


def reproduce(args) -> dict:
    """The ``reproduce`` command: returns ``{"rows", "summary", "paper_vs_ours", "markdown"}``, or ``{}`` for a shard
    that does not write the results."""
    start = time.time()
    shard = current_shard(args.shard)
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.dataset]
    protocol = (full_protocol if args.full else scaled_protocol)(eps, args.seed)
    if args.batch_size is not None:
        protocol = dataclasses.replace(protocol, autoattack=dataclasses.replace(protocol.autoattack,
                                                                                batch_size=args.batch_size))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classifier, prior, x, y, factory = load_setting(args)
    classifier = classifier.to(device).eval().requires_grad_(False)
    x, y = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
    models = {}
    for name in args.defenses:
        purifier = factory(name)
        purifier.set_params(seed=args.seed)
        runs = protocol.runs.get(name, deployed_runs(name))
        models[name] = deployed_model(purifier, classifier, runs=runs).to(device)
    toy_runs = args.coup_toy_runs if args.coup_toy_runs is not None else (100_000 if args.full else 10_000)
    # Saved before any batch runs, so that a shard of other settings is refused before it spends any time.
    folder = os.path.join(args.out, "checkpoints", f"reproduce_{args.dataset}")
    harness = save_harness(args.out, folder, "reproduce", {
        "dataset": args.dataset, "eps": eps, "n": len(y), "seed": args.seed, "protocol": protocol_dict(protocol),
        "coup_toy_runs": toy_runs,
        "defenses": [defense_part(name, model, protocol, args.attacks) for name, model in models.items()]}, shard)
    for name, model in models.items():
        evaluate_defense(name, model, x, y, eps=eps, norm=args.norm, protocol=protocol, out_dir=args.out,
                         attacks=args.attacks, seed=args.seed, verbose=not args.quiet, shard=shard)
    if not writes_results(shard, args.out):
        return {}
    return write_reproduce(args.out, harness, start, verbose=not args.quiet)


def main(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv[1:])
    check_eps(parser, args.eps, args.norm)
    reproduce(args)
