"""What an evaluation will cost, before it runs: network evaluations per image and projected wall time.


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


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"
