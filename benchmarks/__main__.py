"""Command line: ``python -m benchmarks <command> [options]``; ``python -m benchmarks <command> --help`` for options.

Each command is a module of this package with a ``main(argv)`` function; the table below maps names to modules.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("benchmarks.quickstart", "the main job on bundled MNIST with the shipped models"),
    "train-classifier": ("benchmarks.train", "train a reference classifier (--dataset mnist | fashion_mnist)"),
    "train-prior": ("benchmarks.train", "train, resume or export a built-in score prior (--dataset mnist | fashion_mnist)"),
    "attacks": ("benchmarks.attacks_run", "adaptive attacks and the worst-case table (attacks.json)"),
    "autoattack": ("benchmarks.autoattack_eval", "AutoAttack 'rand' + 'standard' on a purified model, resumable"),
    "merge": ("benchmarks.merge", "join the shards (--shard i/N) of attacks, autoattack, robustbench, reproduce"),
    "robustbench": ("benchmarks.robustbench_eval", "RobustBench-style evaluation writing model_info JSON"),
    "leaderboard": ("benchmarks.leaderboard", "render a folder of model_info JSONs as markdown and HTML"),
    "reproduce": ("benchmarks.reproduce", "paper-versus-ours tables"),
    "estimate": ("benchmarks.paper_cost", "the cost of the papers' full protocols on their networks (CIFAR-10), no "
                 "checkpoint needed"),
    "speed": ("benchmarks.speed", "network and purification time per image, overhead ratios, speed switches, memory"),
    "plots": ("benchmarks.plots", "robustness curves, image grids, score-norm histograms"),
    "coup-toy": ("benchmarks.coup_toy", "COUP's 1-D toy experiment (Fig. 3b)"),
    "check-prior": ("benchmarks.check_prior", "a prior file's format, conventions and denoising self-test"),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun ... -m benchmarks -- <command>: keeps torchrun from parsing the command's options
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print(__doc__.strip().splitlines()[0] + "\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"\nunknown command {argv[0]!r}")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv)


if __name__ == "__main__":
    main()
