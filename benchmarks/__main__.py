"""Command line: ``python -m benchmarks [--traceback] <command> [options]``; ``python -m benchmarks <command> --help``
for options.

Each command is a module with a ``main(argv)`` function: ``benchmarks.commands.<name>`` (dashes as underscores), or
``benchmarks.studies.<method>`` for the validation studies; the table below maps names to modules.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("benchmarks.commands.quickstart", "the main job on bundled MNIST with the shipped models"),
    "train-classifier": ("benchmarks.commands.train_classifier",
                         "train a reference classifier (--dataset mnist | fashion_mnist)"),
    "train-prior": ("benchmarks.commands.train_prior",
                    "train, resume or export a built-in score prior (--dataset mnist | fashion_mnist)"),
    "attacks": ("benchmarks.commands.attacks", "adaptive attacks and the worst-case table (attacks.json)"),
    "autoattack": ("benchmarks.commands.autoattack", "AutoAttack 'rand' + 'standard' on a purified model, resumable"),
    "masking-check": ("benchmarks.commands.masking_check", "gradient-masking checks (eps sweep, iterations, EOT, "
                      "gradient-free and transfer, BPDA vs exact) on one defense"),
    "merge": ("benchmarks.commands.merge", "join the shards (--shard i/N) of attacks, autoattack, robustbench, reproduce"),
    "robustbench": ("benchmarks.commands.robustbench", "RobustBench-style evaluation writing model_info JSON"),
    "leaderboard": ("benchmarks.commands.leaderboard", "render a folder of model_info JSONs as markdown and HTML"),
    "reproduce": ("benchmarks.commands.reproduce", "paper-versus-ours tables"),
    "estimate": ("benchmarks.commands.estimate", "the cost of the papers' full protocols on their networks (CIFAR-10), "
                 "no checkpoint needed"),
    "speed": ("benchmarks.commands.speed", "network and purification time per image, overhead ratios, speed switches, "
              "memory"),
    "plots": ("benchmarks.commands.plots", "robustness curves, image grids, score-norm histograms"),
    "check-prior": ("benchmarks.commands.check_prior", "a prior file's format, conventions and denoising self-test"),
    "smoke-times": ("benchmarks.commands.smoke_times", "the wall time of every smoke test and example the docs show"),
    "certify": ("benchmarks.commands.certify", "certified l_2 accuracy of denoised smoothing (one-shot or a full "
                "purifier), l_inf by inclusion, and the SmoothAdv bracket"),
    # The validation studies that chose the registry's settings (benchmarks/measured/ holds their results).
    "adp-study": ("benchmarks.studies.adp", "ADP: settings sweep on val, test evaluation in parts, merge, memory"),
    "scoreopt-study": ("benchmarks.studies.scoreopt", "ScoreOpt: tuning on val, test rows, curves, memory"),
    "vpsde-study": ("benchmarks.studies.vpsde", "COUP / DiffPure: t* and lambda sweep on val, test rows, gradients, "
                    "memory"),
    "coup-toy": ("benchmarks.studies.coup_toy", "COUP's 1-D toy experiment (Fig. 3b)"),
}


#: What a user's input or machine causes rather than a bug: bad values, refused or unreadable files and states
#: (ValueError and its subclasses), missing files, a full disk, a missing permission (OSError), a factory's module that
#: is not installed. The command line reports them on one line; any other exception keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, ModuleNotFoundError)


def main(argv=None) -> None:
    """Run the command ``argv[0]`` (default: this process's arguments); errors propagate, for callers in Python (the
    command line reports them: :func:`command_line`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun ... -m benchmarks -- <command>: keeps torchrun from parsing the command's options
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print(__doc__.strip().splitlines()[0] + "\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<{width}}  {text}")
        print("\noption before the command:\n  --traceback  show the full traceback of an error, not its one-line "
              "message")
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"python -m benchmarks: error: unknown command {argv[0]!r}; the commands are listed above")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv)


def command_line(argv=None) -> None:
    """``python -m benchmarks [--traceback] <command> [options]``: :func:`main`, ending on the errors of
    :data:`EXPECTED_ERRORS` with exit status 1 and one line, ``python -m benchmarks <command>: error: <message>`` (as
    argparse ends on a bad option, with status 2); ``--traceback`` raises them instead, for debugging."""
    argv = sys.argv[1:] if argv is None else list(argv)
    show_traceback = False
    while argv[:1] in (["--"], ["--traceback"]):  # either order: torchrun ... -m benchmarks -- --traceback <command>
        show_traceback = show_traceback or argv[0] == "--traceback"
        argv = argv[1:]
    try:
        main(argv)
    except EXPECTED_ERRORS as err:
        if show_traceback:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        sys.exit(f"python -m benchmarks {argv[0]}: error: {message}")


if __name__ == "__main__":
    command_line()
