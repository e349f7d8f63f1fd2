"""DiffHammer: a selective (EM-style) attack on stochastic purification, with gradient grafting.

Wang et al., "DiffHammer: Rethinking the Robustness of Diffusion-Based Adversarial Purification" (NeurIPS 2024;
reference code github.com/Ka1b0/DiffHammer, ``attacker.py``). Plain EOT averages the gradients of all purifications of
an input; when only some of them share a vulnerability, the others' gradients pull the other way and the average
stalls (the paper's "gradient dilemma"). DiffHammer instead attacks the purifications that can be broken:

* **E-step** (per input, over its ``eot`` = N purifications ``phi_j`` with losses ``l_j`` and gradients ``g_j``): the
  first-order loss of copy ``j`` after a full-budget step along a direction ``r`` is ``l_j + eps <u(r), g_j>``
  (``u``: ``sign`` for ``l_inf``, ``g / ||g||_2`` for ``l_2``); its weight ``w_j = sigmoid(lam * that)`` is the
  estimated probability that the step breaks copy ``j``. ``r`` starts at the copy whose direction breaks most copies
  (``argmax_a sum_b elu(l_b + eps <u(g_a), g_b>)``, the code's seed selection) and alternates with
  ``r = sum_j w_j g_j / sum_j w_j`` for ``em_steps`` rounds.
* **M-step**: ascend the ``w``-weighted loss: the step direction is ``u`` of ``sum_j w_j grad_j / sum_j w_j``,
  accumulated over iterations as ``d_t = v_t m_t + (1 - v_t) d_{t-1}`` with ``v_t = (t + 1)^-em_alpha`` (the code's
  averaging of the EM gradients, a stochastic-approximation step size; ``em_alpha = 0`` turns it off).
* **Gradient grafting** (``grafting=True``): the E-step uses the cheap output gradients ``g_j = dL/dphi_j`` of N
  purifications run without a graph (what ``bpda`` computes), and one full gradient per iteration pulls the weighted
  output gradient back through one purification, ``J^T (sum_j w_j g_j / sum_j w_j)``: it assumes the purifications'
  Jacobians agree where their output gradients do not, and costs one backward through the purifier per iteration
  instead of N. ``grafting=False`` weighs the N full gradients ``J_j^T g_j`` instead (the E-step then uses them too):
  exactly PGD+EOT's purifications and gradients per iteration, for comparisons at equal cost.

Cost per iteration and input: with grafting, N purifications without a graph (the defense's own purification, however
costly) plus one forward/backward in the gradient mode; without, N forward/backwards in the gradient mode (PGD+EOT's).
So grafting saves backward passes through an ``exact`` gradient, but costs more than PGD+EOT where the gradient mode is
a cheap surrogate of an expensive purification (ScoreOpt's one-shot denoiser: 8 MNIST digits, 10 x 4, took 175 s
against PGD+EOT's 66 s on one CPU thread). ``keep_best`` adds N purifications at the end.

The full gradient goes through the purifier's ``gradient`` mode (``exact``, ``surrogate``, ``adjoint``, ``bpda``) via
:class:`attacks_adaptive.base.DefendedModel`; with ``bpda`` grafting is the identity and costs no extra purification.
The attack returns, per input, the iterate at which most of its N purifications were broken (any broken first, then
the higher mean loss), as the code keeps its best iterate under N-evaluation; ``keep_best=False`` returns the last.
Score it with :func:`attacks_adaptive.scoring.n_evaluation` (the paper's N-evaluation) beside the other protocols.

Paper vs code (the choices made here; ``variant`` selects the E-step). The formulas above were read from the reference
code (``Attacker.seeds_select``, ``Attacker.EM``, ``Attacker.perturb``, ``DiffPureClassifier.gradient``); the paper's
own text was not at hand when this was written, so ``variant="paper"`` is the method as the paper outlines it (an EM
whose E- and M-steps alternate, a first-order estimate of which purifications a step breaks) with the code's
inconsistencies removed, not a transcription of the paper's equations; check it against them before quoting a number
as the paper's attack.

* ``variant="paper"`` (default): the EM iterates, ``r`` and ``w`` alternating, with the first-order gain scaled by
  ``eps`` in both the selection and the E-step. ``variant="code"``: the reference ``Attacker.EM`` as written: its loop
  recomputes ``w`` from the selected copy's gradient without updating ``r`` (the update goes to an unused variable), so
  ``w`` comes from one E-step, and its E-step gain is ``<u(r), g_j>`` without the ``eps`` its selection uses.
* The code's ``N_EOT > 1`` (several grafted references, mixed by a softmax of cosine similarities) is not implemented:
  one reference, its default. Its grafted gradient runs through the *selected* copy's purification (its seed is
  replayed); our purifiers draw their noise from their own stream without per-row replay, so the Jacobian is that of a
  fresh purification, which under grafting's premise (Jacobians shared) is the same approximation.
* The code's default update is APGD's with 3 restarts of 50 iterations (CW, CE then DLR loss) and a random start; here
  the update is PGD's at its ``PGD_STEP_SIZE`` 0.007 at 8/255 (scaled with ``eps``, as :class:`PGDEOT`), one loss
  (``margin``, its first), no restarts, and no random start unless ``random_start=True``.
* Not implemented either: the code's early stop once every input has all N purifications broken, its restarts on the
  inputs still robust in at least half the purifications, and its DiffAttack/augmentation options.
* The best iterate is judged on the attack's own N purifications (single ones; the deployed ensemble, e.g. ADP's
  S = 10, is what the scoring protocols query). With a surrogate whose value is not the defense's (ScoreOpt's one-shot
  denoiser), ``grafting=False`` weighs and judges the surrogate's outputs; the default (grafting) weighs real
  purifications and borrows only the surrogate's Jacobian.
* ``lam = 5``, ``em_steps = 5``, ``em_alpha = 0.5``, ``N = 10`` are the code's defaults.

On a deterministic purifier every copy is the same, every weight equal, and (``em_alpha=0``, ``keep_best=False``) the
attack is PGD+EOT's, iterate for iterate.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction, project, random_start
from attacks_adaptive.losses import LOSSES
from attacks_adaptive.pgd_eot import LEE_KIM_STEP_PER_EPS

VARIANTS = ("paper", "code")


class DiffHammer(Attack):
    """DiffHammer (Wang et al., NeurIPS 2024): EM-weighted EOT on the breakable purifications, gradient grafting.

    :param gradient: the purifier's gradient mode for the full gradient (``None`` keeps its current mode).
    :param eot: purifications per iteration, the paper's N (10).
    :param step: step size; ``None`` is ``0.007 * eps / (8/255)``.
    :param loss: ``"margin"`` (the code's first, CW: positive once misclassified, which the E-step's sigmoid reads as
        "broken"), ``"ce"`` or ``"dlr"``.
    :param grafting: one full gradient per iteration through the E-step's weighted output gradient (``True``), or the
        weighted average of the N full gradients (``False``).
    :param variant: ``"paper"`` (iterated EM) or ``"code"`` (the reference code's single E-step); see the module.
    :param em_steps: E/M rounds of the weights per iteration (5).
    :param em_lam: sharpness ``lam`` of the sigmoid weights (5.0).
    :param em_alpha: exponent of the gradient accumulation ``v_t = (t + 1)^-em_alpha`` (0.5; 0: no accumulation).
    :param keep_best: return the iterate that broke the most of its purifications (``True``) or the last one.
    :param random_start: start at a uniform point of the ball (the code does; ``False``: at the input).

    (The other parameters are :class:`attacks_adaptive.base.Attack`'s.)
    """

    name = "DiffHammer"
    default_step_per_eps = LEE_KIM_STEP_PER_EPS
    default_step_text = "0.007 at 8/255, scaled"
    attack_params = Attack.attack_params + ["gradient", "eot", "step", "loss", "grafting", "variant", "em_steps",
                                            "em_lam", "em_alpha", "keep_best", "random_start"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 100, eot: int = 10,
                 gradient: str | None = None, step: float | None = None, loss: str = "margin", grafting: bool = True,
                 variant: str = "paper", em_steps: int = 5, em_lam: float = 5.0, em_alpha: float = 0.5,
                 keep_best: bool = True, random_start: bool = False, **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.gradient = gradient
        self.eot = eot
        self.step = step
        self.loss = loss
        self.grafting = grafting
        self.variant = variant
        self.em_steps = em_steps
        self.em_lam = em_lam
        self.em_alpha = em_alpha
        self.keep_best = keep_best
        self.random_start = random_start
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("eot", self.eot)
        self._check_positive_int("em_steps", self.em_steps)
        self._check_step()
        self._check_loss(self.loss)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        if not isinstance(self.em_lam, (int, float)) or not self.em_lam > 0:
            raise ValueError(f"em_lam must be a positive number, got {self.em_lam!r}.")
        if not isinstance(self.em_alpha, (int, float)) or not self.em_alpha >= 0:
            raise ValueError(f"em_alpha must be a number >= 0, got {self.em_alpha!r}.")
        for name in ("grafting", "keep_best", "random_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool.")
        self.model.check_gradient_mode(self.gradient)

    def gradient_description(self) -> str:
        if not self.model.stochastic:
            return "none"
        mode = self.gradient or self.model.gradient
        return f"{mode}, grafted" if self.grafting and mode != "bpda" else mode


    # ---------------------------------------------------------------------------------------------------------------
    def _unit(self, g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent unit step of flattened gradients (last dimension)."""
        return g.sign() if self.norm == "linf" else g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def e_step(self, grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The normalised weights (N, k) of every input's ``k`` copies, from their gradients (N, k, ...) and losses
        (N, k): ``w_j / sum_j w_j`` with ``w_j = sigmoid(lam * (l_j + c <u(r), g_j>))`` (see the module docstring)."""
        g = grads.flatten(2)
        unit = self._unit(g)
        # Seed selection: the copy a whose full-budget step breaks most copies b, to first order (elu: a soft count).
        gain = torch.einsum("nad,nbd->nab", unit, g)
        a = F.elu(losses[:, None, :] + self.eps * gain).sum(2).argmax(1)
        r = g[torch.arange(g.shape[0], device=g.device), a]
        scale = self.eps if self.variant == "paper" else 1.0
        for _ in range(self.em_steps):
            expected = losses + scale * (self._unit(r)[:, None, :] * g).sum(-1)
            # w / sum(w) as a softmax of log-sigmoids: the same weights, finite when every sigmoid underflows.
            weights = torch.softmax(F.logsigmoid(self.em_lam * expected), dim=1)
            if self.variant == "paper":
                r = (weights[..., None] * g).sum(1)
        return weights

    def _weighted_gradient(self, x, y, loss_fn):
        """The M-step gradient at ``x``, and the per-copy losses (N, k) and misclassification flags (N, k)."""
        model = self.model
        if self.grafting and model.stochastic:
            # the purifications without a graph (bpda): g_j = dL/dphi_j
            grads, losses, probs = model.loss_gradient(x, y, loss_fn, self.eot, reduce="none",
                                                       max_rows=self.max_rows, gradient="bpda")
            weights = self.e_step(grads, losses)
            output_grad = (weights.view(*weights.shape, *([1] * (x.ndim - 1))) * grads).sum(1)
            grad = model.purifier_vjp(x, output_grad, self.max_rows, gradient=self.gradient)
        else:
            grads, losses, probs = model.loss_gradient(x, y, loss_fn, self.eot, reduce="none",
                                                       max_rows=self.max_rows, gradient=self.gradient)
            weights = self.e_step(grads, losses)
            grad = (weights.view(*weights.shape, *([1] * (x.ndim - 1))) * grads).sum(1)
        return grad, losses, probs.argmax(-1) != y[:, None]

    @torch.no_grad()
    def _evaluate(self, x, y, loss_fn):
        """Per-copy losses and misclassification flags of ``eot`` fresh purifications (no gradient)."""
        k = self.eot if self.model.stochastic else 1
        rows, labels = x.repeat_interleave(k, dim=0), y.repeat_interleave(k)
        logits = torch.cat([self.model.purified_logits(rows[i:i + self.max_rows], False)
                            for i in range(0, rows.shape[0], self.max_rows)])
        return loss_fn(logits, labels).view(-1, k), (logits.argmax(1) != labels).view(-1, k)

    def _attack(self, x0, y):
        loss_fn = LOSSES[self.loss]
        x_adv = random_start(x0, self.eps, self.norm, self._generator(x0.device)) if self.random_start else x0
        best, best_broken = x_adv.clone(), torch.zeros_like(y, dtype=torch.bool)
        best_loss = torch.full(y.shape, float("-inf"), dtype=x0.dtype, device=x0.device)

        def keep(x_i, losses, wrong):
            broken, mean_loss = wrong.any(1), losses.mean(1)
            better = (broken & ~best_broken) | ((broken == best_broken) & (mean_loss > best_loss))
            best[better] = x_i[better]
            best_broken[better], best_loss[better] = broken[better], mean_loss[better]

        accumulated = torch.zeros_like(x0)
        for t in self._iterations():
            grad, losses, wrong = self._weighted_gradient(x_adv, y, loss_fn)
            keep(x_adv, losses, wrong)
            v = (t + 1) ** -float(self.em_alpha)
            accumulated = v * grad + (1 - v) * accumulated
            x_adv = project(x_adv + self.step_size * ascent_direction(accumulated, self.norm), x0, self.eps,
                            self.norm)
            self._note_iterate(x_adv)
        if not self.keep_best:
            return x_adv
        keep(x_adv, *self._evaluate(x_adv, y, loss_fn))
        return best
