"""``python -m benchmarks train-classifier [--dataset mnist|fashion_mnist] [options]``: train a reference classifier
(:func:`benchmarks.harness.training.train_classifier`) and write it with its card."""

from __future__ import annotations

import json
import os

from benchmarks.harness.arguments import positive_int
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.harness.training import DATASETS, command_line, default_output, train_classifier, training_parser


def main(argv: list[str]) -> None:
    parser = training_parser(argv[0])
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: 30 (mnist), 24 (fashion_mnist)")
    args = parser.parse_args(argv[1:])
    print(command_line(argv), flush=True)
    set_up_cpu_process(args.threads)
    out = args.out or default_output(args.dataset, "classifier")
    epochs = args.epochs or DATASETS[args.dataset]["classifier_epochs"]
    card = train_classifier(out, epochs=epochs, seed=args.seed, verbose=not args.quiet, dataset=args.dataset,
                            data_dir=args.data_dir, command=command_line(argv))
    print(json.dumps(card["metrics"], indent=2))
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
