"""Load a checkpoint in an authors' format with ``purifiers.load_prior`` and purify images with it.

Run: ``python docs/examples/authors_checkpoint.py [--out DIR] [--n 3]`` (a few seconds on 2 CPU cores).

The checkpoints the papers use (NCSNv2's ``checkpoint.pth`` for ADP, score_sde's ``checkpoint_8.pth`` for DiffPure and
COUP, EDM's ``.pkl`` for ScoreOpt, guided-diffusion's ``.pt``) load as they are: ``load_prior(path)`` detects the
container from its contents (read with ``torch.load(weights_only=True)``; a pickle that holds code is refused), the
network config from its parameter names and shapes, and uses the EMA weights. To run without a download, this script
first writes a *tiny, untrained* NCSNv2 checkpoint the way NCSNv2's training loop writes one
(``[state_dict, optimizer, epoch, step, ema]``, ``module.`` keys), so the purified images are not meaningful: the
point is the loading path. With the real file: ``load_prior("/ckpt/ncsnv2/cifar10/checkpoint.pth")``, and first
``python -m benchmarks check-prior /ckpt/ncsnv2/cifar10/checkpoint.pth --data /data`` (docs/priors.md).
"""

import argparse
import os
import tempfile

import numpy as np
import torch

from benchmarks import load_mnist
from purifiers import ADPPyTorch, load_prior
# The network under NCSNv2's reference parameter names (purifiers.nets: the re-implementations the authors'
# checkpoints load into); here it stands in for the authors' training code that wrote the file.
from purifiers.nets.ncsnv2 import NCSNv2, NCSNv2Config


def write_tiny_ncsnv2_checkpoint(path):
    """A small random NCSNv2 (4 base channels instead of 128, 10 noise levels) saved as NCSNv2's runner saves it."""
    torch.manual_seed(0)
    net = NCSNv2(NCSNv2Config(ngf=4, num_classes=10, sigma_begin=1.0, sigma_end=0.01)).eval()  # 3 x 32 x 32 images
    weights = {f"module.{k}": v for k, v in net.state_dict().items()}  # DataParallel's key prefix
    ema = {k: p.detach().clone() for k, p in net.named_parameters()}  # the EMA helper's shadow parameters
    torch.save([weights, torch.optim.Adam(net.parameters()).state_dict(), 1, 100, ema], path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for checkpoint.pth (default: a temporary one)")
    parser.add_argument("--n", type=int, default=3, help="images to purify")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(args.out or tmp, "checkpoint.pth")
        write_tiny_ncsnv2_checkpoint(path)

        prior = load_prior(path)  # format, config and sigmas detected from the file; EMA weights (ema=False: raw)
        card = prior.describe()
        print("loaded:", {key: card[key] for key in ("format", "weights", "data_range", "parameters") if key in card})

    # Images for a 3 x 32 x 32 CIFAR-10 prior: MNIST digits padded to 32 x 32 and repeated over 3 channels.
    x, _ = load_mnist("test", n=args.n)
    x = np.repeat(np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2))), 3, axis=1)

    # ADP on this prior: 2 purification steps from pixel sigma 0.1, seeded per image.
    purifier = ADPPyTorch(prior, sigma=0.1, steps=2, seed=0, device_type="cpu")
    prior.nfe.reset()  # network evaluations are counted in images
    purified, _ = purifier(x)
    print(f"purified {purified.shape[0]} images of shape {purified.shape[1:]}, values in "
          f"[{purified.min():.2f}, {purified.max():.2f}], mean change {np.abs(purified - x).mean():.3f}")
    print(f"prior evaluations: {prior.nfe.forward} forward, {prior.nfe.backward} backward")


if __name__ == "__main__":
    main()
