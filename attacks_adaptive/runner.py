"""The worst-case runner: every attack of a list on the same examples, the strongest adversarial example per example,
per-attack and worst-case robust accuracy under each scoring protocol, NFE and wall time, as one results JSON.

Work is saved per (attack, batch) as ``.npz`` files (numpy arrays only, read with ``allow_pickle=False``) in a state
folder beside the JSON; a rerun with the same settings loads them and runs only what is missing, so an interrupted run
loses at most the batch in flight. "The same settings" covers the attack, the scoring, the purifier's parameters, the
network weights and the examples: a state written otherwise is refused, never mixed in. The JSON is rewritten after
every attack.
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

from attacks_adaptive.base import Attack, DefendedModel
from attacks_adaptive.scoring import (N_EVALUATION, SCORINGS, any_iteration, multi_draw, n_evaluation,
                                      single_shot)


def slug(text: str) -> str:
    """A file-name-safe form of a name (defense or attack)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save_npz(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_npz(path: str, config: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    if str(data["config"]) != config:
        raise ValueError(f"{path} was written with other settings ({data['config']}); now {config}. Use a fresh output "
                         "folder (or delete that state folder) to run new settings.")
    return data


def run_worst_case(attacks, x, y, *, out: str, defense: str, model=None, scorings=SCORINGS, draws: int = 10,
                   n_eval: int = N_EVALUATION, batch_size: int = 32, seed: int = 0, dataset: str = "", split: str = "", meta: dict | None = None,
                   verbose: bool = True) -> dict:
    """Run ``attacks`` on ``(x, y)`` and write ``out`` (the package's results shape).

    :param attacks: a list of :class:`attacks_adaptive.base.Attack` (distinct ``name``s) or a dict name -> attack;
        they must all attack the same purifier.
    :param x: NCHW [0, 1] images (numpy or tensor); ``y``: integer labels.
    :param out: path of the results JSON; the per-batch state goes to ``<out without .json>_state/<defense>/`` and
        the strongest adversarial examples to ``<out without .json>_worst_adv.npz``.
    :param defense: the defense's name in the rows.
    :param model: the target scored (default: the first attack's); its deployed defense is what ``single_shot`` and
        ``multi_draw`` query.
    :param scorings: protocols of :mod:`attacks_adaptive.scoring`; ``"any_iteration"`` turns on ``track_iterates``.
    :param draws: forward passes of the ``multi_draw`` protocol.
    :param n_eval: resubmissions of the ``n_evaluation`` protocol (DiffHammer's N, 10); its own passes, independent
        of the multi-draw ones.
    :param batch_size: examples attacked at once (the unit of saving and resuming).
    :param seed: torch's global seed before each (attack, batch), so a resumed run matches an uninterrupted one;
        a seeded purifier's generator is restarted there too.
    :return: ``{"rows", "meta", "x_worst", "worst_attack"}``: the rows written, the meta, and per example the
        strongest adversarial example found and the index of the attack that found it.
    """
    named = _named_attacks(attacks)
    unknown = [s for s in scorings if s not in SCORINGS]
    if unknown or not scorings:
        raise ValueError(f"scorings must be a non-empty subset of {SCORINGS}, got {list(scorings)}.")
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

    state_dir = os.path.join(os.path.splitext(out)[0] + "_state", slug(defense))
    batches = [(i, min(i + batch_size, x.shape[0])) for i in range(0, x.shape[0], batch_size)]
    scoring_key = json.dumps({"draws": draws, "n_eval": n_eval, "scorings": list(scorings), "seed": seed,
                              "model": _model_fingerprint(scoring_model, x, y)})
    run = _Run(scoring_model, x, y, scorings, draws, seed, state_dir, verbose, n_eval)

    clean = run.clean(batches, scoring_key)
    results = {}
    meta = {**(meta or {}), "defense": defense, "n": int(x.shape[0]), "batch_size": batch_size, "draws": draws,
            "n_eval": n_eval, "seed": seed, "scorings": list(scorings), "state_dir": state_dir,
            "attacks": {name: attack.describe() for name, attack in named.items()}}
    for name, attack in named.items():
        results[name] = run.attack(name, attack, batches, attack.config_key() + scoring_key)
        report = _report(defense, named, results, clean, scorings, draws, n_eval, seed, x, out, dataset, split,
                         meta)
    return report


def _model_fingerprint(model: DefendedModel, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a saved batch depends on besides the attack: the purifier's parameters, the ensemble size, the weights of
    the classifier and the purifier (its prior), and the examples."""
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
    return {"purifier": purifier, "runs": model.runs, "sha256": digest.hexdigest()[:16]}


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

    def _scores(self, x_b, y_b) -> dict:
        scores = {"single_shot": single_shot(self.model, x_b, y_b)}
        if "multi_draw" in self.scorings:
            scores["multi_draw"] = multi_draw(self.model, x_b, y_b, self.draws)
        if "n_evaluation" in self.scorings:
            scores["n_evaluation"] = n_evaluation(self.model, x_b, y_b, self.n_eval)
        return {k: v.cpu().numpy() for k, v in scores.items()}

    def clean(self, batches, config) -> dict:
        folder = os.path.join(self.state_dir, "clean")
        os.makedirs(folder, exist_ok=True)
        parts = []
        for start, stop in batches:
            path = os.path.join(folder, f"b{start:06d}-{stop:06d}.npz")
            if os.path.exists(path):
                parts.append(_load_npz(path, config))
                continue
            self._reseed(start)
            scores = self._scores(self.x[start:stop], self.y[start:stop])
            _save_npz(path, config=np.array(config), **scores)
            parts.append({**scores, "config": config})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "config"}

    def attack(self, name, attack, batches, config) -> dict:
        folder = os.path.join(self.state_dir, slug(name))
        os.makedirs(folder, exist_ok=True)
        parts = []
        for start, stop in tqdm(batches, desc=name, disable=not self.verbose):
            path = os.path.join(folder, f"b{start:06d}-{stop:06d}.npz")
            if os.path.exists(path):
                parts.append(_load_npz(path, config))
                continue
            x_b, y_b = self.x[start:stop], self.y[start:stop]
            self._reseed(start)
            with self.model.count() as meter:
                began = time.time()
                result = attack.perturb(x_b, y_b)
                seconds = time.time() - began
            scores = self._scores(result.x_adv, y_b)
            if "any_iteration" in self.scorings:
                scores["any_iteration"] = any_iteration(result.broken, torch.as_tensor(scores["single_shot"])).numpy()
            part = dict(x_adv=result.x_adv.cpu().numpy(), seconds=np.array(seconds),
                        nfe=np.array([meter.prior_forward, meter.prior_backward, meter.classifier]), **scores)
            _save_npz(path, config=np.array(config), **part)
            parts.append(part)
        merged = {k: np.concatenate([p[k] for p in parts]) for k in ("x_adv", *self.scorings)}
        merged["seconds"] = float(sum(float(p["seconds"]) for p in parts))
        merged["nfe"] = np.sum([p["nfe"] for p in parts], axis=0)
        return merged


def _nfe_dict(nfe, n: int) -> dict:
    return {"prior_forward": float(nfe[0]) / n, "prior_backward": float(nfe[1]) / n, "classifier": float(nfe[2]) / n}


def _passes(scoring: str, draws: int, n_eval: int):
    """The deployed-defense passes a protocol's robustness rests on, as a row states them (``None``: one pass)."""
    return {"multi_draw": draws, "n_evaluation": n_eval}.get(scoring)


def _report(defense, named, results, clean, scorings, draws, n_eval, seed, x, out, dataset, split, meta) -> dict:
    from benchmarks.results import collect_meta, make_row, write_results

    n = int(x.shape[0])
    clean_acc = {"single_shot": clean["single_shot"].mean(), "any_iteration": clean["single_shot"].mean()}
    for s in ("multi_draw", "n_evaluation"):
        if s in clean:
            clean_acc[s] = clean[s].mean()
    rows = []
    for name, res in results.items():
        settings = named[name].describe()
        for s in scorings:
            rows.append(make_row(defense=defense, attack=name, gradient=settings["gradient"], scoring=s,
                                 eps=named[name].eps, norm=named[name].norm, n=n, seed=seed,
                                 clean_acc=float(clean_acc[s]), robust_acc=float(res[s].mean()),
                                 nfe_per_image=_nfe_dict(res["nfe"], n), seconds=res["seconds"],
                                 eot=settings["eot"], iterations=settings["iterations"],
                                 draws=_passes(s, draws, n_eval), settings=settings,
                                 **({"n_eval": n_eval} if s == "n_evaluation" else {})))
    # Per example, the strongest example: the lowest multi-draw (else single-shot) robustness, first attack on ties.
    names = list(results)
    rank_key = "multi_draw" if "multi_draw" in scorings else "single_shot"
    ranks = np.stack([results[k][rank_key] for k in names])
    worst_attack = ranks.argmin(0)
    x_worst = np.stack([results[k]["x_adv"] for k in names])[worst_attack, np.arange(n)]
    total_nfe = np.sum([results[k]["nfe"] for k in names], axis=0)
    total_seconds = sum(results[k]["seconds"] for k in names)
    first = named[names[0]]
    for s in scorings:
        worst = np.stack([results[k][s] for k in names]).min(0)
        rows.append(make_row(defense=defense, attack="worst-case(" + ", ".join(names) + ")", gradient="per attack",
                             scoring=s, eps=first.eps, norm=first.norm, n=n, seed=seed, clean_acc=float(clean_acc[s]),
                             robust_acc=float(worst.mean()), nfe_per_image=_nfe_dict(total_nfe, n),
                             seconds=total_seconds, eot=None, iterations=None,
                             draws=_passes(s, draws, n_eval),
                             note="per example the minimum over the attacks of this protocol's robustness",
                             **({"n_eval": n_eval} if s == "n_evaluation" else {})))
    full_meta = collect_meta(dataset, split, **meta, attacks_done=names)
    write_results(out, rows, full_meta)
    np.savez(os.path.splitext(out)[0] + "_worst_adv.npz", x_adv=x_worst,
             attack_index=worst_attack, attack_names=np.array(names))
    return {"rows": rows, "meta": full_meta, "x_worst": x_worst, "worst_attack": worst_attack}
