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
from purifiers.priors.backends import load_state_dict_safely
from purifiers.priors.loading import load_prior

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


def load_classifier(source: str | None = None, dataset: str = "mnist", *, threat_model: str = "Linf",
                    model_dir: str = "models", arch: str | None = None) -> nn.Module:
    """A classifier mapping [0, 1] images to logits, in eval mode; the one loader of every command and study.

    :param source: ``None``: the classifier shipped for ``dataset``; a ``.safetensors`` file written by
        :func:`save_classifier` (its class is ``arch``, else its card's ``"model"`` entry; a file without a card is a
        :class:`MnistCNN`, as the first shipped models were); ``"robustbench:<Name>"``: RobustBench's model zoo, read
        from ``<model_dir>/<dataset>/<threat_model>/<Name>.pt`` (never downloaded); ``"module:function"``: a factory
        with no arguments returning the module.
    """
    if source is None:
        if dataset not in REFERENCE_FILES:
            raise ValueError(f"no classifier ships for {dataset!r} (shipped: {sorted(REFERENCE_FILES)}): give "
                             "'robustbench:<Name>' (with a model_dir) or module:function.")
        source = os.path.join(MODELS_DIR, REFERENCE_FILES[dataset][0])
    if os.path.isfile(source):
        return _load_saved_classifier(source, arch)
    kind, _, name = source.partition(":")
    if kind == "robustbench":
        return _load_robustbench_classifier(name, dataset, threat_model, model_dir)
    if not name:
        raise FileNotFoundError(f"classifier {source!r}: no such file (nor 'robustbench:<Name>' or module:function).")
    from benchmarks.factories import import_spec

    model = import_spec(source)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"the classifier factory {source!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model.eval()


def _load_saved_classifier(path: str, arch: str | None) -> nn.Module:
    if arch is None:
        card_path = os.path.splitext(path)[0] + ".json"
        arch = model_card(path).get("model", "MnistCNN") if os.path.isfile(card_path) else "MnistCNN"
    if not isinstance(arch, str) or arch not in CLASSIFIERS:  # a card can hold any JSON value
        raise ValueError(f"{path}: unknown classifier architecture {arch!r}; known: {sorted(CLASSIFIERS)}.")
    model = CLASSIFIERS[arch]()
    state = load_state_dict_safely(path)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:  # torch's message lists the keys but not the file
        raise ValueError(f"{path}: the weights are not those of a {arch} (another network, or not a state_dict): "
                         f"{str(err).strip()[:500]}") from err
    return model.eval()


def _load_robustbench_classifier(name: str, dataset: str, threat_model: str, model_dir: str) -> nn.Module:
    path = os.path.join(model_dir, dataset, threat_model, f"{name}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; robustbench would download it, this package never does. Put "
                                "the checkpoint there (robustbench's model_dir layout).")
    from benchmarks.harness.rb_compat import import_robustbench

    import_robustbench()
    from robustbench.utils import load_model

    return load_model(name, model_dir=model_dir, dataset=dataset, threat_model=threat_model).eval()


def reference_paths(dataset: str, models_dir: str = MODELS_DIR) -> tuple[str, str]:
    """``(classifier, prior)`` files shipped for ``dataset`` ("mnist" or "fashion_mnist")."""
    if dataset not in REFERENCE_FILES:
        raise ValueError(f"no reference models ship for {dataset!r}; shipped: {sorted(REFERENCE_FILES)}. For CIFAR-10, "
                         "pass a local diffusers folder or an authors' checkpoint (score_sde checkpoint_8.pth, NCSNv2 "
                         "checkpoint.pth) to purifiers.load_prior.")
    classifier_file, prior_file = (os.path.join(models_dir, f) for f in REFERENCE_FILES[dataset])
    return classifier_file, prior_file


def load_reference_models(dataset: str = "mnist", device: str | torch.device = "cpu", models_dir: str = MODELS_DIR, *,
                          prior=None, classifier: str | None = None):
    """``(classifier, prior)`` shipped for ``dataset`` ("mnist" or "fashion_mnist"; CIFAR-10 priors come from a user's
    folder), in eval mode: the one loader of the shipped models for every command, study, test and example.

    :param prior: instead of the shipped prior, anything :func:`purifiers.load_prior` takes (a file, a folder, a
        :class:`purifiers.Prior`).
    :param classifier: instead of the shipped classifier, anything :func:`load_classifier` takes.
    """
    classifier_file, prior_file = reference_paths(dataset, models_dir)
    for path, given in ((classifier_file, classifier), (prior_file, prior)):
        if given is None and not os.path.isfile(path):
            raise FileNotFoundError(f"reference model {path} is missing; train it with "
                                    f"`python -m benchmarks train-classifier --dataset {dataset}` / "
                                    f"`train-prior --dataset {dataset}`.")
    classifier_model = load_classifier(classifier or classifier_file, dataset).to(device)
    return classifier_model, load_prior(prior_file if prior is None else prior, device=device)


def model_card(path: str) -> dict:
    """The JSON card written beside a shipped model file."""
    card_path = os.path.splitext(path)[0] + ".json"
    try:
        with open(card_path, encoding="utf-8") as f:
            card = json.load(f)
    except ValueError as err:  # JSON's and UTF-8's errors do not name the file
        raise ValueError(f"the model card {card_path} is not valid JSON: {err}") from err
    if not isinstance(card, dict):
        raise ValueError(f"the model card {card_path} holds a {type(card).__name__}, not a JSON object.")
    return card
