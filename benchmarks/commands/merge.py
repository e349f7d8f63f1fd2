"""``python -m benchmarks merge DIR``: join the finished shards of the ``attacks``, ``autoattack``, ``robustbench`` and
``reproduce`` runs written into DIR (``--shard i/N --out DIR``) into the results files one process would have written
(:mod:`benchmarks.harness.sharding`): attacks.json and attacks_<defense>.json, autoattack_<defense>.json, the model_info entry
and robustbench_<name>.json, reproduce_<dataset>.json/.md/.png. A run with batches missing is named, not written."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> None:
    from benchmarks.harness import adaptive, autoattack, protocols, robustbench
    from benchmarks.harness.arguments import existing_path

    parser = argparse.ArgumentParser(prog="python -m benchmarks merge", description=__doc__)
    parser.add_argument("folder", type=existing_path, help="the --out folder the shards wrote into")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv[1:])
    verbose = not args.quiet
    joined = [adaptive.merge(args.folder, verbose), *autoattack.merge(args.folder, verbose),
              *robustbench.merge(args.folder, verbose), *protocols.merge(args.folder, verbose)]
    if not any(joined):
        raise ValueError(f"{args.folder} holds no shards of `attacks`, `autoattack`, `robustbench` or `reproduce` to "
                         "merge.")
