"""Command line: ``python -m benchmarks <command> [options]``; ``python -m benchmarks --help`` lists the commands."""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.models import MODELS_DIR


def _train_classifier(args):
    card = args_call("benchmarks.train", "train_classifier", out=args.out, epochs=args.epochs, seed=args.seed,
                     verbose=not args.quiet)
    print(json.dumps(card["metrics"], indent=2))


def _train_prior(args):
    card = args_call("benchmarks.train", "train_prior", out=args.out, minutes=args.minutes, max_steps=args.max_steps,
                     seed=args.seed, verbose=not args.quiet)
    print(json.dumps(card["metrics"], indent=2))


def _quickstart(args):
    from benchmarks.quickstart import run_quickstart

    run_quickstart(out_dir=args.out, verbose=not args.quiet)


def args_call(module: str, name: str, **kwargs):
    import importlib

    return getattr(importlib.import_module(module), name)(**kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-classifier", help="train the MNIST reference classifier")
    p.add_argument("--out", default=os.path.join(MODELS_DIR, "mnist_classifier.safetensors"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_classifier)

    p = sub.add_parser("train-prior", help="train the MNIST built-in score prior (EDM denoising score matching)")
    p.add_argument("--out", default=os.path.join(MODELS_DIR, "mnist_prior.safetensors"))
    p.add_argument("--minutes", type=float, default=60.0, help="wall-time budget")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_prior)

    p = sub.add_parser("quickstart", help="the main job on bundled MNIST and the shipped models; writes quickstart.json")
    p.add_argument("--out", default="results")
    p.set_defaults(func=_quickstart)

    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
