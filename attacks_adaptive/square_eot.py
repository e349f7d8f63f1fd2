"""Square+EOT: the Square attack (a gradient-free random search) on the EOT-mean loss of a randomized defense.

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial attack via random
search" (ECCV 2020, https://arxiv.org/abs/1912.00049), §3, implemented here (not pyautoattack's ``SquareAttack``):

* random search (Algorithm 1): from the current best point draw a candidate from a distribution ``P``, query it, keep
  it only if it raises the loss;
* ``l_inf`` (Algorithm 2): the start is vertical stripes of width one, each coloured ``+-eps`` per channel; a
  candidate sets one square window of side ``s`` to ``x + eps * c`` with one random sign ``c`` per channel (then the
  [0, 1] box); a window that would leave the point unchanged is redrawn, as the authors' ``attack.py``
  (``square_attack_linf``) does;
* ``l_2`` (Algorithm 3): the start is a grid of tiles of side ``min(h, w) // 5``, each holding the pattern ``eta``
  (two halves of nested squares weighted ``1/(k+1)^2``, of opposite signs) with one random sign per channel,
  rescaled to ``||delta||_2 = eps``; a candidate moves the perturbation's mass of a second window ``W_2``
  into a window ``W_1`` along ``eta`` plus ``W_1``'s old direction, per channel, and rescales to ``eps``;
* the side ``s = round(sqrt(p h w))`` (``l_2``: at least 3 and odd), where ``p`` starts at ``p_init`` and halves at
  iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, the schedule rescaled to ``steps``
  (:func:`p_selection`, the authors' and AutoAttack's ``p_selection``, ``pyautoattack/square.py``);
* the loss is the logit margin (the paper's margin loss, negated: here maximised; ``"ce"`` and ``"dlr"`` too).

What AutoAttack's issue 56 asks for with randomized defenses, and what differs from ``pyautoattack/square.py``
(``SquareAttack.attack_single_run``):

* EOT: every query is ``eot`` passes of the deployed defense (its ensemble; one pass for a deterministic target) and
  the loss is their mean; AutoAttack's Square judges one pass, so on a randomized defense it accepts whatever one draw
  of noise favoured.
* Acceptance: a candidate is kept only if its EOT-mean loss is strictly higher than the best one's. AutoAttack also
  keeps any candidate one pass misclassifies (``idx_miscl``), which on a randomized defense keeps lucky draws.
* Stopping rule: an input stops being queried once, at its best point, the argmax of the mean softmax of the ``eot``
  passes is not its label (the EOT-mean prediction is wrong; APGD+EOT's rule). AutoAttack stops at the first pass
  whose margin is negative, which on a randomized defense happens by chance at points most passes classify
  correctly; the scoring protocols then count such a point as robust. The mean over ``eot`` passes estimates what
  the deployed defense does on average, so the search goes on until that is wrong, and spends its queries there.
* Every input draws its own window and colours (Algorithms 2 and 3, and the authors' ``attack.py`` for ``l_inf``);
  AutoAttack's port draws one window (and one colour) per iteration for the whole batch. Windows may start at the
  last row or column (``randint(0, h - s)`` in both codes excludes it). ``l_inf`` redraws a window's colours at most
  :data:`REDRAWS` times (the authors' code loops until the point changes, which never ends where the [0, 1] box clips
  both signs to the same values); a candidate equal to the best point is never accepted.
* ``steps`` counts every query per input, the initial point's included, as the authors' ``n_iters``; AutoAttack runs
  ``n_queries`` candidates after the initial query. One run (AutoAttack's ``n_restarts=1``), untargeted.

The best point's loss is an EOT estimate and the maximum of noisy estimates is biased upwards, so on a randomized
defense a later candidate has to beat a lucky value; a larger ``eot`` makes that bias smaller. Queries are counted in
passes of the deployed defense: ``steps * eot`` per input at most.
"""

from __future__ import annotations

import math

import torch

from attacks_adaptive.base import Attack
from attacks_adaptive.defended import QUERIES
from attacks_adaptive.losses import LOSSES

Tensor = torch.Tensor

#: Iterations (of 10,000) after which ``p`` halves (the paper's schedule, the codes' ``p_selection``).
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
#: How often an ``l_inf`` window whose colours leave the point unchanged is redrawn.
REDRAWS = 10


def p_selection(p_init: float, iteration: int, steps: int) -> float:
    """The fraction ``p`` of pixels a candidate changes at ``iteration`` (0-based) of ``steps``: ``p_init`` halved at
    each of :data:`P_HALVINGS` the iteration, rescaled to 10,000, has passed."""
    rescaled = int(iteration / steps * 10000)
    return p_init / 2 ** sum(rescaled > t for t in P_HALVINGS)


def square_pattern(side: int) -> Tensor:
    """The ``l_2`` pattern ``eta`` of a ``side`` x ``side`` window (Algorithm 3): the upper ``side // 2`` rows hold
    nested rectangles around their centre, a pixel at Chebyshev distance ``d`` from it weighted
    ``sum_{k=d}^{m} 1/(k+1)^2`` (``m`` half the longer side), the lower rows the same pattern negated; each half has
    unit ``l_2`` norm, then the whole."""
    def half(rows: int) -> Tensor:
        i = (torch.arange(rows, dtype=torch.float64) - rows // 2).abs()
        j = (torch.arange(side, dtype=torch.float64) - side // 2).abs()
        distance = torch.maximum(i[:, None], j[None, :])
        weights = 1.0 / torch.arange(1, max(rows, side) // 2 + 2, dtype=torch.float64) ** 2
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1/(k+1)^2
        values = tail[distance.long()]
        return values / values.norm().clamp_min(1e-12)

    eta = torch.cat([half(side // 2), -half(side - side // 2)])
    return eta / eta.norm()


class SquareEOT(Attack):
    """The Square attack on the EOT-mean loss of the deployed defense (gradient-free; see the module docstring).

    :param steps: queries per input, the initial point's included (5,000 in AutoAttack's standard version).
    :param eot: passes of the deployed defense per query, their loss averaged (20 in AutoAttack 'rand'); a
        deterministic target is queried once.
    :param p_init: the initial fraction of pixels a candidate changes (0.8 in AutoAttack; the authors' ``attack.py``
        suggests 0.05 for ``l_inf`` and 0.1 for ``l_2`` on undefended models).
    :param loss: ``"margin"`` (the paper's), ``"ce"`` or ``"dlr"``.
    :param query: what one of the ``eot`` passes runs: ``"deployed"`` (the deployed defense, its ensemble) or, ``runs``
        times cheaper and noisier, ``"single"`` (one purification), as :class:`attacks_adaptive.spsa.SPSA`'s.
    """

    name = "Square+EOT"
    attack_params = Attack.attack_params + ["eot", "p_init", "loss", "query"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 1000, eot: int = 20,
                 p_init: float = 0.8, loss: str = "margin", query: str = "deployed", seed: int = 0,
                 max_rows: int = 256,
                 track_iterates: bool = False, iterate_draws: int = 0, verbose: bool = False):
        super().__init__(target, eps=eps, norm=norm, steps=steps, max_rows=max_rows, seed=seed,
                         track_iterates=track_iterates, iterate_draws=iterate_draws, verbose=verbose)
        self.eot = eot
        self.p_init = p_init
        self.loss = loss
        self.query = query
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("eot", self.eot)
        if isinstance(self.p_init, bool) or not isinstance(self.p_init, (int, float)) or not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be a fraction in (0, 1], got {self.p_init!r}.")
        self._check_loss(self.loss)
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}.")

    def describe(self) -> dict:
        return {**super().describe(), "eot": self.eot if self.model.stochastic else 1}

    def gradient_description(self) -> str:
        return "none (black-box)"

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One query at each row: the mean loss over ``eot`` passes of the deployed defense, and whether the argmax
        of their mean softmax is not the label (the batch chunked to at most ``max_rows`` passes per call)."""
        k = self.eot if self.model.stochastic else 1
        per_call = max(1, self.max_rows // k)
        losses, wrong = [], []
        for i in range(0, x.shape[0], per_call):
            x_i, y_i = x[i:i + per_call], y[i:i + per_call]
            logits = self.model.query_logits(x_i.repeat_interleave(k, dim=0), self.query, self.max_rows)
            losses.append(LOSSES[self.loss](logits, y_i.repeat_interleave(k)).view(-1, k).mean(1))
            wrong.append(logits.softmax(-1).view(x_i.shape[0], k, -1).mean(1).argmax(1) != y_i)
        return torch.cat(losses), torch.cat(wrong)

    def _attack(self, x, y):
        generator = self._generator(x.device)
        x_best = x.clone()
        loss_best = x.new_full((x.shape[0],), -math.inf)  # the initial point is always accepted
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for it in self._iterations():
            active = (~fooled).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            x0, current = x[active], x_best[active]
            if it == 0:
                candidate = self._start(x0, generator)
            else:
                candidate = self._candidate(x0, current, p_selection(self.p_init, it - 1, self.steps), generator)
            loss, wrong = self.evaluate(candidate, y[active])
            accept = (loss > loss_best[active]) & (candidate != current).flatten(1).any(1)
            moved = active[accept]
            x_best[moved], loss_best[moved], fooled[moved] = candidate[accept], loss[accept], wrong[accept]
            if moved.numel():
                self._note_iterate(x_best[moved], moved)
        return x_best

    # ---------------------------------------------------------------------------------------------------------------
    def _signs(self, shape, like: Tensor, generator) -> Tensor:
        return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1

    def _start(self, x0: Tensor, generator) -> Tensor:
        """The initial point: vertical stripes (``l_inf``) or the tiled ``eta`` patterns (``l_2``)."""
        n, c, h, w = x0.shape
        if self.norm == "linf":
            return (x0 + self.eps * self._signs((n, c, 1, w), x0, generator)).clamp(0, 1)
        side = max(min(h, w) // 5, 1)
        delta = torch.zeros_like(x0)
        for top in range(max(0, (h - 5 * side) // 2), h - side + 1, side):
            for left in range(max(0, (w - 5 * side) // 2), w - side + 1, side):
                pattern = self._patterns(n, side, x0, generator)
                delta[:, :, top:top + side, left:left + side] = pattern * self._signs((n, c, 1, 1), x0, generator)
        return self._rescaled(x0, delta)

    def _candidate(self, x0: Tensor, x_best: Tensor, p: float, generator) -> Tensor:
        n, c, h, w = x0.shape
        side = round(math.sqrt(p * h * w))
        if self.norm == "linf":
            side = min(max(side, 1), h, w)
            window = self._window_mask(n, h, w, side, x0, generator)
            candidate = x_best
            redraw = torch.ones(n, dtype=torch.bool, device=x0.device)
            for _ in range(REDRAWS):
                colours = (x0 + self.eps * self._signs((n, c, 1, 1), x0, generator)).clamp(0, 1)
                candidate = torch.where(window & redraw.view(-1, 1, 1, 1), colours, candidate)
                redraw = (candidate == x_best).flatten(1).all(1)
                if not redraw.any():
                    break
            return candidate
        side = min(max(side, 3) | 1, h, w)  # odd, at least 3
        delta = x_best - x0
        rows1, cols1 = self._window_at(n, h, w, side, x0, generator)
        rows2, cols2 = self._window_at(n, h, w, side, x0, generator)
        index1, index2 = self._window_index(rows1, cols1, c), self._window_index(rows2, cols2, c)
        both = torch.zeros_like(delta)
        both[index1], both[index2] = 1.0, 1.0
        old = delta[index1]
        budget = ((self.eps ** 2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0).view(-1, 1) / c
                  + (delta * both).flatten(2).pow(2).sum(2)).sqrt()  # (n, c): the mass W_1 may hold
        new = (self._patterns(n, side, x0, generator) * self._signs((n, c, 1, 1), x0, generator)
               + old / old.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None])
        new = new / new.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None] * budget[..., None, None]
        delta[index2] = 0.0
        delta[index1] = new
        return self._rescaled(x0, delta)

    def _rescaled(self, x0: Tensor, delta: Tensor) -> Tensor:
        """``x0 + eps * delta / ||delta||_2``, clipped to the [0, 1] box."""
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x0 + self.eps * delta / norms).clamp(0, 1)

    def _patterns(self, n: int, side: int, like: Tensor, generator) -> Tensor:
        """``n`` copies of :func:`square_pattern`, each transposed with probability 1/2, of shape (n, 1, side, side)."""
        eta = square_pattern(side).to(device=like.device, dtype=like.dtype)
        flip = torch.randint(0, 2, (n, 1, 1, 1), generator=generator, device=like.device).bool()
        return torch.where(flip, eta.T, eta).expand(n, 1, side, side)

    @staticmethod
    def _window_at(n: int, h: int, w: int, side: int, like: Tensor, generator) -> tuple[Tensor, Tensor]:
        """Per row, the row and column indices of a uniformly placed ``side`` x ``side`` window, (n, side) each."""
        offsets = torch.arange(side, device=like.device)
        top = torch.randint(0, h - side + 1, (n, 1), generator=generator, device=like.device)
        left = torch.randint(0, w - side + 1, (n, 1), generator=generator, device=like.device)
        return top + offsets, left + offsets

    @staticmethod
    def _window_index(rows: Tensor, cols: Tensor, channels: int) -> tuple[Tensor, ...]:
        """Advanced indices selecting every row's window in an (n, c, h, w) tensor, as an (n, c, side, side) block."""
        n = rows.shape[0]
        return (torch.arange(n, device=rows.device).view(-1, 1, 1, 1),
                torch.arange(channels, device=rows.device).view(1, -1, 1, 1),
                rows.view(n, 1, -1, 1), cols.view(n, 1, 1, -1))

    def _window_mask(self, n: int, h: int, w: int, side: int, like: Tensor, generator) -> Tensor:
        rows, cols = self._window_at(n, h, w, side, like, generator)
        mask = torch.zeros(n, 1, h, w, dtype=torch.bool, device=like.device)
        mask[self._window_index(rows, cols, 1)] = True
        return mask
