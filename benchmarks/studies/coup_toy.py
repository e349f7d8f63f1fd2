"""``python -m benchmarks coup-toy --out DIR``: COUP's 1-D toy experiment (paper section 5.3.2, Fig. 3b).

Data: the uniform mixture of N(-0.5, 1) (label 0) and N(0.5, 1) (label 1). Its VP-SDE marginals stay a mixture of unit
Gaussians, ``p_t = (N(-m_t, 1) + N(m_t, 1)) / 2`` with ``m_t = 0.5 sqrt(alpha_bar(t))``, so the score is exact:
``s(x, t) = -x + m_t tanh(m_t x)``. The noisy classifier (section 5.3.2) is ``p(y=i | x) = p_i(x) / (p_0(x) + p_1(x)
+ c n(x))`` with ``p_i`` the class densities, ``n(x) = sin(100 x) / 100`` and noise level ``c``; its guidance
``d/dx log max_y p(y|x)`` is written out in :func:`noisy_classifier_guidance`.

Every run starts at ``x = 0.2`` at ``t* = 0.1`` and follows COUP's guided reverse SDE (the package's solver,
:func:`purifiers.vpsde.solve_reverse_vp`) with Euler steps of 1e-3 down to t = 0; all runs are one tensor. The label
flip probability is ``P(x_0 < 0)``, estimated from ``runs`` paths (100,000 as in the paper), with a 95% Wilson
interval. Writes ``DIR/coup_toy.json`` and ``DIR/coup_toy.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from tqdm import tqdm

from benchmarks.harness.arguments import non_negative_int, non_negative_number, positive_int
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.results import write_json
from purifiers.conventions import VPSchedule
from purifiers.vpsde import brownian_increments, solve_reverse_vp, time_grid

CLASS_MEANS = (-0.5, 0.5)
X_START = 0.2
T_STAR = 0.1
DT = 1e-3
DEFAULT_NOISE_LEVELS = (0.0, 1.0, 2.0, 5.0, 10.0)
DEFAULT_LAMBDAS = tuple(float(v) for v in range(11))
_SCHEDULE = VPSchedule()


def mixture_score(x: torch.Tensor, t: float) -> torch.Tensor:
    """Exact score of the VP marginal of the toy mixture: ``-x + m_t tanh(m_t x)``, ``m_t = 0.5 sqrt(alpha_bar(t))``."""
    m = CLASS_MEANS[1] * math.exp(0.5 * _SCHEDULE.log_alpha_bar(t))
    return -x + m * torch.tanh(m * x)


def _normal_density(x: torch.Tensor, mean: float) -> torch.Tensor:
    return torch.exp(-0.5 * (x - mean) ** 2) / math.sqrt(2.0 * math.pi)


def noisy_classifier_probs(x: torch.Tensor, noise_level: float) -> torch.Tensor:
    """``p(y=i | x) = p_i(x) / (p_0(x) + p_1(x) + c sin(100 x) / 100)`` for i = 0, 1: shape ``(*x.shape, 2)``."""
    densities = torch.stack([_normal_density(x, m) for m in CLASS_MEANS], dim=-1)
    return densities / (densities.sum(-1, keepdim=True) + noise_level * torch.sin(100.0 * x)[..., None] / 100.0)


def noisy_classifier_guidance(x: torch.Tensor, noise_level: float) -> torch.Tensor:
    """``d/dx log max_y p(y | x)`` of :func:`noisy_classifier_probs`, in closed form.

    The denominator is shared by both classes, so the argmax is the larger density (label 1 for x >= 0), and
    ``log max_y p = log p_k(x) - log(p_0 + p_1 + c n)``, whose derivative is
    ``-(x - mu_k) - (p_0' + p_1' + c cos(100 x)) / (p_0 + p_1 + c n)`` with ``p_i' = -(x - mu_i) p_i``.
    """
    p0, p1 = (_normal_density(x, m) for m in CLASS_MEANS)
    denominator = p0 + p1 + noise_level * torch.sin(100.0 * x) / 100.0
    d_denominator = -(x - CLASS_MEANS[0]) * p0 - (x - CLASS_MEANS[1]) * p1 + noise_level * torch.cos(100.0 * x)
    mu_k = torch.where(x >= 0, CLASS_MEANS[1], CLASS_MEANS[0])
    return -(x - mu_k) - d_denominator / denominator


def flip_probability(guidance_scale: float, noise_level: float, runs: int = 100_000, seed: int = 0,
                     t_star: float = T_STAR, dt: float = DT) -> float:
    """Fraction of ``runs`` guided reverse-SDE paths from ``x = 0.2`` that end below 0 (label flipped)."""
    grid = time_grid(t_star, 0.0, round(t_star / dt))
    generator = torch.Generator().manual_seed(seed)
    increments = brownian_increments((runs,), grid, generator, dtype=torch.float64)
    x = torch.full((runs,), X_START, dtype=torch.float64)
    out = solve_reverse_vp(x, grid, increments, _SCHEDULE, mixture_score,
                           lambda v: noisy_classifier_guidance(v, noise_level), guidance_scale)
    return float((out < 0).double().mean())


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def run_toy(out_dir: str, runs: int = 100_000, noise_levels=DEFAULT_NOISE_LEVELS, lambdas=DEFAULT_LAMBDAS,
            seed: int = 0, verbose: bool = True) -> dict:
    """Flip probability for every (noise level c, lambda); writes ``coup_toy.json`` and ``coup_toy.png``."""
    start = time.time()
    results = []
    settings = [(c, lam) for c in noise_levels for lam in lambdas]
    for c, lam in tqdm(settings, desc="coup-toy", disable=not verbose):
        p = flip_probability(lam, c, runs=runs, seed=seed)
        low, high = wilson_interval(p, runs)
        results.append({"noise_level": c, "guidance_scale": lam, "flip_probability": p, "ci95": [low, high]})
    data = {"experiment": "COUP section 5.3.2 / Fig. 3b toy: label flip probability P(x_0 < 0)",
            "settings": {"mixture": "0.5 N(-0.5, 1) + 0.5 N(0.5, 1)", "x_start": X_START, "t_star": T_STAR, "dt": DT,
                         "t_end": 0.0, "runs": runs, "seed": seed, "noise": "n(x) = sin(100 x) / 100",
                         "score": "exact VP-marginal score of the mixture",
                         "solver": "purifiers.vpsde (Euler-Maruyama)",
                         "same_brownian_paths_for_every_setting": True},
            "results": results, "seconds": time.time() - start}
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "coup_toy.json")
    write_json(json_path, data)
    png_path = os.path.join(out_dir, "coup_toy.png")
    plot_toy(data, png_path)
    if verbose:
        for c in noise_levels:
            row = [r for r in results if r["noise_level"] == c]
            print(f"c={c:g}: " + "  ".join(f"l={r['guidance_scale']:g}:{r['flip_probability']:.4f}" for r in row))
        print(f"wrote {json_path} and {png_path}")
    return data


def plot_toy(data: dict, path: str) -> None:
    from benchmarks.harness.plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in sorted({r["noise_level"] for r in data["results"]}):
        rows = [r for r in data["results"] if r["noise_level"] == c]
        lam = [r["guidance_scale"] for r in rows]
        ax.plot(lam, [r["flip_probability"] for r in rows], marker="o", ms=3, label=f"c = {c:g}")
        ax.fill_between(lam, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows], alpha=0.2)
    ax.set_xlabel("guidance weight $\\lambda$")
    ax.set_ylabel("label flip probability $P(x_0 < 0)$")
    ax.set_title(f"COUP toy (Fig. 3b): start x = {X_START} at t* = {T_STAR}, {data['settings']['runs']:,} runs")
    ax.legend(title="noise level")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks coup-toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/vpsde", help="output folder (coup_toy.json, coup_toy.png)")
    parser.add_argument("--runs", type=positive_int, default=100_000,
                        help="simulated paths per setting (paper: 100,000)")
    parser.add_argument("--noise-levels", type=non_negative_number, nargs="+", default=list(DEFAULT_NOISE_LEVELS))
    parser.add_argument("--lambdas", type=non_negative_number, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    set_up_cpu_process(1)
    run_toy(args.out, runs=args.runs, noise_levels=args.noise_levels, lambdas=args.lambdas, seed=args.seed,
            verbose=not args.quiet)
