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


def _measured(model: DefendedModel, run) -> tuple[dict, float]:
    with model.count() as meter:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return asdict(meter), seconds


def _line(fixed: dict, per_iteration: dict, iterations: int) -> dict:
    return {k: max(0.0, fixed[k] + iterations * per_iteration[k]) for k in fixed}


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

    score_nfe, score_seconds = _measured(model, scoring_passes)
    rows = [_row(defense, "scoring (clean and each attack)", score_nfe, score_seconds, rows_in_batch,
                 batches * (1 + len(attacks)), x.shape[0])]
    for name, attack in attacks.items():
        steps, tracking = attack.steps, attack.track_iterates
        attack.track_iterates = "any_iteration" in scorings
        try:
            calibration = []
            for s in (1, 2):
                attack.set_params(steps=s)
                calibration.append(_measured(model, lambda: attack.perturb(xb, yb)))
        finally:
            attack.set_params(steps=steps)
            attack.track_iterates = tracking
        (nfe1, sec1), (nfe2, sec2) = calibration
        per_iteration = {k: nfe2[k] - nfe1[k] for k in nfe1}
        fixed = {k: nfe1[k] - per_iteration[k] for k in nfe1}
        nfe = _line(fixed, per_iteration, steps)
        seconds = max(0.0, (sec1 - (sec2 - sec1)) + steps * (sec2 - sec1))
        rows.append(_row(defense, name, nfe, seconds, rows_in_batch, batches, x.shape[0], iterations=steps))
    total_seconds = sum(r["projected_seconds"] for r in rows)
    rows.append({"defense": defense, "attack": "total", "projected_seconds": total_seconds,
                 "network_evaluations": sum(r["network_evaluations"] for r in rows)})
    return rows


def _row(defense, attack, nfe_batch: dict, seconds_batch: float, rows_in_batch: int, batches: int, n: int,
         iterations: int | None = None) -> dict:
    per_image = {k: v / rows_in_batch for k, v in nfe_batch.items()}
    return {"defense": defense, "attack": attack, "iterations": iterations, "per_image": per_image,
            "network_evaluations": sum(nfe_batch.values()) * batches, "projected_seconds": seconds_batch * batches,
            "images": n}


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
    return f"{seconds / 3600:.1f} h"
