"""DiffHammer: a selective (EM-style) attack on stochastic purification, with gradient grafting.

Wang et al., "DiffHammer: Rethinking the Robustness of Diffusion-Based Adversarial Purification" (NeurIPS 2024;
reference code github.com/Ka1b0/DiffHammer: ``attacker.py``, ``config.py``, ``utils.py``). Plain EOT averages the
gradients of all purifications of an input; when only some of them share a vulnerability, the others' gradients pull
the other way and the average stalls (the paper's "gradient dilemma"). DiffHammer attacks the purifications that can be
broken:

* **E-step** (per input, over ``eot`` = N purifications ``phi_j`` with losses ``l_j`` and output gradients ``g_j``):
  the seed ``a = argmax_a sum_b elu(l_b + eps <u(g_a), g_b>)`` is the copy whose full-budget step breaks most copies to
  first order (``Attacker.seeds_select``; ``u``: ``sign`` for ``l_inf``, ``g / ||g||_2`` for ``l_2``), ``r = g_a``,
  and the weights ``w_j = sigmoid(lam (l_j + c <u(r), g_j>))`` estimate which copies a step along ``r`` breaks.
* **M-step**: ascend along ``sum_j w_j g_j / sum_j w_j``, averaged over iterations as
  ``d_t = v_t m_t + (1 - v_t) d_{t-1}``, ``v_t = (t + 1)^-em_alpha`` (``Attacker.perturb``).
* **Gradient grafting** (``grafting=True``): the E-step uses the cheap output gradients ``g_j = dL/dphi_j`` of N
  purifications run without a graph (what ``bpda`` computes), and one full gradient per iteration pulls the weighted
  output gradient back through one purification, ``J^T (sum_j w_j g_j / sum_j w_j)`` (``DiffPure.gradient`` with
  ``g0``): it assumes the purifications' Jacobians agree where their output gradients do not. ``grafting=False``
  weighs the N full gradients ``J_j^T g_j`` instead (N backward passes through the purifier per iteration).

Two variants (``variant``):

``"reference"`` (the default): the algorithm as the reference code runs it, with its defaults (``config.py``):

* 3 restarts (``restarts``) of 50 iterations (``steps``, per restart), losses CW, CE, DLR, one per restart (``loss``;
  CW is :func:`attacks_adaptive.losses.margin_loss`); restart 0 attacks every input, a later restart only those whose
  largest misclassified fraction of the N draws so far is at most ``restart_threshold`` = 0.5 (``reload_data``).
* Each restart starts at a uniform point of the ball (``initialize``), evaluates the N draws at the clean input and
  takes its first E-step there (``evaluate_robustness``), then per iteration ``t`` (``perturb``): stop if every draw
  of every input was misclassified at the last evaluation; the grafted gradient at the current iterate from the last
  E-step, averaged as above from ``t = 1`` on (``em_alpha`` 0.5); one APGD update; N fresh draws at the new iterate
  (their output gradients, losses and misclassifications); the best-iterate records; the next E-step; the APGD
  checkpoint.
* The E-step as ``Attacker.EM`` computes it: ``lam = em_lam = 5``; ``c = 1`` (the selection scales the gain by eps,
  this step does not); ``r`` stays the seed's gradient: the loop over ``em_steps`` computes a weighted ``r0`` that is
  never used, so its rounds repeat one computation (done once here). With its ``N_EOT = 1`` the M-step direction is
  ``sum_j w_j g_j / sum_j w_j``.
* APGD (class ``APGD``): step ``eta = 2 eps`` per input, ``z = P_ball(x_t + eta u(d_t))`` (not clipped to [0, 1]),
  ``x_{t+1} = P(x_t + a (z - x_t) + (1 - a)(x_t - x_s))`` with ``a = 1`` at ``t = 0``, then 0.75, where ``x_s`` is the
  restart's start: the code never updates its ``x_adv_last``, so this term runs from the start, not from the previous
  iterate. Checkpoints at ``int(p steps)``, ``p`` in 0.22, 0.41, 0.57, 0.7, 0.8, 0.87, 0.93 (APGD's, Croce & Hein 2020
  §3.2, rounded down; ``init_params``); at each (``update_params``) ``eta`` halves where the largest loss of the N
  draws rose between consecutive evaluations fewer than ``rho = 0.75`` times the iterations since the last checkpoint,
  or where ``eta`` did not change at the last checkpoint and that loss equals its value there; then every input moves
  to its best iterate of the restart.
* Best iterate (``update_batch_metrics``): per input, running maxima over the restart (the clean input's draws
  included) of "some draw misclassified", the misclassified fraction and the mean loss, folded into records kept over
  all restarts; an iterate becomes the best when it raises the "some draw misclassified" record, or raises the
  mean-loss record while the restart's flag is at least the record. The records compare the restarts' different
  losses, as the code's do.

``"iterated_em"``: our reading of the method, kept for comparisons at PGD+EOT's budget: the E-step iterated, ``r`` and
``w`` alternating for ``em_steps`` rounds with the gain scaled by eps (``c = eps``), PGD steps of ``step`` (0.007 at
8/255, scaled with eps, as :class:`attacks_adaptive.pgd_eot.PGDEOT`), one loss (``margin``), no restart, no early stop,
and by default no random start (so that on a deterministic purifier it is PGD+EOT iterate for iterate); with
``keep_best`` it returns the iterate at which most of its N purifications were broken (any first, then the higher mean
loss, judged on the attack's own N purifications), else the last.

Why the default is ``"reference"``: it is the attack whose numbers the paper reports, so a result named DiffHammer is
the authors' attack; the paper's text was not at hand, so ``"iterated_em"`` is a reading that nothing checks.

Where both variants depart from the code, and why:

* The grafted gradient runs through a fresh purification; the code replays the selected copy's seed. Our purifiers
  draw their noise from their own stream without per-row replay; under grafting's premise (Jacobians shared) it is the
  same approximation. The code's ``N_EOT > 1`` (several seeds mixed by a softmax of cosine similarities) is not
  implemented: one seed, its default.
* The returned example is, per input, the last iterate that raised its records over all restarts; the code saves the
  last restart's best for the inputs it restarts (whose start value is that restart's random start). The code's
  numbers come from its records (the scorings ``all_draws_all_iterates`` and ``min_fraction_over_iterates`` of
  :mod:`attacks_adaptive.scoring`, with ``iterate_draws`` = N), not from its saved examples.
* An ``l_2`` random start is uniform in the ball (:func:`attacks_adaptive.geometry.random_start`); the code draws from
  the cube of side ``2 eps``. DLR's denominator offset is Croce & Hein's 1e-12, the code's 1e-3. The early stop and
  the checkpoints act on the batch one call attacks (a restart's inputs); the code's on its loader batch of 16.
* Its "DiffPure" is a DDPM from t = 100/1000 with 10 steps, and its DiffAttack and augmentation options are not here.

Cost per iteration and input: with grafting, N purifications without a graph (the defense's own purification, however
costly) plus one forward/backward in the gradient mode; without, N forward/backwards in the gradient mode. The
reference adds N purifications at the clean input per restart and runs up to ``restarts x steps`` iterations (restarts
on the inputs still at most half broken, fewer after an early stop). With ``bpda`` grafting is the identity. On a
deterministic purifier every copy is the same and every weight equal.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from attacks_adaptive.base import Attack
from attacks_adaptive.geometry import ascent_direction, project, random_start
from attacks_adaptive.losses import LOSSES
from attacks_adaptive.pgd_eot import LEE_KIM_STEP_PER_EPS

VARIANTS = ("reference", "iterated_em")
#: Each variant's defaults for the parameters left ``None``; the reference's are its ``config.py``'s (``N_ITERS``,
#: ``N_RESTART``, ``LOSS_NAMES``; ``initialize`` always starts at random).
VARIANT_DEFAULTS = {"reference": {"steps": 50, "restarts": 3, "loss": ("margin", "ce", "dlr"), "random_start": True},
                    "iterated_em": {"steps": 100, "restarts": 1, "loss": "margin", "random_start": False}}
#: The reference's APGD (``attacker.py``, class ``APGD``): checkpoint fractions, success fraction, momentum.
REFERENCE_CHECKPOINT_FRACTIONS = (0.0, 0.22, 0.41, 0.57, 0.7, 0.8, 0.87, 0.93)
REFERENCE_RHO = 0.75
REFERENCE_MOMENTUM = 0.75


def reference_checkpoints(steps: int) -> list[int]:
    """The iterations after which the reference's APGD may halve its step, 0 first (``APGD.init_params``:
    ``int(p * n_iter)``, rounded down, for APGD's fractions through 0.93)."""
    return sorted({int(p * steps) for p in REFERENCE_CHECKPOINT_FRACTIONS})


class DiffHammer(Attack):
    """DiffHammer (Wang et al., NeurIPS 2024): EM-weighted EOT on the breakable purifications, gradient grafting.

    :param steps: iterations (per restart for ``"reference"``); ``None``: the variant's (50; 100).
    :param eot: purifications evaluated per iteration, the paper's N (10, ``n_eval``).
    :param gradient: the purifier's gradient mode for the full gradient (``None`` keeps its current mode).
    :param step: ``"iterated_em"``'s step size; ``None`` is ``0.007 * eps / (8/255)``. The reference's APGD starts at
        ``2 eps`` and takes no ``step``.
    :param loss: a loss of :data:`attacks_adaptive.losses.LOSSES`, or one per restart (cycled); ``None``: the
        variant's (``("margin", "ce", "dlr")``, the code's CW, CE, DLR; ``"margin"``).
    :param grafting: one full gradient per iteration through the E-step's weighted output gradient (``True``), or the
        weighted average of the N full gradients (``False``).
    :param variant: ``"reference"`` or ``"iterated_em"``; see the module.
    :param restarts: restarts (``"reference"``: 3; ``"iterated_em"``: 1, its only value); ``None``: the variant's.
    :param restart_threshold: a restart attacks the inputs whose largest misclassified fraction of the N draws so far
        is at most this (0.5, ``RESTART_THR``).
    :param em_steps: rounds of the E-step (5; the reference's rounds repeat one computation).
    :param em_lam: sharpness ``lam`` of the sigmoid weights (5.0).
    :param em_alpha: exponent of the gradient averaging ``v_t = (t + 1)^-em_alpha`` (0.5; 0: no averaging).
    :param keep_best: ``"iterated_em"``: return the iterate that broke the most of its purifications (``True``) or the
        last one; the reference always returns its best iterate.
    :param random_start: start at a uniform point of the ball; ``None``: the variant's (``True``, as the code's
        ``initialize``; ``False``).

    (The other parameters are :class:`attacks_adaptive.base.Attack`'s.)
    """

    name = "DiffHammer"
    default_step_per_eps = LEE_KIM_STEP_PER_EPS
    default_step_text = "0.007 at 8/255, scaled"
    attack_params = Attack.attack_params + ["gradient", "eot", "step", "loss", "grafting", "variant", "restarts",
                                            "restart_threshold", "em_steps", "em_lam", "em_alpha", "keep_best",
                                            "random_start"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int | None = None, eot: int = 10,
                 gradient: str | None = None, step: float | None = None, loss: str | tuple | None = None,
                 grafting: bool = True, variant: str = "reference", restarts: int | None = None,
                 restart_threshold: float = 0.5, em_steps: int = 5, em_lam: float = 5.0, em_alpha: float = 0.5,
                 keep_best: bool = True, random_start: bool | None = None, **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        defaults = VARIANT_DEFAULTS[variant]
        super().__init__(target, eps=eps, norm=norm, steps=defaults["steps"] if steps is None else steps, **kwargs)
        self.gradient = gradient
        self.eot = eot
        self.step = step
        self.loss = defaults["loss"] if loss is None else loss
        self.grafting = grafting
        self.variant = variant
        self.restarts = defaults["restarts"] if restarts is None else restarts
        self.restart_threshold = restart_threshold
        self.em_steps = em_steps
        self.em_lam = em_lam
        self.em_alpha = em_alpha
        self.keep_best = keep_best
        self.random_start = defaults["random_start"] if random_start is None else random_start
        self._check_params()

    def _losses(self) -> tuple:
        return (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("eot", self.eot)
        self._check_positive_int("em_steps", self.em_steps)
        self._check_positive_int("restarts", self.restarts)
        self._check_step()
        if not self._losses():
            raise ValueError("loss must name at least one loss.")
        for loss in self._losses():
            self._check_loss(loss)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.variant == "iterated_em" and (self.restarts != 1 or len(self._losses()) != 1):
            raise ValueError("variant 'iterated_em' runs one restart with one loss.")
        if self.variant == "reference" and (self.step is not None or not self.keep_best):
            raise ValueError("variant 'reference' steps by APGD from 2 eps (step=None) and keeps its best iterate.")
        if not isinstance(self.restart_threshold, (int, float)) or not 0 <= self.restart_threshold <= 1:
            raise ValueError(f"restart_threshold must be in [0, 1], got {self.restart_threshold!r}.")
        if not isinstance(self.em_lam, (int, float)) or not self.em_lam > 0:
            raise ValueError(f"em_lam must be a positive number, got {self.em_lam!r}.")
        if not isinstance(self.em_alpha, (int, float)) or not self.em_alpha >= 0:
            raise ValueError(f"em_alpha must be a number >= 0, got {self.em_alpha!r}.")
        for name in ("grafting", "keep_best", "random_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool.")
        self.model.check_gradient_mode(self.gradient)

    @property
    def step_size(self) -> float:
        """The step: the reference's APGD starts at ``2 eps``; ``"iterated_em"`` takes ``step`` or its default."""
        return 2.0 * self.eps if self.variant == "reference" else super().step_size

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
        (N, k): ``w_j / sum_j w_j`` with ``w_j = sigmoid(lam * (l_j + c <u(r), g_j>))`` (see the module)."""
        g = grads.flatten(2)
        reference = self.variant == "reference"

        def weigh(r):
            expected = losses + (1.0 if reference else self.eps) * (self._unit(r)[:, None, :] * g).sum(-1)
            # w / sum(w) as a softmax of log-sigmoids: the same weights, finite when every sigmoid underflows.
            return torch.softmax(F.logsigmoid(self.em_lam * expected), dim=1)

        # Seed selection: the copy a whose full-budget step breaks most copies b, to first order (elu: a soft count).
        gain = torch.einsum("nad,nbd->nab", self._unit(g), g)
        weights = weigh(g[torch.arange(g.shape[0], device=g.device),
                          F.elu(losses[:, None, :] + self.eps * gain).sum(2).argmax(1)])
        for _ in range(0 if reference else self.em_steps - 1):  # iterated_em: r <- the weighted gradient, and again
            weights = weigh((weights[..., None] * g).sum(1))
        return weights

    def _weighted_direction(self, x, y, loss_fn):
        """The N purifications of every input at ``x``: the E-step's weighted gradient (output gradients with grafting,
        input gradients without), the per-copy losses (N, k) and misclassification flags (N, k)."""
        mode = "bpda" if self.grafting and self.model.stochastic else self.gradient
        grads, losses, probs = self.model.loss_gradient(x, y, loss_fn, self.eot, reduce="none", max_rows=self.max_rows,
                                                        gradient=mode)
        weights = self.e_step(grads, losses)
        direction = (weights.view(*weights.shape, *([1] * (x.ndim - 1))) * grads).sum(1)
        return direction, losses, probs.argmax(-1) != y[:, None]

    def _pull_back(self, x, direction):
        """The M-step gradient at ``x``: a grafted output gradient pulled back through one purification."""
        if self.grafting and self.model.stochastic:
            return self.model.purifier_vjp(x, direction, self.max_rows, gradient=self.gradient)
        return direction

    def _attack(self, x0, y):
        return self._attack_reference(x0, y) if self.variant == "reference" else self._attack_iterated(x0, y)

    # ---------------------------------------------------------------------------------------------------------------
    def _attack_reference(self, x0, y):
        """``Attacker.evaluate_robustness`` and ``APGD``: restarts, records and best iterates (see the module)."""
        n, generator, losses = x0.shape[0], self._generator(x0.device), self._losses()
        # Per input, over every iterate of every restart (the code's data_log): some draw misclassified, the largest
        # misclassified fraction (which decides restarts), the largest mean loss.
        record_broken = torch.zeros(n, dtype=torch.bool, device=x0.device)
        record_fraction = x0.new_zeros(n)
        record_loss = x0.new_full((n,), float("-inf"))
        best, todo = None, torch.arange(n, device=x0.device)
        for restart in range(self.restarts):
            if restart:
                todo = (record_fraction <= self.restart_threshold).nonzero().squeeze(1)
                if not len(todo):
                    break
            x_start = random_start(x0[todo], self.eps, self.norm, generator) if self.random_start else x0[todo]
            if best is None:
                best = x_start.clone()
            run = self._reference_restart(x0[todo], y[todo], x_start, todo, LOSSES[losses[restart % len(losses)]],
                                          (record_broken, record_loss), best)
            # the code folds the restart into the records after it (an early stop included)
            record_broken[todo] |= run[0]
            record_fraction[todo] = torch.maximum(record_fraction[todo], run[1])
            record_loss[todo] = torch.maximum(record_loss[todo], run[2])
        return best

    def _reference_restart(self, x0, y, x_cur, todo, loss_fn, records, best):
        """One restart on the inputs ``todo``: updates ``records`` and ``best`` (rows ``todo``) in place and returns the
        restart's running maxima (some draw misclassified, misclassified fraction, mean loss)."""
        record_broken, record_loss = records
        shape = (-1, *([1] * (x0.ndim - 1)))
        x_start, run_best = x_cur, x_cur.clone()
        direction, losses, wrong = self._weighted_direction(x0, y, loss_fn)  # at the clean input, as the code
        run_broken, run_fraction, run_loss = wrong.any(1), wrong.float().mean(1), losses.mean(1)
        top_loss = losses.max(1).values
        eta = torch.full((x0.shape[0],), 2.0 * self.eps, device=x0.device, dtype=x0.dtype)
        eta_last, rises, checkpoint_loss, last = eta.clone(), torch.zeros_like(eta), top_loss, 0
        checkpoints, averaged = reference_checkpoints(self.steps), None
        for t in self._iterations():
            if wrong.all():  # every draw of every input broken at the last evaluation
                break
            grad = self._pull_back(x_cur, direction)
            if t:
                v = (t + 1) ** -float(self.em_alpha)
                grad = v * grad + (1 - v) * averaged
            averaged = grad
            z = project(x_cur + eta.view(shape) * ascent_direction(grad, self.norm), x0, self.eps, self.norm, box=False)
            a = 1.0 if t == 0 else REFERENCE_MOMENTUM
            x_cur = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_start), x0, self.eps, self.norm)
            self._note_iterate(x_cur, todo)
            direction, losses, wrong = self._weighted_direction(x_cur, y, loss_fn)
            # records and the best iterate (Attacker.update_batch_metrics)
            run_broken = run_broken | wrong.any(1)
            run_fraction = torch.maximum(run_fraction, wrong.float().mean(1))
            run_loss = torch.maximum(run_loss, losses.mean(1))
            reached = record_broken[todo]
            better = (run_broken & ~reached) | ((run_loss > record_loss[todo]) & (run_broken | ~reached))
            run_best[better] = x_cur[better]
            best[todo[better]] = x_cur[better]
            record_broken[todo] = reached | run_broken
            record_loss[todo] = torch.maximum(record_loss[todo], run_loss)
            # APGD checkpoint (APGD.update_params), on the largest loss of the N draws per evaluation
            rises += (losses.max(1).values > top_loss).to(rises.dtype)
            top_loss = losses.max(1).values
            if t + 1 in checkpoints:
                halve = (rises < REFERENCE_RHO * (t + 1 - last)) | ((eta == eta_last) & (top_loss == checkpoint_loss))
                eta_last, eta = eta, torch.where(halve, eta / 2, eta)
                x_cur = run_best.clone()
                rises.zero_()
                checkpoint_loss, last = top_loss, t + 1
        return run_broken, run_fraction, run_loss

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, x, y, loss_fn):
        """Per-copy losses and misclassification flags of ``eot`` fresh purifications (no gradient)."""
        k = self.eot if self.model.stochastic else 1
        rows, labels = x.repeat_interleave(k, dim=0), y.repeat_interleave(k)
        logits = torch.cat([self.model.purified_logits(rows[i:i + self.max_rows], False)
                            for i in range(0, rows.shape[0], self.max_rows)])
        return loss_fn(logits, labels).view(-1, k), (logits.argmax(1) != labels).view(-1, k)

    def _attack_iterated(self, x0, y):
        loss_fn = LOSSES[self._losses()[0]]
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
            direction, losses, wrong = self._weighted_direction(x_adv, y, loss_fn)
            grad = self._pull_back(x_adv, direction)
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
