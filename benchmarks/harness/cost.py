"""What an evaluation will cost, before it runs: network evaluations per image and projected wall time.

Each attack is calibrated on the first :func:`calibration_rows` images of the run (one tenth of the images, at most a
batch, at least one) with 1 and then 2 iterations (its own settings otherwise, EOT included), under the evaluation
meter of :class:`attacks_adaptive.defended.DefendedModel`; an image's cost is linear in the iterations (the fixed
part: random start, final selection; the per-iteration part: the gradients and, for the any-iteration rule, one
deployed pass per iterate), so the projection is ``fixed + iterations x per-iteration`` per image, times the number of
images, plus the scoring passes (one for single-shot, ``draws`` for multi-draw, ``n`` for the N-draw protocols) of
the clean and every attacked image, measured once. The calibration runs on this device, so the projection holds for this device;
it ignores that AutoAttack-style early stopping makes robust-looking models cheaper, and a calibration on fewer rows
than the run's batches sees less of the batching speed-up (the projection errs high).

The calibration costs about ``rows x 3`` iterations per attack against the run's ``n x iterations``, a tenth of the
attack work or less once an attack runs 3 iterations or more. A run whose attack work is no larger than the
calibration's (:func:`calibration_skip_reason`: a smoke run of one or two iterations on a few images) is not
estimated before it starts: the command says so in one line. Every estimate records its own wall time
(``estimate_seconds``) beside the projection, in its file and in the run's results meta (:func:`estimate_summary`).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.scoring import ITERATE_DRAW_SCORINGS, score_batch


def measured(model: DefendedModel, run) -> tuple[dict, float]:
    with model.count() as meter:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return asdict(meter), seconds


#: The iteration counts every attack is calibrated at (the linear fit's two points).
CALIBRATION_ITERATIONS = (1, 2)


def calibration_rows(n: int, batch_size: int) -> int:
    """Images the estimate calibrates on: a tenth of the run's ``n``, at most one batch, at least one."""
    return max(1, min(batch_size, n // 10))


def calibration_skip_reason(n: int, iterations: list[int], batch_size: int) -> str | None:
    """Why a run of ``n`` images whose attacks make ``iterations`` is not worth estimating first (its attack work is no
    larger than the calibration's), or None."""
    rows = calibration_rows(n, batch_size)
    run, calibration = n * sum(iterations), rows * sum(CALIBRATION_ITERATIONS) * len(iterations)
    if run > calibration:
        return None
    return (f"estimate skipped: this run ({n} images x {sum(iterations)} iterations) is no larger than its calibration "
            f"would be ({rows} image(s) x {sum(CALIBRATION_ITERATIONS)} iterations per attack); --estimate forces one.")


def estimate_worst_case(attacks: dict, model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                        scorings=("single_shot",), draws: int = 1, n_eval: int = 1, defense: str = "",
                        rows: int | None = None) -> list[dict]:
    """One row per attack (and the scoring): network evaluations per image (prior forward and backward passes,
    classifier passes), their total over all images, and the projected seconds on this device; calibrated on ``rows``
    images (default :func:`calibration_rows`)."""
    model = DefendedModel.from_target(model)
    rows = rows or calibration_rows(x.shape[0], batch_size)
    xb, yb = x[:rows], y[:rows]

    def scoring_passes():  # what the runner scores every batch with (the clean one included)
        score_batch(model, xb, yb, scorings, draws=draws, n_eval=n_eval)

    score_nfe, score_seconds = measured(model, scoring_passes)
    table = [estimate_row(defense, "scoring (clean and each attack)", score_nfe, score_seconds, rows, x.shape[0],
                          passes=1 + len(attacks))]
    for name, attack in attacks.items():
        steps, tracking, iterate_draws = attack.steps, attack.track_iterates, attack.iterate_draws
        attack.track_iterates = "any_iteration" in scorings
        if set(scorings) & set(ITERATE_DRAW_SCORINGS):  # as the runner sets it: N deployed passes per iterate
            attack.iterate_draws = n_eval

        def cost(iterations):
            attack.set_params(steps=iterations)
            return measured(model, lambda: attack.perturb(xb, yb))

        try:
            nfe, seconds = linear_projection(cost, {"iterations": steps})
        finally:
            attack.set_params(steps=steps)
            attack.track_iterates, attack.iterate_draws = tracking, iterate_draws
        table.append(estimate_row(defense, name, nfe, seconds, rows, x.shape[0], iterations=steps))
    return table + [total_row(table, defense)]


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


def estimate_row(defense, attack, nfe: dict, seconds: float, rows: int, n: int, iterations: int | None = None,
                 passes: int = 1) -> dict:
    """A row of the estimate from what ``rows`` calibration images cost (``nfe``, ``seconds``), projected to ``n``
    images, each run ``passes`` times (the scoring: the clean images and every attack's)."""
    per_image = {k: v / rows for k, v in nfe.items()}
    return {"defense": defense, "attack": attack, "iterations": iterations, "per_image": per_image,
            "network_evaluations": sum(per_image.values()) * n * passes,
            "projected_seconds": seconds / rows * n * passes, "images": n}


def report_estimate(path: str, rows: list[dict], dataset: str, split: str, estimate_seconds: float, **meta) -> None:
    """Print the estimate's table (with the device it was calibrated on) and its own cost, and write both to ``path``
    (JSON; ``meta["estimate_seconds"]``: the wall time the estimate took)."""
    from benchmarks.results import collect_meta, write_results

    info = collect_meta(dataset, split, estimate=rows, estimate_seconds=round(estimate_seconds, 1), **meta)
    projected = rows[-1]["projected_seconds"]
    share = f", {100 * estimate_seconds / projected:.0f}% of the projection" if projected > 0 else ""
    print(format_estimate(rows, info["device"]), flush=True)
    print(f"(this estimate took {_duration(estimate_seconds)} of wall time{share})", flush=True)
    write_results(path, [], info)


def estimate_summary(path: str) -> dict | None:
    """``{"projected_seconds", "estimate_seconds"}`` of the estimate written to ``path`` before a run (None when the
    run was not estimated), for the run's results meta."""
    import os

    from benchmarks.results import read_results

    if not os.path.isfile(path):
        return None
    meta = read_results(path)["meta"]
    return {"projected_seconds": round(meta["estimate"][-1]["projected_seconds"], 1),
            "estimate_seconds": meta.get("estimate_seconds")}


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
