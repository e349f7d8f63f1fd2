"""Adaptive attacks on purified classifiers, for robustness numbers that are not overestimates.

Each attack is one file over a small shared base (:mod:`attacks_adaptive.base`: the Attack class;
:mod:`attacks_adaptive.defended`: the defended-model adapter and its evaluation count; :mod:`attacks_adaptive.losses`;
:mod:`attacks_adaptive.geometry`: the threat models) and works on an ART
``PyTorchClassifier`` whose ``preprocessing_defences`` hold a :class:`purifiers.PurifierPyTorch`, on a
:class:`purifiers.PurifiedClassifier`, or on a bare classifier, under ``l_inf`` and ``l_2``:

* :class:`BlindPGD`: PGD on the classifier alone (preprocessor-blind; ADP Table 1 "Classifier PGD").
* :class:`BPDAEOT`: BPDA+EOT PGD, the ADP / Hill et al. protocol (40 iterations, eps/4, 15 EOT, no random start).
* :class:`JointAttack`: ADP's Joint (score) and Joint (full).
* :class:`SPSA`: Uesato et al.'s gradient-free attack with ADP's 1,280 queries per step.
* :class:`SquareEOT`: the Square attack (Andriushchenko et al. 2020) on the EOT-mean loss of the deployed defense.
* :class:`PGDEOT`: Lee & Kim's full-gradient PGD+EOT (200 x 20) through the purifier's ``exact`` or ``surrogate`` mode.
* :class:`APGDEOT`: APGD (Croce & Hein 2020) with CE or DLR loss and batched EOT, through any gradient mode.
* :class:`DiffAttack`: Kang et al.'s (NeurIPS 2023) APGD on CE/DLR plus the deviated-reconstruction loss on the reverse
  diffusion's states, through the exact gradient with per-step recompute (DiffPure and COUP only).
* :class:`DiffHammer`: Wang et al.'s (NeurIPS 2024) selective EM attack on the breakable purifications, with gradient
  grafting (one full gradient per iteration), as its reference code runs it (APGD, 3 restarts) or as our reading.
* :class:`SmoothAdv`: Salman et al.'s (NeurIPS 2019) l_2 PGD on a smoothed classifier (noise before the purifier), the
  attack side of the certified bracket of ``python -m benchmarks certify``.

:mod:`attacks_adaptive.scoring` names the scoring protocols (single-shot, multi-draw (Fixed-AutoAttack's), majority
vote (DiffBreak's), all draws, any-iteration, and DiffHammer's two per-iterate metrics) and :func:`run_worst_case` runs
a list of attacks, keeps the strongest example per input and writes the results JSON.

| Please keep in mind the limitations of defences: a purifier that survives these attacks may still fall to a
  stronger one (https://arxiv.org/abs/1802.00420, https://arxiv.org/abs/1902.06705, https://arxiv.org/abs/2202.13711).
"""

from attacks_adaptive.apgd_eot import APGDEOT
from attacks_adaptive.base import Attack, AttackResult
from attacks_adaptive.blind_pgd import BlindPGD
from attacks_adaptive.bpda_eot import BPDAEOT
from attacks_adaptive.defended import DefendedModel
from attacks_adaptive.diffattack import DiffAttack
from attacks_adaptive.diffhammer import DiffHammer
from attacks_adaptive.geometry import NORMS
from attacks_adaptive.joint import JointAttack
from attacks_adaptive.losses import LOSSES
from attacks_adaptive.pgd_eot import PGDEOT
from attacks_adaptive.runner import collect_worst_case, run_worst_case
from attacks_adaptive.scoring import (ALL_SCORINGS, SCORINGS, all_draws, all_draws_all_iterates, any_iteration,
                                      majority_vote, min_fraction_over_iterates, multi_draw, single_shot)
from attacks_adaptive.smoothadv import SmoothAdv
from attacks_adaptive.spsa import SPSA
from attacks_adaptive.square_eot import SquareEOT

__all__ = ["Attack", "AttackResult", "DefendedModel", "LOSSES", "NORMS", "BlindPGD", "BPDAEOT", "JointAttack", "SPSA",
           "PGDEOT", "APGDEOT", "DiffAttack", "DiffHammer", "SmoothAdv", "SCORINGS", "ALL_SCORINGS", "single_shot",
           "multi_draw", "majority_vote", "all_draws", "any_iteration", "all_draws_all_iterates",
           "min_fraction_over_iterates", "run_worst_case", "collect_worst_case", "SquareEOT"]
