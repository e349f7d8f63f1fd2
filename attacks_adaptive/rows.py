"""The results row: one vocabulary for every number the package reports.

A row is ``{defense, attack, gradient, scoring, eps, norm, n, seed, clean_acc, robust_acc, nfe_per_image, seconds}``
plus any further keys (``eot``, ``iterations``, ``draws``, ``note``, ...). Where a row is made, :func:`make_row`
enforces the vocabulary:

* ``norm`` as RobustBench spells threat models: ``"Linf"``, ``"L2"``, ``"L1"`` (``linf``, ``inf``, ``l2`` accepted
  and rewritten);
* ``scoring`` one of the protocols of :mod:`attacks_adaptive.scoring`
  (:data:`~attacks_adaptive.scoring.ALL_SCORINGS`), one of randomized smoothing's
  (:data:`~attacks_adaptive.scoring.SMOOTHING_SCORINGS`), or ``None`` where nothing is scored; a former name
  (:data:`~attacks_adaptive.scoring.SCORING_ALIASES`, e.g. ``n_evaluation``) is written as today's, so a row
  remade from an old results file's row names its protocol as new rows do (the old file reads and displays as it
  was written);
* ``attack`` the name the attack class gives itself (``BlindPGD``, ``PGD+EOT``, ``APGD-DLR+EOT``, ...), chosen by
  whoever makes the row;
* accuracies as fractions in [0, 1].
"""

from __future__ import annotations

from attacks_adaptive.scoring import SMOOTHING_SCORINGS, scoring_name

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
    if fields.get("scoring") is not None and fields["scoring"] not in SMOOTHING_SCORINGS:
        fields["scoring"] = scoring_name(fields["scoring"])
    fields["norm"] = threat_model_name(fields.get("norm"))
    row = {key: fields.pop(key, None) for key in ROW_FIELDS}
    row.update(fields)
    return row

