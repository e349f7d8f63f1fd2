"""``python -m benchmarks train-prior [--dataset mnist|fashion_mnist] [options]``: train, resume or export a built-in
score prior (:func:`benchmarks.harness.training.train_prior`). The same command again resumes from its checkpoint;
SIGTERM or SIGINT finishes the step, saves the checkpoint and exports."""

from __future__ import annotations

import json
import os
import signal

from benchmarks.harness.arguments import positive_int, positive_number
from benchmarks.harness.cpu import set_up_cpu_process
from benchmarks.harness.training import (DATASETS, command_line, default_checkpoint, default_output, export_prior,
                                         train_prior, training_parser)


def main(argv: list[str]) -> None:
    parser = training_parser(argv[0])
    parser.add_argument("--minutes", type=positive_number, default=60.0,
                        help="wall-time budget, counting earlier segments of a resumed run")
    parser.add_argument("--max-steps", type=positive_int, default=100_000)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--base-channels", type=positive_int, default=None,
                        help="SmallUNet width (default: 32 for mnist, 32 for fashion_mnist)")
    parser.add_argument("--checkpoint", default=None,
                        help="resumable training state (default <out>.ckpt.pt); resumed from when it exists")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200)
    parser.add_argument("--psnr-n", type=positive_int, default=None,
                        help="first N val and test images for the card's PSNR (default: all)")
    parser.add_argument("--export-only", action="store_true",
                        help="write the checkpoint's EMA weights and card to --out and stop (no training; safe "
                             "while a training run keeps writing the checkpoint)")
    parser.add_argument("--note", default=None, help="free text added to the card (export)")
    args = parser.parse_args(argv[1:])
    print(command_line(argv), flush=True)
    set_up_cpu_process(args.threads)
    out = args.out or default_output(args.dataset, "prior")
    if args.export_only:
        card = export_prior(args.checkpoint or default_checkpoint(out), out, data_dir=args.data_dir,
                            psnr_n=args.psnr_n, command=command_line(argv), note=args.note)
    else:
        stopping = []

        def request_stop(signum, frame):  # finish the step, save the checkpoint, export, exit
            stopping.append(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, request_stop)
        defaults = DATASETS[args.dataset]
        card = train_prior(out, minutes=args.minutes, max_steps=args.max_steps, seed=args.seed,
                           batch_size=args.batch_size, base_channels=args.base_channels or defaults["prior_channels"],
                           checkpoint_every=args.checkpoint_every, verbose=not args.quiet, dataset=args.dataset,
                           data_dir=args.data_dir, checkpoint=args.checkpoint, ema_warmup=defaults["ema_warmup"],
                           psnr_n=args.psnr_n, command=command_line(argv), stop=lambda: bool(stopping), note=args.note)
    print(json.dumps(card["metrics"], indent=2))
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
