"""``python -m benchmarks merge DIR``: join the finished shards of ``attacks`` and ``autoattack`` runs written into
DIR (``--shard i/N --out DIR``) into the results files one process would have written (:mod:`benchmarks.sharding`)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> None:
    from benchmarks import attacks_run, autoattack_eval

    parser = argparse.ArgumentParser(prog="python -m benchmarks merge", description=__doc__)
    parser.add_argument("folder", help="the --out folder the shards wrote into")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    joined = [attacks_run.merge(args.folder, verbose=not args.quiet), *autoattack_eval.merge(args.folder,
                                                                                            verbose=not args.quiet)]
    if not any(joined):
        raise SystemExit(f"{args.folder} holds no shards of `attacks` or `autoattack` to merge.")
