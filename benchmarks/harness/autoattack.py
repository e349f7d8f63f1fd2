"""``python -m benchmarks autoattack``: AutoAttack 'rand' and 'standard' on a purified classifier, resumable.

The protocol (AutoAttack's 'rand' version for randomized defenses, and DiffPure's reporting of the minimum):

* ``version='rand'`` of pyautoattack 0.2.0: APGD-CE then APGD-DLR, 100 iterations, 1 restart, EOT over 20 forward
  passes per iteration, on the deployed randomized defense (fresh purification noise on every call);
* ``version='standard'`` (APGD-CE, APGD-T, FAB-T, Square) with the purifier's randomness fixed by a seed: by default
  (``standard_noise="fixed"``) the purifier's seeded generator restarts at every forward call, so the defended model
  is a deterministic function of its input batch, which is what the standard attacks assume. (The noise of a row
  depends on its position in the batch, and AutoAttack re-batches the points it still attacks, so one image can see
  different noise in the attack and in the final check.) ``standard_noise="seeded"`` is the variant of DiffPure's code:
  the generator is seeded once per batch and its noise keeps changing from call to call;
* the **reported** number is ``min(rand, standard)`` of AutoAttack's own robust accuracies (DiffPure's protocol);
* AutoAttack decides each point from *one* stochastic forward pass (fra31/auto-attack#104), so the returned
  adversarial examples of every version are re-scored with ``k`` forward passes of the deployed randomized defense:
  ``multi_draw`` (the mean accuracy over the draws: Fixed-AutoAttack's rule, Liu et al. 2025, with ``k = 20``) and
  ``all_draws`` (a point counts only if all ``k`` draws classify it correctly); ``worst-case`` counts a point only if it survived every version's AutoAttack flags and all
  ``k`` re-score draws of every version's adversarial example. Clean accuracy is scored the same way.

AutoAttack's own state resume is broken (pyautoattack 0.2.0 saves its attack set as a string), so the harness
checkpoints per batch itself: every (batch, version) result is one file in ``checkpoint_dir``, each batch runs from
seeds derived from ``(seed, batch, version)`` only, and a resumed run therefore returns exactly what an uninterrupted
one would.

Parameters are frozen (``requires_grad_(False)``): AutoAttack's ``check_dynamic`` calls the model outside ``no_grad``
and would otherwise build a graph through the whole purifier. Input gradients still flow.

Defenses come from the registry (:mod:`benchmarks.defenses`) by name, or from a factory ``"module:function"`` called
``function(prior, classifier, **overrides)``, so the harness works on any purifier.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.files import StateError, atomic_write, differing_keys, read_state_json, read_state_torch
from attacks_adaptive.scoring import multi_draw, single_shot
from benchmarks.defenses import NO_DEFENSE, REGISTRY, build_purifier, deployed_model, deployed_runs
from benchmarks.harness.arguments import (check_overrides, defense_name, device_name, non_negative_int, positive_int,
                                          positive_number, prior_source)
from benchmarks.harness.cost import estimate_summary
from benchmarks.harness.sharding import Shard, saved_harnesses
from benchmarks.harness.switches import add_speed_arguments, speed_settings
from benchmarks.results import collect_meta, format_table, make_row, write_results
from purifiers.art_base import PurifiedClassifier
from purifiers.validation import check_images

AA_VERSIONS = ("rand", "standard")
STANDARD_NOISE = ("fixed", "seeded")


def parse_overrides(items: list[str] | None) -> dict:
    """``["sigma=0.25", "steps=5", "name=foo"]`` -> ``{"sigma": 0.25, "steps": 5, "name": "foo"}``."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"a defense override is key=value, got {item!r}.")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class AutoAttackConfig:
    """One AutoAttack evaluation. ``None`` iteration counts keep AutoAttack's own settings (the full protocol: 100
    APGD/FAB iterations, EOT 20 in 'rand', 9 target classes, 5000 Square queries); anything else is scaled down and
    every row says so."""

    norm: str = "Linf"
    eps: float = 0.3
    versions: tuple[str, ...] = AA_VERSIONS
    seed: int = 0
    batch_size: int = 50
    rescore_draws: int = 20
    standard_noise: str = "fixed"
    n_iter: int | None = None
    eot_iter: int | None = None
    n_target_classes: int | None = None
    n_queries: int | None = None

    def __post_init__(self):
        self.versions = tuple(self.versions)
        if self.norm not in ("Linf", "L2", "L1"):
            raise ValueError(f"norm must be 'Linf', 'L2' or 'L1', got {self.norm!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}.")
        if not self.versions or any(v not in AA_VERSIONS for v in self.versions) or \
                len(set(self.versions)) != len(self.versions):
            raise ValueError(f"versions must be distinct names from {AA_VERSIONS}, got {self.versions}.")
        if self.standard_noise not in STANDARD_NOISE:
            raise ValueError(f"standard_noise must be one of {STANDARD_NOISE}, got {self.standard_noise!r}.")
        for name in ("batch_size", "rescore_draws", "n_iter", "eot_iter", "n_target_classes", "n_queries"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    @property
    def scaled_down(self) -> bool:
        return any(v is not None for v in (self.n_iter, self.eot_iter, self.n_target_classes, self.n_queries))

    def iterations(self) -> int:
        return self.n_iter or 100

    def eot(self, version: str) -> int:
        return (self.eot_iter or 20) if version == "rand" else 1


@dataclass
class VersionResult:
    """One AutoAttack version on all points: AutoAttack's flags, the adversarial examples, the re-score counts."""

    robust: torch.Tensor           # bool (N,): AutoAttack's verdict (one forward pass per point)
    x_adv: torch.Tensor            # (N, C, H, W); the clean image where no adversarial example was found
    y_adv: torch.Tensor            # (N,) AutoAttack's predicted labels
    rescore: torch.Tensor          # float (N,): fraction of ``rescore_draws`` forward passes correct on x_adv
    seconds: float = 0.0
    nfe: dict = field(default_factory=dict)  # network evaluations in total (prior forward/backward, classifier)


@dataclass
class AutoAttackResult:
    config: AutoAttackConfig
    n: int
    clean_single: torch.Tensor      # float (N,): one forward pass correct on the clean image (1.0 / 0.0)
    clean_draws: torch.Tensor       # float (N,): fraction of ``rescore_draws`` forward passes correct on it
    versions: dict[str, VersionResult]
    number_forward_passes: float  # network evaluations per prediction of the deployed defense

    def clean_accuracy(self) -> float:
        return self.clean_single.mean().item()

    def robust_accuracy(self, version: str) -> float:
        return self.versions[version].robust.float().mean().item()

    def reported_accuracy(self) -> float:
        """DiffPure's protocol: the minimum over the versions run of AutoAttack's robust accuracy."""
        return min(self.robust_accuracy(v) for v in self.versions)

    def worst_case(self) -> torch.Tensor:
        """bool (N,): robust under every version's flags and in every re-score draw of every version."""
        flags = [r.robust & (r.rescore == 1.0) for r in self.versions.values()]
        return torch.stack(flags).all(0)


# ---------------------------------------------------------------------------------------------------------------------
# Running AutoAttack per batch, with checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def unit_seed(seed: int, batch: int, part: str) -> int:
    """The seed of one (batch, part) unit of work: a function of these three only, so resuming changes nothing."""
    code = sum(ord(c) * 31**i for i, c in enumerate(part))
    return int(np.random.SeedSequence([seed, batch, code]).generate_state(1)[0])


class FixedNoise(nn.Module):
    """The defended model with its purification noise frozen: the purifier's seeded generator restarts at every
    forward call, so the same batch always gets the same noise (a deterministic model for AutoAttack 'standard')."""

    def __init__(self, model: PurifiedClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.purifier.reset_generator()
        return self.model(x)


class _TqdmHandler(logging.Handler):
    """Route AutoAttack's log records (logger 'auto-attack') through tqdm, so they do not break the progress bar."""

    def emit(self, record):
        tqdm.write(f"[auto-attack] {self.format(record)}")


@contextlib.contextmanager
def autoattack_logging(verbose: bool):
    """Wire pyautoattack's logger to our progress output (DEBUG: per-batch progress; WARNING: its checks)."""
    aa_logger = logging.getLogger("auto-attack")
    handler = _TqdmHandler()
    old_level, old_propagate = aa_logger.level, aa_logger.propagate
    aa_logger.addHandler(handler)
    aa_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    aa_logger.propagate = False
    try:
        yield
    finally:
        aa_logger.removeHandler(handler)
        aa_logger.setLevel(old_level)
        aa_logger.propagate = old_propagate


def _configure_apgd(apgd, n_iter: int) -> None:
    # pyautoattack derives the step-size checkpoints from n_iter in the constructor only; keep them consistent.
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def make_autoattack(model: nn.Module, version: str, config: AutoAttackConfig, seed: int, device):
    """A pyautoattack ``AutoAttack`` of ``version`` with the config's (possibly scaled-down) iteration counts."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=config.norm, eps=config.eps, version=version, seed=seed, device=device)
    if config.n_iter is not None:
        _configure_apgd(adversary.apgd, config.n_iter)
        _configure_apgd(adversary.apgd_targeted, config.n_iter)
        adversary.fab.n_iter = config.n_iter
    if config.eot_iter is not None and version == "rand":
        adversary.apgd.eot_iter = config.eot_iter
    if config.n_target_classes is not None:
        adversary.apgd_targeted.n_target_classes = config.n_target_classes
        adversary.fab.n_target_classes = config.n_target_classes
    if config.n_queries is not None:
        adversary.square.n_queries = config.n_queries
    return adversary


class _Checkpoints:
    """One file per finished (batch, part) in a folder, plus ``run.json`` holding the fingerprint of the run; files are
    written atomically and read back with ``weights_only=True`` (tensors and plain values only, no code)."""

    def __init__(self, folder: str | None, fingerprint: dict):
        self.folder = folder
        self.fingerprint = fingerprint
        if folder is None:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "run.json")
        if os.path.exists(path):
            saved = read_state_json(path)
            if saved != fingerprint:
                raise StateError(f"checkpoint folder {folder} belongs to a different run ({path} differs in "
                                 f"{differing_keys(saved, fingerprint)}); use another folder or delete it to start "
                                 "over.")
        else:
            atomic_write(path, lambda f: f.write(json.dumps(fingerprint, indent=2)), mode="w")

    @classmethod
    def existing(cls, folder: str) -> "_Checkpoints":
        """The checkpoints of a run already in ``folder`` (its ``run.json`` says which)."""
        path = os.path.join(folder, "run.json")
        if not os.path.exists(path):
            raise ValueError(f"{folder} holds no AutoAttack run (no run.json).")
        return cls(folder, read_state_json(path))

    def config(self) -> AutoAttackConfig:
        return AutoAttackConfig(**{**self.fingerprint["config"], "versions": tuple(self.fingerprint["config"]["versions"])})

    def missing(self) -> list[str]:
        """The (part, batch) files of the run not written yet."""
        config = self.config()
        return [f"{part} batch {b}" for b in range(-(-self.fingerprint["n"] // config.batch_size))
                for part in ("clean", *config.versions) if not os.path.exists(self._path(b, part))]

    def _path(self, batch: int, part: str) -> str:
        return os.path.join(self.folder, f"{part}_{batch:05d}.pt")

    def load(self, batch: int, part: str) -> dict | None:
        path = None if self.folder is None else self._path(batch, part)
        if path is None or not os.path.exists(path):
            return None
        return read_state_torch(path, "batch checkpoint", "delete it to run that batch again.")

    def save(self, batch: int, part: str, record: dict) -> None:
        if self.folder is not None:
            atomic_write(self._path(batch, part), lambda f: torch.save(record, f))


def _fingerprint(x: torch.Tensor, y: torch.Tensor, config: AutoAttackConfig, defense: dict) -> dict:
    digest = hashlib.sha256(x.detach().cpu().numpy().tobytes() + y.detach().cpu().numpy().tobytes()).hexdigest()
    fingerprint = {"data_sha256": digest, "n": int(x.shape[0]), "config": asdict(config), "defense": defense}
    return json.loads(json.dumps(fingerprint, default=repr))  # as it reads back from run.json (tuples -> lists)


def run_autoattack(model: nn.Module, x, y, config: AutoAttackConfig | None = None, *, checkpoint_dir: str | None = None,
                   defense_info: dict | None = None, device=None, verbose: bool = True,
                   shard: Shard | None = None) -> AutoAttackResult | None:
    """Run the protocol of this module on ``model`` (a :func:`benchmarks.defenses.deployed_model`) for images ``x``
    (N, C, H, W) in [0, 1] and labels ``y``, batch by batch, resuming from ``checkpoint_dir`` when it holds finished
    batches of the same run.

    :param defense_info: what identifies the defense (name, parameters); part of the checkpoint fingerprint.
    :param shard: run only this shard's batches (:mod:`benchmarks.harness.sharding`) into ``checkpoint_dir``; the result is
        returned once every batch is there, else ``None`` (:func:`collect_autoattack` reads it later).
    """
    config = config or AutoAttackConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.int64)
    check_images(x, name="x")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must hold one label per image, shape ({x.shape[0]},), got {tuple(y.shape)}.")
    if shard is not None and checkpoint_dir is None:
        raise ValueError("a shard writes its batches into checkpoint_dir; give one.")
    model = model.to(device).eval().requires_grad_(False)
    purifier = model.purifier if isinstance(model, PurifiedClassifier) else None
    checkpoints = _Checkpoints(checkpoint_dir, _fingerprint(x, y, config, defense_info or {}))
    parts = ["clean", *config.versions]
    batches = [b for b in range(-(-x.shape[0] // config.batch_size)) if shard is None or shard.owns(b)]
    records = {part: [] for part in parts}
    original_seed = purifier.seed if purifier is not None else None
    name = (defense_info or {}).get("name", "")
    progress = tqdm(total=len(batches) * len(parts), desc=f"{name}: AutoAttack", disable=not verbose)
    try:
        with autoattack_logging(verbose):
            for b in batches:
                xb = x[b * config.batch_size:(b + 1) * config.batch_size].to(device)
                yb = y[b * config.batch_size:(b + 1) * config.batch_size].to(device)
                for part in parts:
                    record = checkpoints.load(b, part)
                    if record is None:
                        progress.set_description(f"{name}: AutoAttack {part}, batch {b + 1}")
                        seed = unit_seed(config.seed, b, part)
                        record = _run_unit(model, purifier, xb, yb, part, config, seed, device)
                        checkpoints.save(b, part, record)
                    records[part].append(record)
                    progress.update()
    finally:
        progress.close()
        if purifier is not None:
            purifier.set_params(seed=original_seed)
    if shard is not None:
        return collect_autoattack(checkpoint_dir) if not checkpoints.missing() else None
    return _assemble(config, int(x.shape[0]), records)


def collect_autoattack(checkpoint_dir: str) -> AutoAttackResult:
    """The result of a run from its checkpoint folder alone (every batch finished, by one process or several shards)."""
    checkpoints = _Checkpoints.existing(checkpoint_dir)
    missing = checkpoints.missing()
    if missing:
        raise ValueError(f"{checkpoint_dir}: {len(missing)} batches are not finished ({', '.join(missing[:4])}, ...): "
                         "wait for every shard, or run the command again without --shard to finish them.")
    config, n = checkpoints.config(), checkpoints.fingerprint["n"]
    records = {part: [checkpoints.load(b, part) for b in range(-(-n // config.batch_size))]
               for part in ("clean", *config.versions)}
    return _assemble(config, n, records)


def checkpointed_defense(checkpoint_dir: str) -> dict:
    """The ``defense_info`` the run in ``checkpoint_dir`` was started with, as it reads back from its ``run.json``."""
    return _Checkpoints.existing(checkpoint_dir).fingerprint["defense"]


def _assemble(config: AutoAttackConfig, n: int, records: dict) -> AutoAttackResult:
    clean = records["clean"]
    versions = {}
    for version in config.versions:
        recs = records[version]
        versions[version] = VersionResult(
            robust=torch.cat([r["robust"] for r in recs]), x_adv=torch.cat([r["x_adv"] for r in recs]),
            y_adv=torch.cat([r["y_adv"] for r in recs]), rescore=torch.cat([r["rescore"] for r in recs]),
            seconds=sum(r["seconds"] for r in recs), nfe=_sum_dicts([r["nfe"] for r in recs]))
    clean_nfe = _sum_dicts([r["nfe"] for r in clean])
    return AutoAttackResult(config=config, n=n, clean_single=torch.cat([r["single"] for r in clean]),
                            clean_draws=torch.cat([r["draws"] for r in clean]), versions=versions,
                            number_forward_passes=sum(clean_nfe.values()) / n)


def _sum_dicts(dicts: list[dict]) -> dict:
    total = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _run_unit(model, purifier, xb, yb, part, config, seed, device) -> dict:
    """One batch of one part ("clean" or an AutoAttack version), from ``seed`` only."""
    torch.manual_seed(seed)
    if purifier is not None:
        purifier.set_params(seed=seed)
    counted, start = DefendedModel.from_target(model), time.time()
    if part == "clean":
        with counted.count() as meter:  # one prediction per image: the deployed defense's cost
            single = single_shot(model, xb, yb).cpu()
        nfe = dataclasses.asdict(meter)
        draws = multi_draw(model, xb, yb, config.rescore_draws).cpu()
        return {"single": single, "draws": draws, "nfe": nfe, "seconds": time.time() - start}
    adversary = make_autoattack(_attacked_model(model, purifier, part, config), part, config, seed, device)
    with counted.count() as meter:
        x_adv, y_adv = adversary.run_standard_evaluation(xb, yb, batch_size=xb.shape[0])
    nfe, seconds = dataclasses.asdict(meter), time.time() - start
    # Re-score with the deployed (randomized) defense and fresh noise, seeded apart from the attack's.
    rescore_seed = unit_seed(seed, 0, "rescore")
    torch.manual_seed(rescore_seed)
    if purifier is not None:
        purifier.set_params(seed=rescore_seed)
    rescore = multi_draw(model, x_adv, yb, config.rescore_draws).cpu()
    return {"robust": y_adv.eq(yb).cpu(), "x_adv": x_adv.detach().cpu(), "y_adv": y_adv.detach().cpu(),
            "rescore": rescore, "nfe": nfe, "seconds": seconds}


def _attacked_model(model, purifier, version: str, config: AutoAttackConfig):
    """What AutoAttack ``version`` attacks: 'standard' on a randomized defense sees one fixed noise draw."""
    if version == "standard" and purifier is not None and config.standard_noise == "fixed":
        return FixedNoise(model)
    return model


def estimate_autoattack(model: nn.Module, x, y, config: AutoAttackConfig, *, defense: str = "",
                        device=None) -> list[dict]:
    """The projected cost of :func:`run_autoattack` (rows as :func:`benchmarks.harness.cost.estimate_worst_case`'s),
    calibrated on the first :func:`~benchmarks.harness.cost.calibration_rows` images: each version run with 1 and 2
    iterations (and, for 'standard', 1 and 2 Square queries) and projected linearly to the config's counts, plus the
    clean and re-scoring passes. AutoAttack attacks only the points still robust, so a defense that breaks early costs
    less than projected."""
    from benchmarks.harness.cost import calibration_rows, estimate_row, linear_projection, measured, total_row

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval().requires_grad_(False)
    purifier = model.purifier if isinstance(model, PurifiedClassifier) else None
    counted = DefendedModel.from_target(model)
    n = len(y)
    rows = calibration_rows(n, config.batch_size)
    xb = torch.as_tensor(x[:rows], dtype=torch.float32).to(device)
    yb = torch.as_tensor(y[:rows], dtype=torch.int64).to(device)
    clean_nfe, clean_seconds = measured(counted, lambda: single_shot(model, xb, yb))
    draws_nfe, draws_seconds = measured(counted, lambda: multi_draw(model, xb, yb, config.rescore_draws))
    table = [estimate_row(defense, "clean (one pass)", clean_nfe, clean_seconds, rows, n),
             estimate_row(defense, f"re-score ({config.rescore_draws} draws, clean and each version)", draws_nfe,
                          draws_seconds, rows, n, passes=1 + len(config.versions))]
    for version in config.versions:
        def cost(n_iter, n_queries=1):
            adversary = make_autoattack(_attacked_model(model, purifier, version, config), version,
                                        dataclasses.replace(config, n_iter=n_iter, n_queries=n_queries), config.seed,
                                        device)
            with autoattack_logging(False):
                return measured(counted, lambda: adversary.run_standard_evaluation(xb, yb, batch_size=len(yb)))

        counts = {"n_iter": config.iterations()}
        if version == "standard":
            counts["n_queries"] = config.n_queries or 5000
        nfe, seconds = linear_projection(cost, counts)
        table.append(estimate_row(defense, f"AutoAttack-{version}", nfe, seconds, rows, n,
                                  iterations=config.iterations()))
    return table + [total_row(table, defense)]


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------

def result_rows(result: AutoAttackResult, defense: str, gradient: str | None, **extra) -> list[dict]:
    """The results rows of one evaluation (the package's shape): per version AutoAttack's flags and the two re-scores,
    then the reported ``min(rand, standard)`` and the per-point worst case."""
    cfg, k, n = result.config, result.config.rescore_draws, result.n
    clean = result.clean_accuracy()
    common = dict(defense=defense, gradient=gradient, eps=cfg.eps, norm=cfg.norm, n=n, seed=cfg.seed, clean_acc=clean,
                  iterations=cfg.iterations(), scaled_down=cfg.scaled_down,
                  clean_acc_mean_of_draws=result.clean_draws.mean().item(), **extra)
    rows = []
    for version, res in result.versions.items():
        nfe = {key: value / n for key, value in res.nfe.items()}
        per_version = dict(common, attack=f"AutoAttack-{version}", eot=cfg.eot(version), nfe_per_image=nfe,
                           seconds=res.seconds, aa_version=version)
        if version == "standard" and gradient is not None:
            per_version["noise"] = cfg.standard_noise
        if version == "standard" and cfg.n_target_classes is not None:
            per_version["target_classes"] = cfg.n_target_classes
        if version == "standard" and cfg.n_queries is not None:
            per_version["square_queries"] = cfg.n_queries
        rows.append(make_row(**per_version, scoring="single_shot", robust_acc=res.robust.float().mean().item(),
                             note="AutoAttack's own flags (one forward pass per point)"))
        rows.append(make_row(**per_version, scoring="multi_draw", draws=k, robust_acc=res.rescore.mean().item(),
                             note=f"the adversarial examples re-scored with {k} passes of the deployed defense"))
        rows.append(make_row(**per_version, scoring="all_draws", draws=k, n_eval=k,
                             robust_acc=(res.rescore == 1.0).float().mean().item(),
                             note=f"correct in all {k} re-score passes"))
    total_seconds = sum(r.seconds for r in result.versions.values())
    rows.append(make_row(**common, attack=f"AutoAttack min({', '.join(result.versions)})", eot=None,
                         scoring="single_shot", robust_acc=result.reported_accuracy(), nfe_per_image=None,
                         seconds=total_seconds, note="the reported number (DiffPure's protocol): AutoAttack's flags"))
    rows.append(make_row(**common, attack="worst-case(" + ", ".join(f"AutoAttack-{v}" for v in result.versions) + ")",
                         eot=None, scoring="all_draws", draws=k, n_eval=k,
                         robust_acc=result.worst_case().float().mean().item(), nfe_per_image=None,
                         seconds=total_seconds, note=f"per point: every version's flags and all {k} re-score passes"))
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def add_defense_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and build a defense (shared by the commands of this package)."""
    parser.add_argument("--defense", default="adp", type=defense_name(),
                        help=f"one of {sorted(REGISTRY)}, '{NO_DEFENSE}' (the bare classifier), or module:function "
                             "(a factory (prior, classifier, **overrides) -> PurifierPyTorch)")
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior file (built-in .safetensors or an authors' checkpoint such as "
                        "score_sde's checkpoint_8.pth) or diffusers folder (default: the shipped prior)")
    parser.add_argument("--gradient", default=None,
                        help="the purifier's gradient mode for the attacks (default: 'exact' where the purifier "
                             "has it, else the factory's)")
    parser.add_argument("--runs", type=positive_int, default=None,
                        help="purifications per prediction (default: the deployed defense's, ADP 10, others 1)")
    parser.add_argument("--ensemble", default="softmax", choices=PurifiedClassifier.ENSEMBLES)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a defense parameter (repeatable)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when available)")
    add_speed_arguments(parser)


def add_autoattack_arguments(parser: argparse.ArgumentParser, eps_default: float = 0.3) -> None:
    parser.add_argument("--norm", default="Linf", choices=("Linf", "L2", "L1"))
    parser.add_argument("--eps", type=positive_number, default=eps_default, help="radius; fractions like 8/255 allowed")
    parser.add_argument("--versions", nargs="+", default=list(AA_VERSIONS), choices=AA_VERSIONS)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=50, help="points per AutoAttack call and checkpoint")
    parser.add_argument("--rescore", type=positive_int, default=20,
                        help="forward passes re-scoring each adversarial example")
    parser.add_argument("--standard-noise", default="fixed", choices=STANDARD_NOISE)
    scaled = parser.add_argument_group("scaled-down settings (any of them labels the results as scaled down)")
    scaled.add_argument("--n-iter", type=positive_int, default=None, help="APGD/FAB iterations (AutoAttack: 100)")
    scaled.add_argument("--eot-iter", type=positive_int, default=None, help="EOT samples in 'rand' (AutoAttack: 20)")
    scaled.add_argument("--n-target-classes", type=positive_int, default=None,
                        help="APGD-T/FAB-T targets (AutoAttack: 9)")
    scaled.add_argument("--n-queries", type=positive_int, default=None, help="Square queries (AutoAttack: 5000)")
    parser.add_argument("--estimate", action="store_true",
                        help="print the projected cost (network evaluations, wall time on this device, calibrated on "
                             "the first batch) and exit; without it the estimate is printed before the run unless "
                             "--quiet")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="per-batch results go here; rerunning the same command resumes (default: "
                             "<out>/checkpoints/autoattack_<defense>)")


def config_from_args(args) -> AutoAttackConfig:
    return AutoAttackConfig(norm=args.norm, eps=args.eps, versions=tuple(args.versions), seed=args.seed,
                            batch_size=args.batch_size, rescore_draws=args.rescore, standard_noise=args.standard_noise,
                            n_iter=args.n_iter, eot_iter=args.eot_iter, n_target_classes=args.n_target_classes,
                            n_queries=args.n_queries)


def load_defense(args, classifier: nn.Module, dataset: str = "mnist"):
    """``(model, purifier, info)`` for parsed :func:`add_defense_arguments` options; without ``--prior`` the prior
    shipped for ``dataset`` (loaded only when a purifier needs it)."""
    if args.defense == NO_DEFENSE:
        given = [option for option, value in (("--set", args.set), ("--gradient", args.gradient),
                                              ("--runs", args.runs)) if value is not None]
        if given:  # they configure a purifier: on the bare classifier they would be ignored without a word
            raise ValueError(f"{', '.join(given)}: options of a purifier, and --defense {NO_DEFENSE} has none.")
        return deployed_model(None, classifier), None, {"name": NO_DEFENSE}
    from benchmarks.models import MODELS_DIR, REFERENCE_FILES, load_reference_models
    from benchmarks.results import prior_fields
    from purifiers.priors.loading import load_prior

    overrides = {**speed_settings(args), **parse_overrides(args.set)}
    check_overrides(args.defense, overrides)  # before the prior loads
    prior = load_prior(args.prior, device="cpu") if args.prior else load_reference_models(dataset)[1]
    if args.gradient is not None:
        overrides["gradient"] = args.gradient
    purifier = build_purifier(args.defense, prior, classifier, dataset=dataset, **overrides)
    if args.gradient is None and "exact" in purifier.gradient_modes:
        purifier.set_params(gradient="exact")  # AutoAttack is a white-box attack: differentiate the real computation
    runs = args.runs if args.runs is not None else deployed_runs(args.defense)
    model = deployed_model(purifier, classifier, runs=runs, ensemble=args.ensemble)
    params = {k: _jsonable(getattr(purifier, k, None)) for k in purifier.params}
    info = {"name": args.defense, "purifier": type(purifier).__name__, "params": params, "overrides": overrides,
            "gradient": purifier.gradient,
            "runs": runs, "ensemble": args.ensemble,
            **prior_fields(args.prior or os.path.join(MODELS_DIR, REFERENCE_FILES[dataset][1]))}
    return model, purifier, info


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def estimate_path(out_dir: str, name: str) -> str:
    """Where the estimate of the AutoAttack run of ``name`` is written (by the ``autoattack`` and ``robustbench``
    commands)."""
    from attacks_adaptive.runner import slug

    return os.path.join(out_dir, f"estimate_autoattack_{slug(name)}.json")


def estimate_first(args, shard, model, x, y, config: AutoAttackConfig, name: str, dataset: str, split: str) -> bool:
    """Print (and write to ``<out>/estimate_autoattack_<name>.json``) the projected cost of the run before it starts:
    always with ``--estimate`` (then return True: run nothing), else unless ``--quiet``, on the first shard only, and
    not for a run no larger than its calibration (:func:`benchmarks.harness.cost.calibration_skip_reason`: one line
    says so)."""
    if not (args.estimate or (not args.quiet and (shard is None or shard.index == 0))):
        return False
    from benchmarks.harness.cost import calibration_skip_reason, report_estimate

    path = estimate_path(args.out, name)
    skip = calibration_skip_reason(len(y), [config.iterations()] * len(config.versions), config.batch_size)
    if skip is not None and not args.estimate:
        if os.path.exists(path):  # an earlier run's estimate does not describe this one
            os.remove(path)
        print(skip, flush=True)
        return False
    start = time.time()
    rows = estimate_autoattack(model, x, y, config, defense=name, device=args.device)
    report_estimate(path, rows, dataset, split, time.time() - start, autoattack=asdict(config))
    return args.estimate


def write_autoattack(out_dir: str, result: AutoAttackResult, info: dict, harness: dict, verbose: bool = True) -> dict:
    """``<out_dir>/autoattack_<name>.json``: the rows and meta of one AutoAttack evaluation."""
    config = result.config
    rows = result_rows(result, harness["name"], info.get("gradient"), runs=info.get("runs"),
                       ensemble=info.get("ensemble"))
    meta = collect_meta(harness["dataset"], harness["split"], defense=info,
                        autoattack=asdict(config) | {"versions": list(config.versions)},
                        number_forward_passes=result.number_forward_passes, scaled_down=config.scaled_down,
                        estimate=estimate_summary(estimate_path(out_dir, harness["name"])))
    path = write_results(os.path.join(out_dir, harness["file"]), rows, meta)
    if verbose:
        print(format_table(rows))
        print(f"wrote {path}")
    return {"rows": rows, "meta": meta, "result": result}


def merge(out_dir: str, verbose: bool = True) -> list[dict]:
    """Join the finished shards of every ``python -m benchmarks autoattack --shard i/N --out out_dir`` run found in
    ``out_dir/checkpoints/`` into the results file one process writes."""
    return [write_autoattack(out_dir, collect_autoattack(folder), checkpointed_defense(folder), harness, verbose)
            for folder, harness in saved_harnesses(out_dir, "autoattack")]
