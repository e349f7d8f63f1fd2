"""``python -m benchmarks check-prior PRIOR``: a prior file's format, conventions and denoising self-test
(:func:`benchmarks.harness.prior_check.check_prior`)."""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness.arguments import device_name, positive_int
from benchmarks.harness.prior_check import check_prior


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks check-prior",
                                description="Print a prior's format, conventions and card, and test that it denoises "
                                            "better than the identity (exit status 1 when it does not).")
    p.add_argument("prior", help="a prior file or folder, as load_prior takes it (e.g. score_sde's checkpoint_8.pth)")
    p.add_argument("--format", default=None, help="checkpoint format instead of detecting it (score_sde, ncsnv2)")
    p.add_argument("--config", default=None,
                   help="network config: a known name (e.g. vp/cifar10_ddpmpp_deep_continuous) or a JSON/YAML file")
    p.add_argument("--raw-weights", action="store_true", help="load a checkpoint's raw weights instead of its EMA")
    p.add_argument("--data", default=None,
                   help="'mnist' (bundled), 'fashion_mnist' (the Debian package's files), a CIFAR-10 folder (holding "
                        "cifar-10-batches-py/) or a folder of images; default: mnist for one-channel priors (a prior "
                        "of other channels needs --data)")
    p.add_argument("--n", type=positive_int, default=16, help="images in the self-test")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv[1:])
    result = check_prior(args.prior, format=args.format, config=args.config, ema=not args.raw_weights, data=args.data,
                         n=args.n, device=args.device)
    if not result["ok"]:
        raise SystemExit(1)
