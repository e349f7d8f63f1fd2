"""The results row: one vocabulary for every number the package reports.

A row is ``{defense, attack, gradient, scoring, eps, norm, n, seed, clean_acc, robust_acc, nfe_per_image, seconds}``
plus any further keys (``eot``, ``iterations``, ``draws``, ``note``, ...). Where a row is made, :func:`make_row`
enforces the vocabulary:

* ``norm`` as RobustBench spells threat models: ``"Linf"``, ``"L2"``, ``"L1"`` (``linf``, ``inf``, ``l2`` accepted
  and rewritten);
* ``scoring`` one of the protocols of :mod:`attacks_adaptive.scoring` (``single_shot``, ``multi_draw``,
  ``any_iteration``, ``n_evaluation``), or ``None`` where nothing is scored;
* ``attack`` the name the attack class gives itself (``BlindPGD``, ``PGD+EOT``, ``APGD-DLR+EOT``, ...), chosen by
  whoever makes the row;
* accuracies as fractions in [0, 1].
"""

from __future__ import annotations

from attacks_adaptive.scoring import SCORINGS

ROW_FIELDS = ("defense", "attack", "gradient", "scoring", "eps", "norm", "n", "seed", "clean_acc", "robust_acc",
              "nfe_per_image", "seconds")
THREAT_MODELS = {"linf": "Linf", "inf": "Linf", "l2": "L2", "l1": "L1"}


def threat_model_name(norm: str | None) -> str | None:
    """``norm`` as RobustBench writes it ("Linf", "L2", "L1")."""
    if norm is None:
        return None
    name = THREAT_MODELS.get(str(norm).lower())
    if name is None:
        raise ValueError(f"unknown norm {norm!r}: expected one of Linf, L2, L1.")
    return name


def make_row(**fields) -> dict:
    """A results row: every field of :data:`ROW_FIELDS` present (missing ones ``None``), the vocabulary enforced,
    extra fields kept."""
    for key in ("clean_acc", "robust_acc"):
        value = fields.get(key)
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{key} must be a fraction in [0, 1], got {value}.")
    if fields.get("scoring") is not None and fields["scoring"] not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS} (or None), got {fields['scoring']!r}.")
    fields["norm"] = threat_model_name(fields.get("norm"))
    row = {key: fields.pop(key, None) for key in ROW_FIELDS}
    row.update(fields)
    return row
