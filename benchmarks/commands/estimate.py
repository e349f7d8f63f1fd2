"""``python -m benchmarks estimate --dataset cifar10``: the cost of the papers' full protocols (``python -m benchmarks
reproduce --full``) on the papers' own networks, before holding any checkpoint.

The network evaluations per image come from running each attack's calibration (:mod:`benchmarks.harness.cost`) on a
stand-in: the defense with the paper's settings from the registry around a closed-form Gaussian prior and a classifier
whose prediction never changes, so every point is attacked for every iteration (the count of a defense that is never
broken: an upper bound, exact for one that holds). The time of one evaluation comes from the papers' network
architectures with random weights (:func:`purifiers.priors.checkpoints.untrained_prior`; a network's cost does not depend on
its weights) and WideResNet-28-10, timed on the device the command runs on.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.harness.arguments import defense_name, device_name, positive_int
from benchmarks.harness.cost import estimate_worst_case, report_estimate, total_row

PAPER_CLASSIFIER = {"cifar10": "WideResNet-28-10"}  # the classifier of ADP, DiffPure, COUP and ScoreOpt on CIFAR-10
IMAGE_SHAPE = {"cifar10": (3, 32, 32)}


class _NeverFlipped(torch.nn.Module):
    """A classifier that always predicts class 0 (input gradients nonzero, but far too small to change the argmax)."""

    def __init__(self, shape):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # the counts must not depend on the global random state
        self.weight = torch.nn.Parameter(1e-6 * torch.randn(10, int(torch.tensor(shape).prod()), generator=generator),
                                         requires_grad=False)
        self.register_buffer("bias", torch.tensor([10.0] + [0.0] * 9))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def protocol_counts(name: str, dataset: str = "cifar10", eps: float = 8 / 255, seed: int = 0) -> list[dict]:
    """Network evaluations per image of the full protocol on defense ``name`` with the paper's settings (rows as
    :func:`estimate_worst_case`'s; their seconds are the stand-in's and mean nothing)."""
    from benchmarks.defenses import defense, deployed_model, deployed_runs
    from benchmarks.harness.autoattack import estimate_autoattack
    from benchmarks.harness.protocols import ATTACKS, full_protocol, make_attacks
    from purifiers.priors.backends import GaussianPrior

    shape, rows = IMAGE_SHAPE[dataset], 1  # counts per image do not depend on the batch
    classifier = _NeverFlipped(shape).eval()
    purifier = defense(name, dataset, prior=GaussianPrior(), classifier=classifier, device_type="cpu")
    if "exact" in purifier.gradient_modes:
        purifier.set_params(gradient="exact")
    model = deployed_model(purifier, classifier, runs=deployed_runs(name))
    x = 0.25 + 0.5 * torch.rand(rows, *shape, generator=torch.Generator().manual_seed(seed))
    y = torch.zeros(rows, dtype=torch.int64)
    protocol = full_protocol(eps, seed)
    attacks = make_attacks(model, eps, "linf", protocol, seed, ATTACKS)
    counts = estimate_worst_case(attacks, model, x, y, batch_size=rows, scorings=("single_shot", "multi_draw"),
                                 draws=protocol.draws, defense=name, rows=rows)[:-1]
    return counts + estimate_autoattack(model, x, y, protocol.autoattack, defense=name, device="cpu")[:-1]


def unit_seconds(prior, classifier, shape, rows: int = 8, repeats: int = 2, device="cpu") -> dict:
    """Seconds per image on ``device`` of one prior forward, one prior backward (its forward+backward less the
    forward) and one classifier pass with its backward, at ``rows`` rows per call."""
    from benchmarks.harness.timing import best_time, network_times

    prior, classifier = prior.to(device).eval(), classifier.to(device).eval()
    forward, forward_backward = network_times(prior, shape, (rows,), repeats, device=device, warm_up=1)[rows]
    x = torch.rand(rows, *shape, device=device)

    def classifier_pass():
        x_var = x.clone().requires_grad_(True)
        torch.autograd.grad(classifier(x_var).sum(), x_var)

    return {"prior_forward": forward, "prior_backward": max(forward_backward - forward, 0.0),
            "classifier": best_time(classifier_pass, repeats, warm_up=1) / rows}


def priced(rows: list[dict], units: dict, n: int) -> list[dict]:
    """``rows`` for ``n`` images, their time the evaluations per image times ``units`` (seconds per evaluation)."""
    out = [dict(r, images=n, network_evaluations=n * sum(r["per_image"].values()),
                projected_seconds=n * sum(r["per_image"][k] * units[k] for k in units)) for r in rows]
    return out + [total_row(out, rows[0]["defense"])]


def paper_classifier(dataset: str) -> torch.nn.Module:
    from benchmarks.harness.rb_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return WideResNet(depth=28, widen_factor=10)


def main(argv: list[str]) -> None:
    from benchmarks.defenses import METHODS, record
    from purifiers.priors.checkpoints import untrained_prior

    start = time.time()

    parser = argparse.ArgumentParser(prog="python -m benchmarks estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10", choices=sorted(IMAGE_SHAPE))
    parser.add_argument("--defenses", nargs="+", default=list(METHODS), type=defense_name(bare=False, factories=False))
    parser.add_argument("--n", type=positive_int, default=512,
                        help="images evaluated (DiffPure's AutoAttack protocol: 512)")
    parser.add_argument("--rows", type=positive_int, default=8, help="images per network call when timing the networks")
    parser.add_argument("--device", type=device_name, default=None,
                        help="where to time the networks (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", default="results", help="output folder (estimate_<dataset>.json)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape, classifier = IMAGE_SHAPE[args.dataset], paper_classifier(args.dataset)
    networks = {name: record(name).paper_network for name in args.defenses}
    missing = [name for name, network in networks.items() if network is None]
    if missing:
        raise ValueError(f"the registry names no paper network for {missing}.")
    units = {}
    for network in dict.fromkeys(networks.values()):  # timed first, together, while nothing else runs
        if not args.quiet:
            print(f"timing {'/'.join(network)} and {PAPER_CLASSIFIER[args.dataset]} on {device} ...", flush=True)
        units[network] = unit_seconds(untrained_prior(*network), classifier, shape, args.rows, device=device)
    rows = []
    for name, network in networks.items():
        if not args.quiet:
            print(f"counting the evaluations of {name} under the full protocol ...", flush=True)
        rows += [dict(r, network="/".join(network), unit_seconds=units[network])
                 for r in priced(protocol_counts(name, args.dataset), units[network], args.n)]
    report_estimate(os.path.join(args.out, f"estimate_{args.dataset}.json"), rows, args.dataset, f"any {args.n} images",
                    time.time() - start,
                    classifier=PAPER_CLASSIFIER[args.dataset], timing_rows=args.rows,
                    note="evaluations per image counted on a stand-in that is never broken (an upper bound); "
                         "seconds = evaluations x the time of one evaluation of the paper's network on this device")
