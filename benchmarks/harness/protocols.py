"""``python -m benchmarks reproduce``: paper-versus-ours tables, and the methods side by side under every attack.

MNIST (default; bundled data, shipped classifier and prior, the purifier developers' MNIST settings):

* ADP's supplement Table 9 row (MNIST, eps 0.3, "Clf pgd": 98.07% clean / 96.41% robust) against ours;
* COUP's toy experiment (§5.3.2, Fig. 3b) through :mod:`benchmarks.studies.coup_toy`;
* every purifier under every attack: preprocessor-blind PGD, BPDA+EOT, full-gradient PGD+EOT and AutoAttack (the
  harness of :mod:`benchmarks.harness.autoattack`), scored single-shot (what the papers report) and multi-draw (the
  mean over ``draws`` forward passes of the deployed defense), with the worst case over the attacks.

CIFAR-10 (``--dataset cifar10 --data-dir DIR --prior PRIOR --classifier robustbench:Standard``, PRIOR a diffusers
folder or an authors' checkpoint such as score_sde's ``checkpoint_8.pth`` or EDM's ``.pkl``, see
:mod:`purifiers.priors.checkpoints`): the same table with the papers' CIFAR-10 settings (the registry,
:mod:`benchmarks.defenses`) at eps 8/255, against the papers' CIFAR-10 numbers (ADP Tables 2-3, ScoreOpt Table 1, COUP Tables 1 and 3 which also list DiffPure). Nothing is downloaded.

By default the attack settings are scaled down to fit a CPU (fewer iterations and EOT samples, AutoAttack 'rand'
only, small ``n``): every row and table says so, and such numbers are smoke tests, not robustness claims. ``--full``
uses the protocols (blind PGD 40 it.; BPDA+EOT 40 it. x 15 EOT; PGD+EOT 200 it. x 20 EOT; AutoAttack 'rand' and
'standard' with the reported minimum) and is meant for a GPU.

Writes ``<out>/reproduce_<dataset>.json`` (the package's rows; the paper comparison in ``meta["paper_vs_ours"]``),
``.md`` and ``.png``, the attack runner's per-defense files and state (resumable), and for MNIST ``coup_toy/``.

``--shard i/N`` or torchrun splits every attack's batches (``--batch-size`` images each) as ``attacks`` does
(:mod:`benchmarks.harness.sharding`); the results, COUP's toy included, are written by torchrun's rank 0 or by ``python -m
benchmarks merge OUT``, exactly as one process writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from benchmarks.defenses import published
from benchmarks.harness.autoattack import AutoAttackConfig, collect_autoattack, result_rows, run_autoattack
from benchmarks.harness.sharding import Shard, saved_harnesses
from benchmarks.results import collect_meta, write_results, write_worst_case

ATTACKS = ("BlindPGD", "BPDA+EOT", "PGD+EOT", "AutoAttack")  # the attack classes' names

DEFAULT_EPS = {"mnist": 0.3, "cifar10": 8 / 255}


@dataclass
class Protocol:
    """The attack settings of a run: the papers' (``full``) or scaled down to fit a CPU."""

    name: str
    blind_pgd_steps: int
    bpda_steps: int
    bpda_eot: int
    pgd_eot_steps: int
    pgd_eot_eot: int
    autoattack: AutoAttackConfig
    draws: int = 20
    runs: dict = field(default_factory=dict)  # purifications per prediction; defaults: deployed_runs()
    # Step sizes as fractions of eps; None keeps each attack's protocol step (BPDA+EOT eps/4, PGD+EOT Lee & Kim's).
    bpda_step: float | None = None
    pgd_eot_step: float | None = None

    @property
    def scaled_down(self) -> bool:
        return self.name != "full"


def full_protocol(eps: float, seed: int = 0) -> Protocol:
    """Blind PGD 40 it. (ADP's Clf pgd), BPDA+EOT 40 x 15 (ADP / Hill et al.), PGD+EOT 200 x 20 (Lee & Kim),
    AutoAttack 'rand' + 'standard' (DiffPure's minimum), multi-draw scoring with 20 draws, ADP with 10 runs."""
    return Protocol("full", 40, 40, 15, 200, 20, AutoAttackConfig(eps=eps, seed=seed))


def scaled_protocol(eps: float, seed: int = 0) -> Protocol:
    """A few minutes on 2 CPU cores for a handful of images: every count cut down, AutoAttack 'rand' only."""
    return Protocol("scaled-down", 10, 5, 2, 5, 2,
                    AutoAttackConfig(eps=eps, seed=seed, versions=("rand",), n_iter=5, eot_iter=2, rescore_draws=5,
                                     batch_size=16),
                    draws=5, runs={"adp": 2})


# ---------------------------------------------------------------------------------------------------------------------
# Every attack on one defense

def make_attacks(model, eps: float, norm: str, protocol: Protocol, seed: int, names=ATTACKS) -> dict:
    """The attacks_adaptive attacks of ``names`` (AutoAttack runs through its own harness) on ``model``."""
    from attacks_adaptive import BPDAEOT, PGDEOT, BlindPGD

    norm = norm.lower()
    builders = {
        "BlindPGD": lambda: BlindPGD(model, eps=eps, norm=norm, steps=protocol.blind_pgd_steps, seed=seed),
        "BPDA+EOT": lambda: BPDAEOT(model, eps=eps, norm=norm, steps=protocol.bpda_steps, eot=protocol.bpda_eot,
                                    step=_step(protocol.bpda_step, eps), seed=seed),
        "PGD+EOT": lambda: PGDEOT(model, eps=eps, norm=norm, steps=protocol.pgd_eot_steps, eot=protocol.pgd_eot_eot,
                                  step=_step(protocol.pgd_eot_step, eps), gradient="exact", seed=seed),
    }
    return {name: builders[name]() for name in names if name in builders}


def _step(fraction: float | None, eps: float) -> float | None:
    return None if fraction is None else fraction * eps


def defense_part(name: str, model, protocol: Protocol, attacks=ATTACKS) -> dict:
    """Where :func:`evaluate_defense` keeps one defense's state (paths relative to its ``out_dir``) and how its rows
    are labelled: what :func:`defense_rows` reads them back with."""
    from attacks_adaptive.runner import slug

    purifier = getattr(model, "purifier", None)  # None: the undefended classifier
    adaptive = [attack for attack in attacks if attack != "AutoAttack"]  # make_attacks' (AutoAttack: own harness)
    return {"name": name, "stamp": {"protocol": protocol.name, "scaled_down": protocol.scaled_down,
                                    "runs": getattr(model, "runs", None)},
            "attacks": adaptive, "state_dir": os.path.join("attacks_state", slug(name)) if adaptive else None,
            "checkpoint_dir": f"autoattack_{name}" if "AutoAttack" in attacks else None,
            # AutoAttack differentiates the purifier's exact computation when it has one
            "gradient": None if purifier is None else "exact" if "exact" in purifier.gradient_modes
            else purifier.gradient}


def evaluate_defense(name: str, model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, protocol: Protocol,
                     out_dir: str, attacks=ATTACKS, seed: int = 0, verbose: bool = True,
                     shard: Shard | None = None) -> dict:
    """Every attack of ``attacks`` on one defended model (with ``shard``, on that shard's batches only); returns the
    defense's :func:`defense_part`, from which :func:`defense_rows` reads the rows once every batch is done.

    The attacks_adaptive ones run through :func:`attacks_adaptive.run_worst_case` (single-shot and multi-draw scoring,
    per-batch state in ``out_dir``); AutoAttack through :func:`benchmarks.harness.autoattack.run_autoattack` with the
    purifier's exact gradient when it has one."""
    from attacks_adaptive import run_worst_case

    part = defense_part(name, model, protocol, attacks)
    purifier = getattr(model, "purifier", None)
    adaptive = make_attacks(model, eps, norm, protocol, seed, attacks)
    if adaptive:
        run_worst_case(adaptive, x, y, state_dir=os.path.join(out_dir, part["state_dir"]), defense=name, model=model,
                       scorings=("single_shot", "multi_draw"), draws=protocol.draws,
                       batch_size=protocol.autoattack.batch_size, seed=seed, verbose=verbose,
                       shard=shard and shard.pair)
    if part["checkpoint_dir"] is not None:
        previous = purifier.gradient if purifier is not None else None
        if purifier is not None:
            purifier.set_params(gradient=part["gradient"])
        config = dataclasses.replace(protocol.autoattack, eps=eps, norm=_aa_norm(norm), seed=seed)
        try:
            run_autoattack(model, x, y, config, checkpoint_dir=os.path.join(out_dir, part["checkpoint_dir"]),
                           defense_info={"name": name, "runs": part["stamp"]["runs"]}, device=x.device,
                           verbose=verbose, shard=shard)
        finally:
            if purifier is not None:
                purifier.set_params(gradient=previous)
    return part


def defense_rows(out_dir: str, part: dict) -> list[dict]:
    """The rows of one defense whose batches are all done, from its state in ``out_dir`` (the attack runner's, then
    AutoAttack's; every row carries ``protocol``, ``scaled_down`` and ``runs``); writes the runner's
    ``attacks_<defense>.json`` on the way."""
    from attacks_adaptive.runner import collect_worst_case, slug

    rows = []
    if part["state_dir"] is not None:
        report = collect_worst_case(os.path.join(out_dir, part["state_dir"]), part["attacks"])
        write_worst_case(report, os.path.join(out_dir, f"attacks_{slug(part['name'])}.json"),
                         collect_meta("", "", **report["settings"]))
        rows += report["rows"]
    if part["checkpoint_dir"] is not None:
        rows += result_rows(collect_autoattack(os.path.join(out_dir, part["checkpoint_dir"])), part["name"],
                            part["gradient"])
    return [dict(row, **part["stamp"]) for row in rows]


def _aa_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(norm.lower(), norm)


# ---------------------------------------------------------------------------------------------------------------------
# Summaries

def summarize(rows: list[dict]) -> dict:
    """``{defense: {attack: {"clean", "single_shot", "multi_draw"}, "worst-case": {...}}}`` in percent.

    AutoAttack's single-shot number is its reported min(rand, standard); its multi-draw number the lowest re-score
    mean of its versions. "worst-case" is the minimum over the attacks of each protocol (for the attack runner's
    attacks it is per example: its own worst-case row)."""
    table: dict[str, dict] = {}
    for row in rows:
        attack, scoring = row["attack"], str(row.get("scoring"))
        if attack.startswith("worst-case("):
            key = "worst-case (adaptive)"
        elif attack.startswith("AutoAttack min("):
            key = "AutoAttack"
        elif attack.startswith("AutoAttack-") and scoring == "multi_draw":
            key = "AutoAttack"
        elif attack in ATTACKS:
            key = attack
        else:
            continue
        if scoring not in ("single_shot", "multi_draw"):
            continue
        cell = table.setdefault(row["defense"], {}).setdefault(key, {})
        cell["clean"] = 100 * row["clean_acc"]
        cell[scoring] = min(cell.get(scoring, 101.0), 100 * row["robust_acc"])
    for attacks in table.values():
        for scoring in ("single_shot", "multi_draw"):
            values = [v[scoring] for k, v in attacks.items() if scoring in v]
            if values:
                attacks.setdefault("worst-case", {})[scoring] = min(values)
    return table


def paper_vs_ours(dataset: str, summary: dict, protocol: Protocol, n: int) -> list[dict]:
    """The papers' numbers on ``dataset`` (from the registry) beside ours, for the defenses in ``summary``."""
    out = []
    for name, ref in published(dataset):
        if name not in summary:
            continue
        ours = summary.get(name, {})
        cell = ours.get(ref.attack, {})
        out.append(dict(defense=name, attack=ref.attack, clean=ref.clean, robust=ref.robust, source=ref.source,
                        ours_clean=cell.get("clean"), ours_robust=cell.get("single_shot"),
                        ours_multi_draw=cell.get("multi_draw"), ours_worst_case=ours.get("worst-case", {}).get(
                            "single_shot"), protocol=protocol.name, n=n))
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def render_markdown(dataset: str, comparison: list[dict], summary: dict, protocol: Protocol, n: int, eps: float,
                    toy: dict | None) -> str:
    caveat = ("**Scaled-down settings** (fewer iterations and EOT samples, small n): smoke-test numbers, not "
              "robustness claims; `--full` runs the protocols." if protocol.scaled_down else "Full protocols.")
    lines = [f"# Paper versus ours: {dataset}, eps {eps:.4g}, n = {n}", "", caveat, "",
             "| defense | attack | paper clean % | paper robust % | ours clean % | ours robust % (single-shot) | "
             "ours multi-draw % | ours worst case over attacks % | source |", "|---" * 9 + "|"]
    for c in comparison:
        lines.append(f"| {c['defense']} | {c['attack']} | {c['clean']:.2f} | {c['robust']:.2f} | "
                     f"{_pct(c['ours_clean'])} | {_pct(c['ours_robust'])} | {_pct(c['ours_multi_draw'])} | "
                     f"{_pct(c['ours_worst_case'])} | {c['source']} |")
    lines += ["", "## Every method under every attack (robust %: single-shot / multi-draw)", "", summary_table(summary),
              "", f"Settings: {json.dumps(protocol_dict(protocol))}", ""]
    if toy is not None:
        lines += ["## COUP toy experiment (§5.3.2, Fig. 3b): label flip probability", "",
                  "Paper: guidance keeps the label under small or no classifier noise; under high noise an "
                  "appropriate lambda must be chosen.", "",
                  "| noise level c | flip prob. at lambda=0 | lowest flip prob. (lambda) |", "|---|---|---|"]
        for c in sorted({r["noise_level"] for r in toy["results"]}):
            rs = [r for r in toy["results"] if r["noise_level"] == c]
            base = [f"{r['flip_probability']:.4f}" for r in rs if r["guidance_scale"] == 0.0]
            best = min(rs, key=lambda r: r["flip_probability"])
            lines.append(f"| {c:g} | {base[0] if base else '-'} | "
                         f"{best['flip_probability']:.4f} ({best['guidance_scale']:g}) |")
        lines += ["", f"{toy['settings']['runs']:,} paths per setting; see coup_toy/coup_toy.png.", ""]
    return "\n".join(lines)


def summary_table(summary: dict) -> str:
    """Markdown: one row per defense, its clean accuracy and per attack "single-shot / multi-draw" robust %."""
    columns = [a for a in (*ATTACKS, "worst-case") if any(a in v for v in summary.values())]
    lines = ["| defense | clean % | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for defense, attacks in summary.items():
        clean = next((v["clean"] for v in attacks.values() if "clean" in v), None)
        cells = [f"{_pct(attacks.get(a, {}).get('single_shot'))} / {_pct(attacks.get(a, {}).get('multi_draw'))}"
                 for a in columns]
        lines.append(f"| {defense} | {_pct(clean)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_dict(protocol: Protocol) -> dict:
    d = dataclasses.asdict(protocol)
    d["autoattack"]["versions"] = list(d["autoattack"]["versions"])
    return d


def plot_summary(summary: dict, comparison: list[dict], path: str, title: str) -> str:
    """Grouped bars: per defense, clean and each attack's single-shot robust accuracy; paper numbers as markers."""
    from benchmarks.harness.plotting import pyplot, save_figure

    plt = pyplot()
    defenses = list(summary)
    columns = ["clean"] + [a for a in (*ATTACKS, "worst-case") if any(a in v for v in summary.values())]
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(1.9 * len(defenses) + 3, 3.8))
    for j, column in enumerate(columns):
        heights = []
        for defense in defenses:
            cells = summary[defense]
            if column == "clean":
                heights.append(next((v["clean"] for v in cells.values() if "clean" in v), np.nan))
            else:
                heights.append(cells.get(column, {}).get("single_shot", np.nan))
        ax.bar(np.arange(len(defenses)) + (j - (len(columns) - 1) / 2) * width, heights, width, label=column)
    for c in comparison:
        if c["defense"] in defenses:
            i = defenses.index(c["defense"])
            j = columns.index(c["attack"]) if c["attack"] in columns else 0
            ax.plot(i + (j - (len(columns) - 1) / 2) * width, c["robust"], "k*", ms=9)
    ax.plot([], [], "k*", label="paper (robust)")
    ax.set_xticks(range(len(defenses)), defenses)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def write_reproduce(out_dir: str, harness: dict, start: float, verbose: bool = True) -> dict:
    """``reproduce_<dataset>.json``, ``.md`` and ``.png`` (and for MNIST COUP's toy) from every defense's finished state
    and the run's harness alone, so one process, torchrun's rank 0 and ``merge`` write the same files; ``start``: when
    this process began (the meta's ``seconds``)."""
    saved = harness["protocol"]
    protocol = Protocol(**{**saved, "autoattack": AutoAttackConfig(**saved["autoattack"])})
    dataset, n, eps = harness["dataset"], harness["n"], harness["eps"]
    rows = [row for part in harness["defenses"] for row in defense_rows(out_dir, part)]
    toy = None
    if dataset == "mnist" and harness["coup_toy_runs"] > 0:
        from benchmarks.studies.coup_toy import run_toy

        toy = run_toy(os.path.join(out_dir, "coup_toy"), runs=harness["coup_toy_runs"], seed=harness["seed"],
                      verbose=verbose)
    summary = summarize(rows)
    comparison = paper_vs_ours(dataset, summary, protocol, n)
    base = os.path.join(out_dir, f"reproduce_{dataset}")
    meta = collect_meta(dataset, f"test[:{n}]", protocol=protocol_dict(protocol), eps=eps,
                        scaled_down=protocol.scaled_down, paper_vs_ours=comparison, summary=summary,
                        seconds=time.time() - start)
    write_results(base + ".json", rows, meta)
    markdown = render_markdown(dataset, comparison, summary, protocol, n, eps, toy)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    title = f"{dataset}, eps {eps:.4g}, n = {n}" + (" [scaled-down: not a robustness claim]"
                                                    if protocol.scaled_down else "")
    plot_summary(summary, comparison, base + ".png", title)
    if verbose:
        print(markdown)
        print(f"wrote {base}.json, .md and .png")
    return {"rows": rows, "summary": summary, "paper_vs_ours": comparison, "markdown": markdown}


def merge(out_dir: str, verbose: bool = True) -> list[dict]:
    """Join the finished shards of every ``python -m benchmarks reproduce --shard i/N --out out_dir`` run into the
    files one process writes."""
    start = time.time()
    return [write_reproduce(out_dir, harness, start, verbose) for _, harness in saved_harnesses(out_dir, "reproduce")]
