"""``python -m benchmarks robustbench``: RobustBench's evaluation steps with AutoAttack 'rand', writing model_info JSON.

robustbench 1.1.1's ``benchmark()`` cannot run here: it calls the GitHub AutoAttack API (pyautoattack's differs) and
hard-codes ``version='standard'``. This command performs its steps itself: load the first ``n`` test images (CIFAR-10/100 through robustbench's own loaders from a local ``--data-dir``;
MNIST from the bundled data), the clean accuracy as ``robustbench.utils.clean_accuracy`` computes it (one pass of the
deployed defense per image; here the AutoAttack step's clean part, with purification noise seeded per batch), then
the AutoAttack step of :mod:`benchmarks.harness.autoattack` ('rand' + 'standard' with fixed noise, the minimum reported,
multi-draw re-score), and writes ``<out>/model_info/<dataset>/<threat_model>/<name>.json`` in RobustBench's schema (the fields of
``robustbench.utils.ModelInfo`` plus the leaderboard's ``external`` and ``unreliable``):

* ``eps`` as RobustBench writes it ("8/255", "0.5", "0.3"), accuracies as percentage strings ("91.23");
* ``number_forward_passes``: network evaluations per prediction of the deployed defense, measured (prior forward and
  backward passes plus classifier passes; RobustBench counts ensemble members the same way);
* ``autoattack_acc``: min(rand, standard) of AutoAttack's own robust accuracy (DiffPure's protocol);
* ``external``: the best known (lowest) robust accuracy: the minimum of the per-point worst case of the AutoAttack
  step (flags and every re-score draw) and, when ``--attacks-json`` is given, the adaptive attacks' rows for this
  defense (``python -m benchmarks attacks``); the footnote names which one it is;
* ``unreliable: true`` for a purifier (randomized, test-time optimisation) and a ``footnote`` stating the protocol
  (randomized, attacks, EOT, iterations, n, seeds, gradient mode, scaled-down settings).

RobustBench's leaderboard accepts no randomized or test-time-optimisation defense: this is a
RobustBench-*style* entry for a local leaderboard (``python -m benchmarks leaderboard``) or a "New Model(s)" issue that
states how it was evaluated.

``--shard i/N`` or torchrun splits the images as ``autoattack`` does (:mod:`benchmarks.harness.sharding`); ``python -m
benchmarks merge OUT`` then writes the entry one process would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict

import torch

from attacks_adaptive.rows import threat_model_name
from benchmarks.defenses import NO_DEFENSE
from benchmarks.harness.autoattack import checkpointed_defense, collect_autoattack, estimate_path, result_rows
from benchmarks.harness.cost import estimate_summary
from benchmarks.harness.rb_compat import import_robustbench
from benchmarks.harness.sharding import saved_harnesses
from benchmarks.results import collect_meta, format_table, make_row, read_results, write_json, write_results

DATASETS = ("mnist", "cifar10", "cifar100")
LEADERBOARD_FIELDS = ("external", "unreliable")  # in the leaderboard's files, not in ModelInfo


def model_info_fields() -> tuple[str, ...]:
    """RobustBench's field set: ``robustbench.utils.ModelInfo``'s fields, then the leaderboard's extra ones."""
    import_robustbench()
    from robustbench.utils import ModelInfo

    return tuple(f.name for f in dataclasses.fields(ModelInfo)) + LEADERBOARD_FIELDS


def format_eps(eps: float) -> str:
    """``eps`` as RobustBench writes it: a short decimal when there is one ("0.3", "0.5"), else "k/255"."""
    short = repr(float(eps))
    if len(short) <= 5:
        return short
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def format_accuracy(fraction: float) -> str:
    """A fraction as RobustBench's percentage string (``update_json``'s ``str(round(100 x, 2))``)."""
    return str(round(fraction * 100, 2))


def load_data(dataset: str, n: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images: CIFAR-10/100 through robustbench's loaders (local files only), MNIST bundled."""
    if dataset == "mnist":
        from benchmarks.data import load_mnist

        x, y = load_mnist("test", n=n)
        return torch.from_numpy(x), torch.from_numpy(y)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
    if data_dir is None:
        raise ValueError(f"{dataset} needs --data-dir: the folder holding the extracted official archive.")
    import torchvision

    # robustbench's loaders pass download=True to torchvision: open the local copy with download=False first (it checks
    # the md5 of every official file), so nothing is ever downloaded and only the official pickles are read.
    dataset_class = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        dataset_class(root=data_dir, train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(f"no verified {dataset} copy in {data_dir}: expected the extracted official archive "
                                f"({dataset_class.base_folder}/ with matching md5s). Nothing is downloaded.") from err
    import_robustbench()
    from robustbench import data

    loader = data.load_cifar10 if dataset == "cifar10" else data.load_cifar100
    return loader(n_examples=n, data_dir=data_dir)


def adaptive_worst_case(path: str, defense: str, eps: float, norm: str) -> dict | None:
    """The row of ``attacks.json`` (the package's results shape) with the lowest robust accuracy for ``defense`` at this
    ``eps`` and ``norm``, or ``None`` when it holds none."""
    norm = threat_model_name(norm)
    rows = [r for r in read_results(path)["rows"]
            if str(r.get("defense", "")).lower() == defense.lower() and r.get("robust_acc") is not None
            and r.get("eps") is not None and abs(float(r["eps"]) - eps) < 1e-6
            and threat_model_name(r.get("norm") or norm) == norm]
    return min(rows, key=lambda r: r["robust_acc"]) if rows else None


def footnote(result, info: dict, gradient: str | None, external_source: str) -> str:
    """The protocol, in words, for the model_info ``footnote``."""
    cfg, k = result.config, result.config.rescore_draws
    parts = []
    if info["name"] != NO_DEFENSE:
        parts.append(f"Randomized defense: {info['name']} purification ({info.get('purifier')}, {info.get('runs')} "
                     f"run(s) per prediction, {info.get('ensemble')} ensemble) in front of the classifier; gradient "
                     f"mode '{gradient}'.")
    versions = []
    if "rand" in result.versions:
        versions.append(f"version='rand' (APGD-CE + APGD-DLR, iterations {cfg.iterations()}, EOT {cfg.eot('rand')})")
    if "standard" in result.versions:
        noise = "" if info["name"] == NO_DEFENSE else ("; purification noise fixed per call by seed"
                                                       if cfg.standard_noise == "fixed" else
                                                       "; purification noise seeded per batch")
        versions.append(f"version='standard' (APGD-CE, APGD-T, FAB-T, Square{noise})")
    parts.append(f"AutoAttack (pyautoattack) {' and '.join(versions)}; autoattack_acc is the minimum over the versions "
                 f"(DiffPure's protocol), each from one forward pass per point.")
    parts.append(f"n={result.n} (first test images), seed={cfg.seed}, eps={format_eps(cfg.eps)} {cfg.norm}.")
    parts.append(f"Re-scoring the adversarial examples with {k} forward passes: mean "
                 + ", ".join(f"{v} {format_accuracy(r.rescore.mean().item())}%" for v, r in result.versions.items())
                 + "; worst case " + ", ".join(f"{v} {format_accuracy((r.rescore == 1.0).float().mean().item())}%"
                                               for v, r in result.versions.items()) + ".")
    parts.append(f"external: {external_source}.")
    parts.append("number_forward_passes counts prior forward and backward passes and classifier passes per prediction.")
    if cfg.scaled_down:
        settings = {"iterations": cfg.n_iter, "EOT": cfg.eot_iter, "target classes": cfg.n_target_classes,
                    "Square queries": cfg.n_queries}
        parts.append("SCALED-DOWN settings (" + ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
                     + "): a smoke run, not a robustness claim.")
    return " ".join(parts)


def model_info(result, *, name: str, dataset: str, info: dict, gradient: str | None, clean_acc: float,
               architecture: str, attacks_json: str | None = None, link: str | None = None,
               authors: str = "", venue: str = "", reported: float | None = None) -> dict:
    """The model_info dictionary, every field of :func:`model_info_fields` present. ``name``, ``link``, ``authors``
    and ``venue`` describe the paper (the registry, :mod:`benchmarks.defenses`, holds them for this package's
    purifiers)."""
    cfg = result.config
    external = result.worst_case().float().mean().item()
    source = (f"per-point worst case of the AutoAttack step (every version's flags and all {cfg.rescore_draws} "
              "re-score draws)")
    adaptive = adaptive_worst_case(attacks_json, info["name"], cfg.eps, cfg.norm) if attacks_json else None
    if adaptive is not None and adaptive["robust_acc"] < external:
        external = adaptive["robust_acc"]
        source = (f"adaptive attack {adaptive['attack']} (gradient {adaptive.get('gradient')}, scoring "
                  f"{adaptive.get('scoring')}, n={adaptive.get('n')}) from {os.path.basename(attacks_json)}")
    entry = {field: None for field in model_info_fields()}
    entry.update(
        link=link, name=name, authors=authors, additional_data=False,
        number_forward_passes=round(result.number_forward_passes),
        dataset=dataset, venue=venue, architecture=architecture, eps=format_eps(cfg.eps),
        clean_acc=format_accuracy(clean_acc), reported=None if reported is None else format_accuracy(reported),
        autoattack_acc=format_accuracy(result.reported_accuracy()),
        footnote=footnote(result, info, gradient, source), external=format_accuracy(external),
        unreliable=info["name"] != NO_DEFENSE)
    return entry


def write_model_info(entry: dict, out: str, threat_model: str, name: str) -> str:
    """``<out>/model_info/<dataset>/<threat_model>/<name>.json`` (the layout ``update_json`` uses)."""
    return write_json(os.path.join(out, "model_info", entry["dataset"], threat_model, f"{name}.json"), entry)


def write_robustbench(out_dir: str, checkpoint_dir: str, harness: dict, verbose: bool = True) -> dict:
    """The model_info entry and ``robustbench_<name>.json`` (the rows) of a finished run, from its checkpoint folder
    and harness alone, so one process, torchrun's rank 0 and ``merge`` write the same files."""
    result = collect_autoattack(checkpoint_dir)
    info = checkpointed_defense(checkpoint_dir)
    config, clean = result.config, result.clean_accuracy()
    entry = model_info(result, dataset=harness["dataset"], info=info, gradient=harness["gradient"], clean_acc=clean,
                       architecture=harness["architecture"], attacks_json=harness["attacks_json"], **harness["paper"])
    path = write_model_info(entry, out_dir, harness["threat_model"], harness["name"])
    rows = [make_row(defense=info["name"], attack="none", gradient=None, scoring="single_shot",
                     note="one pass of the deployed defense per image (as robustbench.utils.clean_accuracy)",
                     eps=None, norm=None, n=result.n, seed=config.seed, clean_acc=clean, robust_acc=None,
                     nfe_per_image=result.number_forward_passes, seconds=None)]
    rows += result_rows(result, info["name"], harness["gradient"], runs=info.get("runs"), ensemble=info.get("ensemble"))
    meta = collect_meta(harness["dataset"], f"test[:{result.n}]", defense=info, model_info=path,
                        estimate=estimate_summary(estimate_path(out_dir, harness["name"])),
                        autoattack=asdict(config) | {"versions": list(config.versions)}, scaled_down=config.scaled_down)
    rows_path = write_results(os.path.join(out_dir, f"robustbench_{harness['name']}.json"), rows, meta)
    if verbose:
        print(format_table(rows))
        print(json.dumps(entry, indent=2))
        print(f"wrote {path} and {rows_path}")
    return {"model_info": entry, "path": path, "rows": rows, "result": result}


def merge(out_dir: str, verbose: bool = True) -> list[dict]:
    """Join the finished shards of every ``python -m benchmarks robustbench --shard i/N --out out_dir`` run found in
    ``out_dir/checkpoints/`` into the files one process writes."""
    return [write_robustbench(out_dir, folder, harness, verbose)
            for folder, harness in saved_harnesses(out_dir, "robustbench")]
