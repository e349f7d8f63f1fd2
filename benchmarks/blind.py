"""The preprocessor-blind attack of the purifier issues (ADP supplement Table 9's "Clf pgd"): ART's PGD against the
undefended classifier alone, l_inf eps 0.3, 40 steps of 0.01, no random start. The defended model then classifies the
purified adversarial examples. Shared by ``adp_eval``, ``scoreopt_eval`` and ``vpsde_eval``."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from torch import nn

PGD_BLIND = dict(norm="inf", eps=0.3, eps_step=0.01, max_iter=40)


def blind_pgd(classifier: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """ART's PGD (:data:`PGD_BLIND`) against the undefended classifier: the preprocessor-blind adversarial examples."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    estimator = PyTorchClassifier(classifier, loss=nn.CrossEntropyLoss(), input_shape=x.shape[1:], nb_classes=10,
                                  clip_values=(0.0, 1.0), device_type="cpu")
    attack = ProjectedGradientDescent(estimator, norm=np.inf, eps=PGD_BLIND["eps"], eps_step=PGD_BLIND["eps_step"],
                                      max_iter=PGD_BLIND["max_iter"], num_random_init=0, batch_size=batch_size,
                                      verbose=False)
    return attack.generate(x, y=y).astype(np.float32)


def cached_blind_pgd(classifier: nn.Module, x: np.ndarray, y: np.ndarray, cache_dir: str = "/tmp") -> np.ndarray:
    """:func:`blind_pgd`, cached as ``.npy`` in ``cache_dir`` under a digest of the classifier's weights, the attack
    settings and the data (another classifier, setting or image set never reads a stale file)."""
    digest = hashlib.sha1()
    for tensor in classifier.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digest.update(repr(sorted(PGD_BLIND.items())).encode() + x.tobytes() + y.tobytes())
    path = os.path.join(cache_dir, f"blind_pgd_{len(y)}_{digest.hexdigest()[:12]}.npy")
    if os.path.exists(path):
        return np.load(path)
    x_adv = blind_pgd(classifier, x, y)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, x_adv)
    return x_adv


def predict_labels(classifier: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([classifier(torch.from_numpy(x[i:i + batch_size])).argmax(1).numpy()
                               for i in range(0, len(x), batch_size)])
