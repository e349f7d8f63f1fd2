"""What an evaluation will cost, before it runs: network evaluations per image and projected wall time.

``python -m benchmarks estimate --dataset cifar10``: the cost of the papers' full protocols (``python -m benchmarks
reproduce --full``) on the papers' own networks, before holding any checkpoint: the network evaluations per image come
from running each attack's calibration on a stand-in (the defense with the paper's settings around a closed-form
Gaussian prior and a classifier whose prediction never changes, so every point is attacked for every iteration: the
count of a defense that is never broken, an upper bound), and the time of one evaluation from the papers' network
architectures with random weights (:func:`purifiers.checkpoints.untrained_prior`; the cost of a network does not
depend on its weights) and WideResNet-28-10, timed on this device.

For a command about to run (``attacks``, ``autoattack``), the calibration runs the real defense instead:

Each attack is calibrated on the first batch of the run with 1 and then 2 iterations (its own settings otherwise,
EOT included), under the evaluation meter of :class:`attacks_adaptive.defended.DefendedModel`; a batch's cost is
linear in the iterations (the fixed part: random start, final selection; the per-iteration part: the gradients and,
for the any-iteration rule, one deployed pass per iterate), so the projection is ``fixed + iterations x per-iteration``
per batch, times the number of batches, plus the scoring passes (one for single-shot, ``draws`` for multi-draw, ``n``
for N-evaluation) of the clean and every attacked batch, measured once. The calibration runs on this device, so the
projection holds for this device; it ignores that AutoAttack-style early stopping makes robust-looking models cheaper.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.scoring import multi_draw, n_evaluation, single_shot


def measured(model: DefendedModel, run) -> tuple[dict, float]:
    with model.count() as meter:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return asdict(meter), seconds


def estimate_worst_case(attacks: dict, model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                        scorings=("single_shot",), draws: int = 1, n_eval: int = 1, defense: str = "") -> list[dict]:
    """One row per attack (and the scoring): network evaluations per image (prior forward and backward passes,
    classifier passes), their total over all images, and the projected seconds on this device."""
    model = DefendedModel.from_target(model)
    xb, yb = x[:batch_size], y[:batch_size]
    rows_in_batch, batches = xb.shape[0], -(-x.shape[0] // batch_size)

    def scoring_passes():
        single_shot(model, xb, yb)
        if "multi_draw" in scorings:
            multi_draw(model, xb, yb, draws)
        if "n_evaluation" in scorings:
            n_evaluation(model, xb, yb, n_eval)

    score_nfe, score_seconds = measured(model, scoring_passes)
    rows = [estimate_row(defense, "scoring (clean and each attack)", score_nfe, score_seconds, rows_in_batch,
                         batches * (1 + len(attacks)), x.shape[0])]
    for name, attack in attacks.items():
        steps, tracking = attack.steps, attack.track_iterates
        attack.track_iterates = "any_iteration" in scorings

        def cost(iterations):
            attack.set_params(steps=iterations)
            return measured(model, lambda: attack.perturb(xb, yb))

        try:
            nfe, seconds = linear_projection(cost, {"iterations": steps})
        finally:
            attack.set_params(steps=steps)
            attack.track_iterates = tracking
        rows.append(estimate_row(defense, name, nfe, seconds, rows_in_batch, batches, x.shape[0], iterations=steps))
    return rows + [total_row(rows, defense)]


def total_row(rows: list[dict], defense: str) -> dict:
    return {"defense": defense, "attack": "total", "projected_seconds": sum(r["projected_seconds"] for r in rows),
            "network_evaluations": sum(r["network_evaluations"] for r in rows)}


def linear_projection(cost, counts: dict[str, int]) -> tuple[dict, float]:
    """``(network evaluations, seconds)`` of a run with ``counts`` (e.g. ``{"n_iter": 100, "n_queries": 5000}``),
    projected from ``cost(**counts_at_1)`` and one more call per count raised to 2: the run is taken as
    ``fixed + sum_k counts[k] x per_unit[k]``. ``cost(**counts)`` returns :func:`measured`'s pair."""
    ones = dict.fromkeys(counts, 1)
    base_nfe, base_seconds = cost(**ones)
    nfe, seconds = dict(base_nfe), base_seconds
    for key, count in counts.items():
        more_nfe, more_seconds = cost(**dict(ones, **{key: 2}))
        for k in nfe:
            nfe[k] += (count - 1) * (more_nfe[k] - base_nfe[k])
        seconds += (count - 1) * (more_seconds - base_seconds)
    return {k: max(0.0, v) for k, v in nfe.items()}, max(0.0, seconds)


def estimate_row(defense, attack, nfe_batch: dict, seconds_batch: float, rows_in_batch: int, batches: int, n: int,
         iterations: int | None = None) -> dict:
    per_image = {k: v / rows_in_batch for k, v in nfe_batch.items()}
    return {"defense": defense, "attack": attack, "iterations": iterations, "per_image": per_image,
            "network_evaluations": sum(nfe_batch.values()) * batches, "projected_seconds": seconds_batch * batches,
            "images": n}


# ---------------------------------------------------------------------------------------------------------------------
# The papers' protocols on the papers' networks: counts from a stand-in, prices from the real architectures
# ---------------------------------------------------------------------------------------------------------------------

PAPER_CLASSIFIER = {"cifar10": "WideResNet-28-10"}  # the classifier of ADP, DiffPure, COUP and ScoreOpt on CIFAR-10
IMAGE_SHAPE = {"cifar10": (3, 32, 32)}


class _NeverFlipped(torch.nn.Module):
    """A classifier that always predicts class 0 (input gradients nonzero, but far too small to change the argmax)."""

    def __init__(self, shape):
        super().__init__()
        self.weight = torch.nn.Parameter(1e-6 * torch.randn(10, int(torch.tensor(shape).prod())),
                                         requires_grad=False)
        self.register_buffer("bias", torch.tensor([10.0] + [0.0] * 9))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def protocol_counts(name: str, dataset: str = "cifar10", eps: float = 8 / 255, seed: int = 0) -> list[dict]:
    """Network evaluations per image of the full protocol on defense ``name`` with the paper's settings (rows as
    :func:`estimate_worst_case`'s; their seconds are the stand-in's and mean nothing)."""
    from benchmarks.autoattack_eval import estimate_autoattack
    from benchmarks.defenses import defense, deployed_model, deployed_runs
    from benchmarks.reproduce import ATTACKS, full_protocol, make_attacks
    from purifiers.priors import GaussianPrior

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
                                 draws=protocol.draws, defense=name)[:-1]
    return counts + estimate_autoattack(model, x, y, protocol.autoattack, defense=name, device="cpu")[:-1]


def unit_seconds(prior, classifier, shape, rows: int = 8, repeats: int = 2, device="cpu") -> dict:
    """Seconds per image on ``device`` of one prior forward, one prior backward (its forward+backward less the
    forward) and one classifier pass with its backward, at ``rows`` rows per call."""
    from benchmarks.speed import best_time, network_times

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
    from benchmarks.rb_compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return WideResNet(depth=28, widen_factor=10)


def report_estimate(path: str, rows: list[dict], dataset: str, split: str, **meta) -> None:
    """Print the estimate's table (with the device it was calibrated on) and write it to ``path`` (JSON)."""
    from benchmarks.results import collect_meta, write_results

    info = collect_meta(dataset, split, estimate=rows, **meta)
    print(format_estimate(rows, info["device"]), flush=True)
    write_results(path, [], info)


def format_estimate(rows: list[dict], device: str) -> str:
    lines = [f"Estimated cost (calibrated on {device}):",
             "| defense | attack | iterations | prior fwd / bwd / classifier per image | network evaluations | "
             "projected time |", "|---|---|---|---|---|---|"]
    for r in rows:
        per_image = r.get("per_image")
        cells = "-" if per_image is None else " / ".join(f"{per_image[k]:.0f}" for k in
                                                          ("prior_forward", "prior_backward", "classifier"))
        lines.append(f"| {r['defense']} | {r['attack']} | {r.get('iterations') or '-'} | {cells} | "
                     f"{r['network_evaluations']:,.0f} | {_duration(r['projected_seconds'])} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import argparse
    import os

    from benchmarks.defenses import METHODS, record
    from purifiers.checkpoints import untrained_prior

    parser = argparse.ArgumentParser(prog="python -m benchmarks estimate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10", choices=sorted(IMAGE_SHAPE))
    parser.add_argument("--defenses", nargs="+", default=list(METHODS))
    parser.add_argument("--n", type=int, default=512, help="images evaluated (DiffPure's AutoAttack protocol: 512)")
    parser.add_argument("--rows", type=int, default=8, help="images per network call when timing the networks")
    parser.add_argument("--device", default=None, help="where to time the networks (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None)
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
                    classifier=PAPER_CLASSIFIER[args.dataset], timing_rows=args.rows,
                    note="evaluations per image counted on a stand-in that is never broken (an upper bound); "
                         "seconds = evaluations x the time of one evaluation of the paper's network on this device")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"
