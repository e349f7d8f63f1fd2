"""AutoAttack 'rand' on a purified model, through the purifier's exact gradient, with the multi-draw re-score.

Run: ``python docs/examples/autoattack_rand.py [--out DIR] [--n 4]`` (well under a minute on 2 CPU cores).

The protocol is AutoAttack's 'rand' version (APGD-CE then APGD-DLR with EOT) on the deployed randomized defense; its
adversarial examples are then re-scored with several forward passes, since AutoAttack decides each point from one
stochastic pass. Here it is scaled down (1 iteration, EOT 1, 2 re-score draws, ADP with one purification per
prediction instead of its 10-run ensemble), and the rows say ``scaled_down``. The full protocol:
``python -m benchmarks autoattack --defense adp --n 512 --device cuda --out results`` (docs/autoattack.md).
"""

import argparse
import tempfile

import torch

from benchmarks import AutoAttackConfig, defense, deployed_model, load_mnist, load_reference_models, result_rows, \
    run_autoattack


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the per-batch checkpoints (default: a temporary one)")
    parser.add_argument("--n", type=int, default=4, help="MNIST test images")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    classifier, prior = load_reference_models("mnist")
    purifier = defense("adp", dataset="mnist", prior=prior, gradient="exact")
    # The model AutoAttack sees: the purifier in front of the classifier, eval mode, frozen parameters.
    model = deployed_model(purifier, classifier, runs=1)
    x, y = load_mnist("test", n=args.n)

    config = AutoAttackConfig(eps=0.3, versions=("rand",), n_iter=1, eot_iter=1, rescore_draws=2, batch_size=args.n)
    with tempfile.TemporaryDirectory() as tmp:
        # Each batch's result is saved under checkpoint_dir: rerunning the same call resumes where it stopped.
        result = run_autoattack(model, torch.from_numpy(x), torch.from_numpy(y), config,
                                checkpoint_dir=args.out or tmp, device="cpu", verbose=False)

    print(f"AutoAttack 'rand' on ADP (gradient={purifier.gradient}), MNIST test[:{args.n}], Linf eps 0.3")
    print(f"reported robust accuracy (AutoAttack's own flags): {result.reported_accuracy():.2f}")
    print(f"per-point worst case over flags and re-score draws: {result.worst_case().float().mean().item():.2f}")
    for row in result_rows(result, "adp", purifier.gradient):  # the package's results rows, as the commands write
        print(f"  {row['attack']:<22} {row['scoring']:<13} robust {row['robust_acc']:.2f}  "
              f"scaled_down={row['scaled_down']}")


if __name__ == "__main__":
    main()
