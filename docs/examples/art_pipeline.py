"""A purifier as an ART preprocessing defence, attacked by ART's PGD through its exact gradient.

Run: ``python docs/examples/art_pipeline.py [--n 4] [--iterations 2]`` (about half a minute on 2 CPU cores).

The purifier sits in a ``PyTorchClassifier``'s ``preprocessing_defences``, so every ART attack differentiates through
it; ``gradient="exact"`` backpropagates through each of ADP's purification steps, and ``eot_samples=2`` averages each
gradient over two purifications. With 4 images and 2 PGD iterations this shows that the pipeline runs, not how robust
ADP is (the attacks and protocols that measure that: docs/attacks.md).
"""

import argparse

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

from benchmarks import defense, load_mnist, load_reference_models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="MNIST test images")
    parser.add_argument("--iterations", type=int, default=2, help="PGD iterations")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # The shipped MNIST CNN and score prior (bundled with the package; nothing is downloaded).
    classifier, prior = load_reference_models("mnist")

    # ADP with the registry's MNIST settings (chosen on the validation split), exact gradient, EOT over 2 purifications.
    # Other registry names: "scoreopt", "scoreopt-n", "coup", "diffpure"; or build the classes of `purifiers` yourself.
    purifier = defense("adp", dataset="mnist", prior=prior, gradient="exact", eot_samples=2)

    model = PyTorchClassifier(classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                              clip_values=(0.0, 1.0), preprocessing_defences=[purifier], device_type="cpu")

    x, y = load_mnist("test", n=args.n)  # float32 NCHW images in [0, 1], int64 labels
    attack = ProjectedGradientDescent(model, eps=0.3, eps_step=0.1, max_iter=args.iterations, verbose=False)
    x_adv = attack.generate(x, y=y)  # every gradient goes through ADP's purification steps

    # predict() purifies once per image (fresh noise) and classifies the purified images.
    clean = np.mean(model.predict(x).argmax(1) == y)
    robust = np.mean(model.predict(x_adv).argmax(1) == y)
    print(f"purifier: {type(purifier).__name__}, gradient={purifier.gradient}, eot_samples={purifier.eot_samples}")
    print(f"largest perturbation: {np.abs(x_adv - x).max():.3f} (eps 0.3)")
    print(f"clean accuracy: {clean:.2f}, accuracy under PGD ({args.iterations} iterations): {robust:.2f} "
          f"on {args.n} images (a smoke run, not a robustness claim)")


if __name__ == "__main__":
    main()
