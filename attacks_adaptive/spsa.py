"""SPSA: a gradient-free attack that only queries the deployed defense (Uesato et al. 2018).

Uesato, O'Donoghue, van den Oord, Kohli, "Adversarial Risk and the Dangers of Evaluating Against Weak Attacks"
(ICML 2018, https://arxiv.org/abs/1802.05666), Algorithm 1: the gradient of the loss is estimated from antithetic
finite differences along Rademacher directions ``v_j``,
``g = 1/N sum_j (L(x + delta v_j) - L(x - delta v_j)) / (2 delta) v_j``, each query a forward pass of the whole defended
model (purifier in the loop, no gradient through it), and the loss is the logit margin.

ADP's setting (Yoon et al. 2021, §5.1 and Table 1): 1,280 queries per step and a ``sign`` step of ``alpha = 2/255`` at
``l_inf`` 8/255 (``eps / 4``): ``x_{i+1} = P_B(x_i + alpha sign(g))`` (``update="sign"``, the default). Uesato et al.
instead feed ``g`` to Adam (``update="adam"``, learning rate ``lr``). ``queries`` counts forward passes: 1,280 queries
are 640 antithetic pairs. Queries are clipped to [0, 1] (the purifier rejects images outside it). Under ``l_2`` the
``sign`` step becomes an ``l_2``-normalised step. A query is one pass of the deployed defense (``query="deployed"``,
ADP's S-run ensemble included) or, ``S`` times cheaper and noisier, one purification (``query="single"``).
"""

from __future__ import annotations

import torch

from attacks_adaptive.base import Attack
from attacks_adaptive.defended import QUERIES
from attacks_adaptive.geometry import ascent_direction, project
from attacks_adaptive.losses import LOSSES

UPDATES = ("sign", "adam")


class SPSA(Attack):
    """SPSA on the deployed defense (each query a stochastic forward pass of its ensemble).

    :param queries: forward passes per step (even; ``queries / 2`` antithetic pairs); 1,280 in ADP.
    :param delta: finite-difference size (0.01 in Uesato et al.).
    :param update: ``"sign"`` (ADP Table 1) or ``"adam"`` (Uesato et al.).
    :param step: the ``sign`` step; ``None`` is ``eps / 4``.
    :param lr: Adam's learning rate for ``update="adam"`` (0.01 in Uesato et al.).
    :param loss: ``"margin"`` (Uesato et al.), ``"ce"`` or ``"dlr"``.
    :param query: what one query runs: ``"deployed"`` (the deployed defense) or ``"single"`` (one purification).
    """

    name = "SPSA"
    attack_params = Attack.attack_params + ["queries", "delta", "update", "step", "lr", "loss", "query"]

    def __init__(self, target, *, eps: float, norm: str = "linf", steps: int = 40, queries: int = 1280,
                 delta: float = 0.01, update: str = "sign", step: float | None = None, lr: float = 0.01,
                 loss: str = "margin", query: str = "deployed", **kwargs):
        super().__init__(target, eps=eps, norm=norm, steps=steps, **kwargs)
        self.queries = queries
        self.delta = delta
        self.update = update
        self.step = step
        self.lr = lr
        self.loss = loss
        self.query = query
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        self._check_positive_int("queries", self.queries)
        if self.queries % 2:
            raise ValueError(f"queries must be even (antithetic pairs), got {self.queries}.")
        if not self.delta > 0:
            raise ValueError(f"delta must be positive, got {self.delta!r}.")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}.")
        self._check_step()
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        self._check_loss(self.loss)
        if self.query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {self.query!r}.")

    def gradient_description(self) -> str:
        return "none (black-box)"

    @torch.no_grad()
    def estimate_gradient(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The SPSA estimate ``g`` at each row of ``x`` from ``queries`` forward passes per row, in chunks of at most
        ``max_rows`` queries (rows of different inputs share a chunk when ``queries`` is small)."""
        pairs = self.queries // 2
        pairs_per_call = min(pairs, max(1, self.max_rows // 2))
        inputs_per_call = max(1, self.max_rows // (2 * pairs_per_call))
        loss_fn, grad = LOSSES[self.loss], torch.zeros_like(x)
        for i in range(0, x.shape[0], inputs_per_call):
            x_i, y_i = x[i:i + inputs_per_call], y[i:i + inputs_per_call]
            m = x_i.shape[0]
            for j in range(0, pairs, pairs_per_call):
                pc = min(pairs_per_call, pairs - j)
                v = torch.randint(0, 2, (m, pc, *x.shape[1:]), generator=generator, device=x.device).to(x.dtype)
                v = 2 * v - 1
                centre = x_i.unsqueeze(1)
                queries = torch.cat([(centre + self.delta * v), (centre - self.delta * v)], 1).clamp(0, 1)
                logits = self.model.query_logits(queries.flatten(0, 1), self.query, self.max_rows)
                loss = loss_fn(logits, y_i.repeat_interleave(2 * pc)).view(m, 2 * pc)
                diff = (loss[:, :pc] - loss[:, pc:]) / (2 * self.delta)
                grad[i:i + inputs_per_call] += (diff.view(m, pc, *([1] * (x.ndim - 1))) * v).sum(1)
        return grad / pairs

    def _attack(self, x, y):
        generator = self._generator(x.device)
        if self.update == "sign":
            return self._ascend(x, x, self.step_size,
                                lambda x_i: ascent_direction(self.estimate_gradient(x_i, y, generator), self.norm))
        return self._adam(x, y, generator)

    def _adam(self, x, y, generator, beta1: float = 0.9, beta2: float = 0.999):
        """Uesato et al.'s Algorithm 1: Adam (Kingma & Ba 2015, default betas) ascent on the SPSA estimate."""
        x_adv, m, v = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
        for t in self._iterations():
            g = self.estimate_gradient(x_adv, y, generator)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g**2
            m_hat, v_hat = m / (1 - beta1 ** (t + 1)), v / (1 - beta2 ** (t + 1))
            x_adv = project(x_adv + self.lr * m_hat / (v_hat.sqrt() + 1e-8), x, self.eps, self.norm)
            self._note_iterate(x_adv)
        return x_adv

