"""``python -m benchmarks certify``: certified l_2 accuracy of denoised smoothing (one-shot or a full purifier), the
implied l_inf bound, and with ``--bracket`` the SmoothAdv attack on the same smoothed classifier; the harness is
:mod:`benchmarks.harness.certification`."""

from __future__ import annotations

import argparse

from benchmarks.harness import certification
from benchmarks.harness.arguments import (defense_name, existing_path, non_negative_int, positive_int, positive_number,
                                          prior_source)
from benchmarks.harness.certification import DEFAULT_LINF_EPS, DEFAULT_RADII, DENOISERS, CertifySettings
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.harness.sharding import add_shard_argument, current_shard
from benchmarks.harness.switches import add_speed_arguments, speed_settings


def _alpha(text: str) -> float:
    value = positive_number(text)
    if not value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text!r}")
    return value


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks certify", description=certification.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/certify", help="output folder")
    parser.add_argument("--denoiser", default="one-shot", choices=DENOISERS,
                        help="one-shot denoising at each sigma (Carlini et al. 2023), or the full purifier of "
                             "--defense")
    parser.add_argument("--defense", type=defense_name(bare=False), default=None,
                        help="with --denoiser full: adp, scoreopt, coup, diffpure or a factory 'module:function'")
    parser.add_argument("--sigmas", nargs="+", type=positive_number, default=[0.25, 0.5, 1.0],
                        help="smoothing noise levels in [0, 1] pixel units")
    parser.add_argument("--n0", type=positive_int, default=100, help="noise draws that select the class")
    parser.add_argument("--n", type=positive_int, default=10_000, help="noise draws that bound p_A")
    parser.add_argument("--alpha", type=_alpha, default=0.001, help="the certificate's failure probability")
    parser.add_argument("--n-images", type=positive_int, default=100, help="the first n images of the split")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist", "fashion-mnist"))
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--data-dir", type=existing_path, default=None, help="Fashion-MNIST's idx files")
    parser.add_argument("--prior", type=prior_source, default=None,
                        help="prior file (default: the one shipped for --dataset)")
    parser.add_argument("--radii", nargs="+", type=positive_number, default=list(DEFAULT_RADII),
                        help="l_2 radii of the table (and of the bracket's attacks)")
    parser.add_argument("--linf-eps", type=positive_number, default=DEFAULT_LINF_EPS,
                        help="l_inf radius whose certified accuracy the l_2 certificate implies (default 8/255)")
    parser.add_argument("--bracket", action="store_true",
                        help="also attack the smoothed classifier with SmoothAdv at each radius")
    parser.add_argument("--bracket-n", type=positive_int, default=None,
                        help="noise draws of PREDICT at the clean and attacked points (default: --n)")
    parser.add_argument("--attack-steps", type=positive_int, default=20)
    parser.add_argument("--attack-samples", type=positive_int, default=8, help="SmoothAdv's noise draws per step")
    parser.add_argument("--attack-gradient", default="exact", help="the denoiser's gradient mode (exact, bpda, ...)")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="noisy images per network call")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 on a shared machine: more threads than free cores stall)")
    parser.add_argument("--quiet", action="store_true")
    add_shard_argument(parser)
    parser.add_argument("--estimate", action="store_true",
                        help="print the projected cost (calibrated on one image with a small n) and exit; without "
                             "it the estimate is printed before the run unless --quiet")
    add_speed_arguments(parser)
    args = parser.parse_args(argv[1:])
    settings = CertifySettings(dataset=args.dataset.replace("-", "_"), sigmas=tuple(args.sigmas), n0=args.n0, n=args.n,
                               alpha=args.alpha, n_images=args.n_images, denoiser=args.denoiser, defense=args.defense,
                               seed=args.seed, split=args.split, radii=tuple(args.radii), linf_eps=args.linf_eps,
                               bracket=args.bracket, bracket_n=args.bracket_n, attack_steps=args.attack_steps,
                               attack_samples=args.attack_samples, attack_gradient=args.attack_gradient,
                               batch_size=args.batch_size, speed=speed_settings(args))
    settings.check()
    set_up_cpu_process(args.threads)
    shard = current_shard(args.shard)
    first_shard = shard is None or shard.index == 0
    certification.run_certification(args.out, settings, prior_path=args.prior, data_dir=args.data_dir,
                                    verbose=not args.quiet, shard=shard,
                                    estimate="only" if args.estimate else
                                    "first" if not args.quiet and first_shard else None)
