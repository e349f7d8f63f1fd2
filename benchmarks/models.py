"""Reference models, shipped in ``benchmarks/models/``: per dataset a small CNN classifier and the built-in score prior.

* MNIST: :class:`MnistCNN` (3x3 convolutions) and an EDM prior, trained on the bundled 3,500 training digits.
* Fashion-MNIST: :class:`FashionCNN` (5x5 convolutions, as the ADP supplement's simple CNN) and an EDM prior, trained on
  the 55,000-image training split of :func:`benchmarks.data.load_fashion_mnist`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from benchmarks.results import write_json
from purifiers.priors import load_state_dict_safely
from purifiers.loading import load_prior

MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
REFERENCE_FILES = {"mnist": ("mnist_classifier.safetensors", "mnist_prior.safetensors"),
                   "fashion_mnist": ("fashion_mnist_classifier.safetensors", "fashion_mnist_prior.safetensors")}


class MnistCNN(nn.Module):
    """Two conv blocks and two dense layers; takes [0, 1] images (N, 1, 28, 28) and returns logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.3),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FashionCNN(nn.Module):
    """The simple CNN of ADP's supplement for Fashion-MNIST (Yoon et al. 2021, A.4): 5x5 filters, stride 1, padding 2.

    The supplement's text gives only the filter size, stride and padding (the layer list is in its Fig. 6b, a picture);
    the layers here are the classic two-block 5x5 CNN: conv 32 - pool - conv 64 - pool - dense 256 - dense 10, ReLU,
    dropout before the last layer. Takes [0, 1] images (N, 1, 28, 28) and returns logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, stride=1, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.4),
                                        nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


CLASSIFIERS = {"MnistCNN": MnistCNN, "FashionCNN": FashionCNN}


def save_classifier(model: nn.Module, path: str, card: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)
    write_json(os.path.splitext(path)[0] + ".json", card)


def load_classifier(path: str, arch: str | None = None) -> nn.Module:
    """A classifier saved by :func:`save_classifier`; its class is ``arch`` or else the card's "model" entry (a file
    without a card is a :class:`MnistCNN`, as the first shipped models were)."""
    if arch is None:
        card_path = os.path.splitext(path)[0] + ".json"
        arch = model_card(path).get("model", "MnistCNN") if os.path.isfile(card_path) else "MnistCNN"
    if arch not in CLASSIFIERS:
        raise ValueError(f"{path}: unknown classifier architecture {arch!r}; known: {sorted(CLASSIFIERS)}.")
    model = CLASSIFIERS[arch]()
    model.load_state_dict(load_state_dict_safely(path))
    return model.eval()


def load_reference_models(dataset: str = "mnist", device: str | torch.device = "cpu", models_dir: str = MODELS_DIR):
    """``(classifier, prior)`` shipped for ``dataset`` ("mnist" or "fashion_mnist"; CIFAR-10 priors come from a user's
    folder)."""
    if dataset not in REFERENCE_FILES:
        raise ValueError(f"no reference models ship for {dataset!r}; shipped: {sorted(REFERENCE_FILES)}. For CIFAR-10, "
                         "pass a local diffusers folder or an authors' checkpoint (score_sde checkpoint_8.pth, NCSNv2 "
                         "checkpoint.pth) to purifiers.load_prior.")
    classifier_file, prior_file = (os.path.join(models_dir, f) for f in REFERENCE_FILES[dataset])
    for path in (classifier_file, prior_file):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference model {path} is missing; train it with "
                                    f"`python -m benchmarks train-classifier --dataset {dataset}` / "
                                    f"`train-prior --dataset {dataset}`.")
    classifier = load_classifier(classifier_file).to(device)
    prior = load_prior(prior_file, device=device)
    return classifier, prior


def model_card(path: str) -> dict:
    """The JSON card written beside a shipped model file."""
    with open(os.path.splitext(path)[0] + ".json") as f:
        return json.load(f)
