"""The toolkit the per-method studies share (benchmarks.studies.tuning): the selection rule on hand-made rows, the blind attack
against ART's PGD, and its digest-keyed cache."""

import numpy as np
import pytest
import torch

from benchmarks.data import load_mnist
from benchmarks.models import load_reference_models
from benchmarks.studies.tuning import BLIND_PGD, blind_pgd, cached_blind_pgd, prior_cost, select


@pytest.fixture(scope="module")
def classifier():
    return load_reference_models("mnist")[0]


@pytest.fixture(scope="module")
def mnist_val():
    return load_mnist("val", n=16)


def row(name, clean, robust, n=1000, nfe=10.0):
    return dict(defense="d", name=name, clean_acc=clean, robust_acc=robust, n=n,
                nfe_per_image={"prior_forward": nfe, "prior_backward": 0.0})


def test_selection_prefers_robustness_within_the_clean_tolerance():
    rows = [row("a", 0.99, 0.50), row("b", 0.98, 0.60), row("c", 0.95, 0.80)]
    assert select(rows, undefended_clean=0.99)["name"] == "b"  # c is more robust but 4 points below clean
    assert select([row("a", 0.90, 0.8), row("b", 0.85, 0.9)], undefended_clean=0.99) is None  # none qualifies
    # 64 images cannot resolve 1.5 points: one image (1.56 points) is tolerated
    rows = [row("a", 1.0, 0.5, 64), row("b", 63 / 64, 0.7, 64), row("c", 62 / 64, 0.8, 64)]
    assert select(rows, 1.0)["name"] == "b"


def test_selection_breaks_ties_by_clean_accuracy_then_cost_and_skips_diverged_settings():
    rows = [row("a", 0.98, 0.9, nfe=20), row("b", 0.99, 0.9, nfe=40), row("c", 0.99, 0.9, nfe=30),
            dict(row("d", None, None), clean_acc=None, robust_acc=None)]
    assert select(rows, 0.99)["name"] == "c"
    assert prior_cost(rows[0]) == 20 and prior_cost({"nfe_per_image": None}) == 0


def test_blind_pgd_is_arts_pgd_without_random_start(classifier, mnist_val):
    """The same steps as ART's ProjectedGradientDescent (l_inf, eps 0.3, 40 x 0.01, no random init): ART averages the
    loss over the batch, which rescales but does not flip the gradient, so the iterates agree."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    x, y = mnist_val
    ours = blind_pgd(classifier, x, y)
    estimator = PyTorchClassifier(classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=x.shape[1:],
                                  nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    art = ProjectedGradientDescent(estimator, norm=np.inf, eps=BLIND_PGD["eps"], eps_step=BLIND_PGD["step"],
                                   max_iter=BLIND_PGD["steps"], num_random_init=0, verbose=False).generate(x, y=y)
    assert np.abs(ours - x).max() <= BLIND_PGD["eps"] + 1e-6
    assert np.mean(np.abs(ours - art) < 1e-5) > 0.99


def test_cached_blind_pgd_is_keyed_by_weights_and_data(classifier, mnist_val, tmp_path):
    x, y = mnist_val
    first = cached_blind_pgd(classifier, x[:4], y[:4], str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(cached_blind_pgd(classifier, x[:4], y[:4], str(tmp_path)), first)
    cached_blind_pgd(classifier, x[:3], y[:3], str(tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not list(tmp_path.glob("*.tmp*"))

