"""The worst-case runner: every attack of a list on the same examples, the strongest adversarial example per example,
per-attack and worst-case robust accuracy under each scoring protocol, NFE and wall time, as results rows
(:mod:`attacks_adaptive.rows`).

Work is saved per (attack, batch) as ``.npz`` files (numpy arrays only, read with ``allow_pickle=False``, written
atomically) in a state folder; a rerun with the same settings loads them and runs only what is missing, so an
interrupted run loses at most the batch in flight. "The same settings" covers the attack, the scoring, the purifier's
parameters, the network weights and the examples: a state written otherwise is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np
import torch
from tqdm import tqdm

from attacks_adaptive.base import Attack
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.files import StateError, atomic_write, differing_keys, read_state_json
from attacks_adaptive.rows import make_row
from attacks_adaptive.scoring import (ALL_SCORINGS, ITERATE_DRAW_SCORINGS, N_DRAW_SCORINGS, N_EVALUATION,
                                      SCORING_ALIASES, SCORINGS, score_batch, scoring_name)
from purifiers.priors.speed import SpeedOptions


def slug(text: str) -> str:
    """A file-name-safe form of a name (defense or attack)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save_npz(path: str, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_npz(path: str, config: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:  # numpy's errors for a damaged archive vary (BadZipFile, EOFError, OSError, ValueError)
        raise StateError(f"cannot read the batch state {path}: it is truncated or corrupt ({type(err).__name__}: "
                         f"{err}); delete it to run that batch again.") from err
    if "config" not in data:
        raise StateError(f"{path} holds no 'config' entry: not a batch state of this runner; delete it to run that "
                         "batch again.")
    if str(data["config"]) != config:
        raise StateError(f"{path} was written with other settings ({data['config']}); now {config}. Use a fresh output "
                         "folder (or delete that state folder) to run new settings.")
    return data


def run_worst_case(attacks, x, y, *, state_dir: str, defense: str, model=None, scorings=SCORINGS, draws: int = 10,
                   n_eval: int = N_EVALUATION, batch_size: int = 32, seed: int = 0, verbose: bool = True,
                   on_attack_done=None, shard: tuple[int, int] | None = None,
                   iterate_draw_attacks: list[str] | None = None) -> dict | None:
    """Run ``attacks`` on ``(x, y)``; return the rows (:mod:`attacks_adaptive.rows`) and the strongest example per
    input. Writing results files is the caller's (``benchmarks.results.write_worst_case``).

    :param attacks: a list of :class:`attacks_adaptive.base.Attack` (with distinct names) or a dict name -> attack;
        they must all attack the same purifier.
    :param x: NCHW [0, 1] images (numpy or tensor); ``y``: integer labels.
    :param state_dir: folder of the per-batch state (``.npz`` files; a rerun resumes from it, and refuses a state
        written with other settings).
    :param defense: the defense's name in the rows.
    :param model: the target scored (default: the first attack's); its deployed defense is what every scoring
        queries.
    :param scorings: protocols of :mod:`attacks_adaptive.scoring` (:data:`~attacks_adaptive.scoring.ALL_SCORINGS`;
        a former name is read as today's); ``"any_iteration"`` turns on every attack's ``track_iterates``,
        ``"all_draws_all_iterates"`` and ``"min_fraction_over_iterates"`` its ``iterate_draws`` (``n_eval`` passes at
        every iterate).
    :param iterate_draw_attacks: the attacks that record the per-iterate N-draw table DiffHammer's two scorings need
        (``None``: all); the others' rows leave those scorings out, and their worst case is over the attacks that
        recorded them (``N`` deployed passes per iterate cost more than most attacks themselves on an ensemble).
    :param n_eval: ``N``, the passes of the N-draw protocols (``majority_vote``, ``all_draws`` and, per iterate,
        DiffHammer's two; 10 as DiffHammer and DiffBreak); its own passes, independent of the multi-draw ones.
    :param batch_size: examples attacked at once (the unit of saving and resuming).
    :param seed: torch's global seed before each (attack, batch), so a resumed run matches an uninterrupted one;
        a seeded purifier's generator is restarted there too.
    :param on_attack_done: called with the report so far after every attack (e.g. to rewrite a results file).
    :param shard: ``(i, k)``: run only the batches ``b`` with ``b % k == i`` (the state of the others comes from the
        other shards, processes or machines, into the same ``state_dir``); the report is returned once every batch
        is there, else ``None`` (:func:`collect_worst_case` builds it later). Every batch's random draws come from the
        seed and the batch's place in the data, never from the shard, so the rows do not depend on how it was split.
    :return: ``{"rows", "settings", "x_worst", "worst_attack", "attack_names"}``: the rows, the run's settings (for
        a results file's meta), and per example the strongest adversarial example found and the index of the attack
        that found it.
    """
    named = _named_attacks(attacks)
    if not scorings:
        raise ValueError(f"scorings must be a non-empty subset of {ALL_SCORINGS}.")
    scorings = list(dict.fromkeys(scoring_name(s) for s in scorings))  # former names read as today's; unknown raise
    scoring_model = DefendedModel.from_target(model if model is not None else next(iter(named.values())).model)
    if len({(a.eps, a.norm) for a in named.values()}) > 1:
        raise ValueError("all attacks of a worst-case run must share one threat model (eps and norm).")
    for name, attack in named.items():
        if attack.model.purifier is not scoring_model.purifier:
            raise ValueError(f"attack {name!r} targets another purifier than the scored model.")
        if "any_iteration" in scorings:
            attack.track_iterates = True
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    y = torch.as_tensor(np.asarray(y)).long()
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, C, H, W) with labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(n_eval, int) or isinstance(n_eval, bool) or n_eval < 1:
        raise ValueError(f"n_eval must be a positive integer, got {n_eval!r}.")
    if iterate_draw_attacks is not None and not set(iterate_draw_attacks) <= set(named):
        raise ValueError(f"iterate_draw_attacks {sorted(set(iterate_draw_attacks) - set(named))} are not among the "
                         f"attacks {list(named)}.")
    if set(ITERATE_DRAW_SCORINGS) & set(scorings):
        for name, attack in named.items():
            if iterate_draw_attacks is None or name in iterate_draw_attacks:
                attack.iterate_draws = n_eval

    batches = [(i, min(i + batch_size, x.shape[0])) for i in range(0, x.shape[0], batch_size)]
    scoring_key = json.dumps({"draws": draws, "n_eval": n_eval, "scorings": list(scorings), "seed": seed,
                              "model": model_fingerprint(scoring_model, x, y)})
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (i, k) with 0 <= i < k, got {shard!r}.")
    manifest = {"settings": {"defense": defense, "n": int(x.shape[0]), "batch_size": batch_size, "draws": draws,
                             "n_eval": n_eval, "seed": seed, "scorings": list(scorings),
                             "attacks": json.loads(json.dumps({n: a.describe() for n, a in named.items()},
                                                              default=str))},
                "batches": batches, "clean": scoring_key,
                # whether an attack records the per-iterate draws is part of its config, not of the run's settings:
                # a later invocation with a subset of the attacks (--attacks) resumes the same folder
                "configs": {name: attack.config_key() + scoring_key
                            + (f"iterate_draws={attack.iterate_draws}" if attack.iterate_draws else "")
                            for name, attack in named.items()}}
    _write_manifest(state_dir, manifest)
    owned = [b for k, b in enumerate(batches) if shard is None or k % shard[1] == shard[0]]
    run = _Run(scoring_model, x, y, scorings, draws, seed, state_dir, verbose, n_eval)
    run.clean(owned, scoring_key)
    for name, attack in named.items():
        run.attack(name, attack, owned, manifest["configs"][name], desc=f"{defense}: {name}")
        if shard is None and on_attack_done is not None:
            on_attack_done(collect_worst_case(state_dir, attacks=list(named)[:list(named).index(name) + 1]))
    if shard is not None and _missing(state_dir, manifest, list(named)):
        return None
    return collect_worst_case(state_dir, attacks=list(named))


def _write_manifest(state_dir: str, manifest: dict) -> None:
    """``run.json``: what the state folder holds (settings, batches, each attack's config); a folder of another run is
    refused, never mixed (a shard of other settings included)."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, "run.json")
    manifest = json.loads(json.dumps(manifest))
    if os.path.exists(path):
        saved = read_state_json(path)
        differ = _manifest_differences(path, saved, manifest,
                                       ran=lambda name: _has_saved_batch(state_dir, name))
        if differ:
            raise StateError(f"{path} holds a run with other settings (differs in {differ}); use a fresh output folder "
                             "(or delete that state folder) to run new settings.")
        manifest = {**manifest, "configs": {**saved["configs"], **manifest["configs"]},
                    "settings": {**manifest["settings"],
                                 "attacks": {**saved["settings"]["attacks"], **manifest["settings"]["attacks"]}}}
    atomic_write(path, lambda f: json.dump(manifest, f, indent=2), mode="w")


def _manifest_differences(path: str, saved: dict, manifest: dict, ran=lambda name: True) -> list[str]:
    """What a saved manifest and this run's disagree on, as dotted keys: the settings (the attacks' descriptions
    aside: a run may add attacks), the batches, the scoring and scored model (``clean``: the draws, the purifier's
    parameters, a digest of the weights (the prior's included) and of the data), and the config of each attack both
    name and that has a saved batch (``ran(name)``: an attack named by an earlier run that never finished a batch
    left nothing to disagree with, and takes this run's config)."""
    try:
        differ = differing_keys({**saved["settings"], "attacks": None}, {**manifest["settings"], "attacks": None},
                                 "settings")
        differ += ["batches"] * (saved["batches"] != manifest["batches"])
        differ += differing_keys(json.loads(saved["clean"]), json.loads(manifest["clean"]), "clean")
        return differ + [f"configs.{name}" for name, config in manifest["configs"].items()
                         if saved["configs"].get(name, config) != config and ran(name)]
    except (KeyError, TypeError, json.JSONDecodeError) as err:  # a JSON file, but not a manifest of this runner
        raise StateError(f"{path} is not a worst-case run manifest ({type(err).__name__}: {err}); delete its folder "
                         "to start the run over.") from err


def _batch_file(state_dir: str, part: str, start: int, stop: int) -> str:
    return os.path.join(state_dir, slug(part), f"b{start:06d}-{stop:06d}.npz")


def _has_saved_batch(state_dir: str, part: str) -> bool:
    folder = os.path.dirname(_batch_file(state_dir, part, 0, 0))
    return os.path.isdir(folder) and any(name.endswith(".npz") for name in os.listdir(folder))


def _missing(state_dir: str, manifest: dict, attacks=None) -> list[str]:
    parts = ["clean", *(attacks if attacks is not None else manifest["configs"])]
    return [f"{part} images {start}-{stop}" for part in parts for start, stop in manifest["batches"]
            if not os.path.exists(_batch_file(state_dir, part, start, stop))]


def collect_worst_case(state_dir: str, attacks: list[str] | None = None) -> dict:
    """The report of a run from its state folder alone (every batch finished, by one process or by several shards):
    ``{"rows", "settings", "x_worst", "worst_attack", "attack_names"}`` as :func:`run_worst_case` returns it.
    ``attacks``: the attacks to report (default: all the folder's run)."""
    path = os.path.join(state_dir, "run.json")
    if not os.path.exists(path):
        raise ValueError(f"{state_dir} holds no worst-case run (no run.json).")
    manifest = read_state_json(path)
    names = list(attacks if attacks is not None else manifest["configs"])
    missing = _missing(state_dir, manifest, names)
    if missing:
        raise ValueError(f"{state_dir}: {len(missing)} batches are not finished ({', '.join(missing[:4])}, ...): wait "
                         "for every shard, or run the command again without --shard to finish them.")
    settings = manifest["settings"]
    clean = _load_parts(state_dir, "clean", manifest["batches"], manifest["clean"], settings["scorings"])
    results = {name: _load_parts(state_dir, name, manifest["batches"], manifest["configs"][name],
                                 ["x_adv", *settings["scorings"]]) for name in names}
    descriptions = {name: settings["attacks"][name] for name in names}
    return _report(settings["defense"], descriptions, results, clean, settings["scorings"], settings["draws"],
                   settings["n_eval"], settings["seed"], settings["n"],
                   {**settings, "attacks": descriptions})


def _load_parts(state_dir: str, part: str, batches, config: str, keys) -> dict:
    parts = [_load_npz(_batch_file(state_dir, part, start, stop), config) for start, stop in batches]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in keys if k in parts[0]}
    if "seconds" in parts[0]:
        merged["seconds"] = float(sum(float(p["seconds"]) for p in parts))
        if all("cpu_seconds" in p for p in parts):  # states written before it was recorded have none
            merged["cpu_seconds"] = float(sum(float(p["cpu_seconds"]) for p in parts))
        merged["nfe"] = np.sum([p["nfe"] for p in parts], axis=0)
    return merged


def model_fingerprint(model: DefendedModel, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a saved batch depends on besides the attack: the purifier's parameters, the ensemble size, the weights of
    the classifier and the purifier (its prior), its prior's speed options (``torch.compile`` and ``channels_last``
    change outputs at float rounding, amp at its format's precision), the ART preprocessing steps chained before and
    after the purifier (class and ``params``) and the examples."""
    digest = hashlib.sha256()
    modules = [model.classifier] + ([model.purifier.algorithm] if model.purifier is not None else [])
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(x.cpu().numpy().tobytes())
    digest.update(y.cpu().numpy().tobytes())
    purifier = None
    if model.purifier is not None:
        purifier = {"class": type(model.purifier).__name__,
                    **{name: repr(getattr(model.purifier, name, None)) for name in model.purifier.params
                       if name not in ("verbose", "batch_size")}}
        speed = [repr(module.speed_options) for module in model.purifier.algorithm.modules()
                 if not getattr(module, "speed_options", SpeedOptions()).is_default]
        if speed:  # absent when every option is off, so states written before speed options existed still resume
            purifier["speed"] = speed
    fingerprint = {"purifier": purifier, "runs": model.runs, "sha256": digest.hexdigest()[:16]}
    chained = (("before", model.before), ("after", model.classifier))
    steps = {where: [_art_step(op) for op in module.ops] for where, module in chained if getattr(module, "ops", None)}
    if steps:  # absent without chained steps, so states written before they were fingerprinted still resume
        fingerprint["preprocessing"] = steps
    return fingerprint


def _art_step(op) -> dict:
    """An ART preprocessing step as a fingerprint sees it: its class and the values of its ``params``."""
    return {"class": type(op).__name__, **{name: repr(getattr(op, name, None)) for name in getattr(op, "params", [])}}


def _named_attacks(attacks) -> dict:
    if isinstance(attacks, dict):
        named = dict(attacks)
    else:
        named = {}
        for attack in attacks:
            if attack.name in named:
                raise ValueError(f"two attacks are named {attack.name!r}; pass a dict of distinct names.")
            named[attack.name] = attack
    if not named or not all(isinstance(a, Attack) for a in named.values()):
        raise ValueError("attacks must be a non-empty list or dict of attacks_adaptive attacks.")
    return named


class _Run:
    """The per-batch work of :func:`run_worst_case`, saved and resumed."""

    def __init__(self, model, x, y, scorings, draws, seed, state_dir, verbose, n_eval=N_EVALUATION):
        self.model, self.x, self.y = model, x, y
        self.scorings, self.draws, self.n_eval, self.seed = scorings, draws, n_eval, seed
        self.state_dir, self.verbose = state_dir, verbose

    def _reseed(self, start: int) -> None:
        torch.manual_seed(self.seed + start)
        if self.model.purifier is not None and self.model.purifier.seed is not None:
            self.model.purifier.reset_generator()

    def _scores(self, x_b, y_b, iterates=None, scorings=None) -> dict:
        scores = score_batch(self.model, x_b, y_b, scorings or self.scorings, draws=self.draws, n_eval=self.n_eval,
                             iterates=iterates)
        return {k: v.cpu().numpy() for k, v in scores.items()}

    def clean(self, batches, config) -> None:
        os.makedirs(os.path.join(self.state_dir, "clean"), exist_ok=True)
        for start, stop in batches:
            path = _batch_file(self.state_dir, "clean", start, stop)
            if os.path.exists(path):
                _load_npz(path, config)  # refuses a state of other settings
                continue
            self._reseed(start)
            scores = self._scores(self.x[start:stop], self.y[start:stop])
            _save_npz(path, config=np.array(config), **scores)

    def attack(self, name, attack, batches, config, desc: str) -> None:
        os.makedirs(os.path.join(self.state_dir, slug(name)), exist_ok=True)
        for start, stop in tqdm(batches, desc=desc, disable=not self.verbose):
            path = _batch_file(self.state_dir, name, start, stop)
            if os.path.exists(path):
                _load_npz(path, config)
                continue
            x_b, y_b = self.x[start:stop], self.y[start:stop]
            self._reseed(start)
            with self.model.count() as meter:
                began, cpu_began = time.time(), time.process_time()
                result = attack.perturb(x_b, y_b)
                # wall and CPU time: on a shared machine the wall time measures the neighbours too
                seconds, cpu_seconds = time.time() - began, time.process_time() - cpu_began
            scorings = self.scorings if result.broken_fraction is not None else \
                [s for s in self.scorings if s not in ITERATE_DRAW_SCORINGS]
            scores = self._scores(result.x_adv, y_b, (result.broken, result.broken_fraction), scorings)
            part = dict(x_adv=result.x_adv.cpu().numpy(), seconds=np.array(seconds), cpu_seconds=np.array(cpu_seconds),
                        nfe=np.array([meter.prior_forward, meter.prior_backward, meter.classifier]), **scores)
            _save_npz(path, config=np.array(config), **part)


def _nfe_dict(nfe, n: int) -> dict:
    return {"prior_forward": float(nfe[0]) / n, "prior_backward": float(nfe[1]) / n, "classifier": float(nfe[2]) / n}


def _passes(scoring: str, draws: int, n_eval: int):
    """The deployed-defense passes a protocol's robustness rests on, as a row states them (``None``: one pass);
    ``scoring`` may be a former name (a state folder written before a rename)."""
    scoring = SCORING_ALIASES.get(scoring, scoring)
    return draws if scoring == "multi_draw" else n_eval if scoring in N_DRAW_SCORINGS else None


def _cpu_seconds_field(parts) -> dict:
    """``cpu_seconds``: the CPU time of the attacks' process (all its threads), where every part recorded one."""
    if not all("cpu_seconds" in part for part in parts):
        return {}
    return {"cpu_seconds": float(sum(part["cpu_seconds"] for part in parts))}


def _n_eval_field(scoring: str, n_eval: int) -> dict:
    return {"n_eval": n_eval} if SCORING_ALIASES.get(scoring, scoring) in N_DRAW_SCORINGS else {}


def _report(defense, descriptions, results, clean, scorings, draws, n_eval, seed, n, settings) -> dict:
    # The clean input is its own only iterate, so its any-iteration score is its single shot (older states store no
    # other).
    clean_acc = {s: clean["single_shot" if s == "any_iteration" else s].mean() for s in scorings}
    rows = []
    for name, res in results.items():
        described = descriptions[name]
        for s in (s for s in scorings if s in res):  # an attack that did not record per-iterate draws lacks those
            rows.append(make_row(defense=defense, attack=name, gradient=described["gradient"], scoring=s,
                                 eps=described["eps"], norm=described["norm"], n=n, seed=seed,
                                 clean_acc=float(clean_acc[s]), robust_acc=float(res[s].mean()),
                                 nfe_per_image=_nfe_dict(res["nfe"], n), seconds=res["seconds"],
                                 **_cpu_seconds_field([res]),
                                 eot=described["eot"], iterations=described["iterations"],
                                 draws=_passes(s, draws, n_eval), settings=described, **_n_eval_field(s, n_eval)))
    # Per example, the strongest example: the lowest multi-draw (else single-shot) robustness, first attack on ties.
    names = list(results)
    rank_key = "multi_draw" if "multi_draw" in scorings else "single_shot"
    ranks = np.stack([results[k][rank_key] for k in names])
    worst_attack = ranks.argmin(0)
    x_worst = np.stack([results[k]["x_adv"] for k in names])[worst_attack, np.arange(n)]
    first = descriptions[names[0]]
    for s in scorings:
        scored = [k for k in names if s in results[k]]
        if not scored:
            continue
        worst = np.stack([results[k][s] for k in scored]).min(0)
        total_nfe = np.sum([results[k]["nfe"] for k in scored], axis=0)
        total_seconds = sum(results[k]["seconds"] for k in scored)
        rows.append(make_row(defense=defense, attack="worst-case(" + ", ".join(scored) + ")", gradient="per attack",
                             scoring=s, eps=first["eps"], norm=first["norm"], n=n, seed=seed,
                             clean_acc=float(clean_acc[s]), robust_acc=float(worst.mean()),
                             nfe_per_image=_nfe_dict(total_nfe, n), seconds=total_seconds,
                             **_cpu_seconds_field([results[k] for k in scored]), eot=None, iterations=None,
                             draws=_passes(s, draws, n_eval),
                             note="per example the minimum over the attacks of this protocol's robustness",
                             **_n_eval_field(s, n_eval)))
    return {"rows": rows, "settings": {**settings, "attacks_done": names}, "x_worst": x_worst,
            "worst_attack": worst_attack, "attack_names": names}
