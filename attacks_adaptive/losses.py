"""The losses every attack maximises, per row of logits: CE, DLR (Croce & Hein 2020) and the logit margin (CW)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

Tensor = torch.Tensor


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each row."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020, eq. 6): ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)``, shift and
    scale invariant in the logits; it needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}.")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - _max_other(logits, y)) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Logit margin ``max_{i!=y} z_i - z_y``, positive once misclassified: the untargeted CW loss (Carlini & Wagner
    2017, their f_6 without the confidence clip) as APGD-CW and DiffHammer's reference code (``utils.cw_loss``, its
    first loss) compute it, and the loss Uesato et al. 2018 use for SPSA."""
    return _max_other(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def _max_other(logits: Tensor, y: Tensor) -> Tensor:
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(dim=1).values


LOSSES = {"ce": ce_loss, "dlr": dlr_loss, "margin": margin_loss}  # "margin" is the CW loss (see margin_loss)
