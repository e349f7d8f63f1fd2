"""The speed switches of :mod:`purifiers.priors.speed` as command-line options, shared by every command that builds a defense
(``attacks``, ``autoattack``, ``robustbench``, ``reproduce``): they become the purifier's ``channels_last=``,
``compile=`` and ``amp=`` settings, recorded with the defense's other settings in the results."""

from __future__ import annotations

from purifiers.priors.speed import AMP_DTYPES


def add_speed_arguments(parser) -> None:
    group = parser.add_argument_group("speed switches (off by default; see `python -m benchmarks speed`)")
    group.add_argument("--channels-last", action="store_true",
                       help="the prior network in channels_last memory order (equal within float rounding)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the prior network (a slow first call; equal within float rounding)")
    group.add_argument("--amp", default=None, choices=sorted(AMP_DTYPES),
                       help="mixed-precision autocast of the prior network, CUDA only (refused on CPU)")


def speed_settings(args) -> dict:
    """The purifier settings of the parsed switches (only those switched on, so results without them are unchanged)."""
    settings = {"channels_last": args.channels_last, "compile": args.compile, "amp": args.amp}
    return {key: value for key, value in settings.items() if value}
