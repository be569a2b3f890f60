"""The one specification of otfast's Sinkhorn loop, which every backend implements and cites.

Per pair: cost C [N, M], log-weights alpha [N], beta [M] (-inf on padding, which enters every LSE as
-inf; potentials are 0 there), temperature eps, and the dampening d = 1 / (1 + eps / rho) of unbalanced
OT with KL penalty rho (d = 1 when balanced, ``Schedule.damping``). The soft-min (C-transform) and its
transpose:

    T(g)_i  = -d eps LSE_j( beta_j  + (g_j - C_ij) / eps )        (row pass, reduce over j)
    T~(f)_j = -d eps LSE_i( alpha_i + (f_i - C_ij) / eps )        (column pass, reduce over i)

The loop is GeomLoss's symmetric one (Feydy 2020, thesis Algorithm 3.5), with the fields of ``Schedule``:

    init      f = T_{eps_init}(0),  g = T~_{eps_init}(0)
    anneal    for eps in anneal:          f, g <- (f + T(g)) / 2, (g + T~(f)) / 2
    iterate   n_iters times at the final eps, same update; a pair stops once its residual
              (``residual``, rows plus columns) is <= tol
    final     f, g <- T(g), T~(f)         (the "extrapolation" step; gradients go through it alone)

A backend returns the final f, g, the potentials f_prev, g_prev the final step started from, the updates
run per pair and the final step's residual (``otfast.reference.Potentials``). A symmetric problem (C
symmetric, alpha = beta: OT(a, a) of the debiased loss) has one potential, f = g, and only the row pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Annealing:
    """GeomLoss's annealing list (``epsilon_schedule``, p = 2) from a diameter that lives on the device.

    A backend that runs its loop on the device derives the temperatures there (the Triton kernels do), so
    that nothing waits for the diameter; the others ask ``Schedule.on_host()`` for the list. Not a sequence
    on purpose: code that expects the list fails loudly here instead of reading (diameter, blur, scaling) as
    temperatures.

    Attributes:
        diameter: 0-d float64 tensor, the annealing start (already at least ``blur``).
        blur: the final temperature's square root.
        scaling: the annealing factor in (0, 1).
    """

    diameter: torch.Tensor
    blur: float
    scaling: float

    def length(self) -> torch.Tensor:
        """0-d int64 tensor on the diameter's device: the number of temperatures, ``len(epsilon_schedule(...))``
        (the length of ``arange(2 log diameter, 2 log blur, 2 log scaling)`` plus the first and last)."""
        start, end, step = 2 * torch.log(self.diameter), 2 * math.log(self.blur), 2 * math.log(self.scaling)
        return torch.ceil((end - start) / step).clamp_min(0).to(torch.int64) + 2


@dataclass(frozen=True)
class Schedule:
    """The iteration plan of one solve, identical for every backend.

    Attributes:
        eps: the final temperature.
        anneal: temperatures of the annealing steps, one symmetric update each (empty for a fixed eps), or an
            ``Annealing`` to derive them from a device diameter.
        n_iters: further updates at ``eps`` after the annealing steps.
        tol: per-pair stop once the residual (see ``residual``) is <= tol; None runs all ``n_iters``.
        rho: KL penalty on the marginals (unbalanced OT), None for balanced OT.
    """

    eps: float
    anneal: tuple[float, ...] | Annealing = ()
    n_iters: int = 100
    tol: float | None = None
    rho: float | None = None

    @property
    def eps_init(self) -> float:
        return self.anneal[0] if self.anneal else self.eps

    def damping(self, eps: float) -> float:
        return 1.0 if self.rho is None else 1.0 / (1.0 + eps / self.rho)

    def on_host(self) -> Schedule:
        """The same schedule with the annealing temperatures as floats (reads a device diameter once)."""
        if not isinstance(self.anneal, Annealing):
            return self
        ann = self.anneal
        return replace(self, anneal=epsilon_schedule(float(ann.diameter), ann.blur, ann.scaling))

    def n_anneal(self) -> int | torch.Tensor:
        """The number of annealing steps: an int, or a 0-d tensor on the device of an ``Annealing``'s diameter."""
        return self.anneal.length() if isinstance(self.anneal, Annealing) else len(self.anneal)


def epsilon_schedule(diameter: float, blur: float, scaling: float, p: float = 2.0) -> tuple[float, ...]:
    """GeomLoss's annealing list: diameter^p, then down by scaling^p per step, then blur^p.

    ``[diameter^p] + [exp(e) for e in arange(p log diameter, p log blur, p log scaling)] + [blur^p]``,
    exactly as ``geomloss.sinkhorn_divergence.epsilon_schedule`` builds it (the first value appears
    twice there too).
    """
    if not math.isfinite(diameter) or p * math.log(diameter) >= math.log(torch.finfo(torch.float64).max):
        raise ValueError(f"the annealing start (the bounding-box diagonal of the valid points, or diameter=) is "
                         f"{diameter:g}, too large to anneal from in float64: scale the embeddings or pass a "
                         "smaller diameter=")
    steps = torch.arange(p * math.log(diameter), p * math.log(blur), p * math.log(scaling), dtype=torch.float64)
    return (diameter**p, *(math.exp(float(e)) for e in steps), blur**p)


def bounding_diameter(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> torch.Tensor:
    """Diagonal of the bounding box of all valid points of the batch (GeomLoss's ``max_diameter``), as a 0-d
    float64 tensor on the points' device (computed there: nothing waits for it).

    Args:
        x: ``[B, N, D]``, y: ``[B, M, D]``; mask_x ``[B, N]``, mask_y ``[B, M]`` bool.
    """
    def extreme(t, mask, fill, reduce):  # amax/amin: no indices (``max(dim=)`` is ~7x slower)
        return reduce(torch.where(mask.unsqueeze(-1), t.detach(), fill), dim=(0, 1))

    inf = x.new_full((), math.inf)  # filled on the device: a copy from the host would wait (and break a capture)
    hi = torch.maximum(extreme(x, mask_x, -inf, torch.amax), extreme(y, mask_y, -inf, torch.amax))
    lo = torch.minimum(extreme(x, mask_x, inf, torch.amin), extreme(y, mask_y, inf, torch.amin))
    return (hi - lo).double().norm()


def phi(f: torch.Tensor, eps: float, rho: float | None, *, grad: bool = False) -> torch.Tensor:
    """Per-point contribution to the dual value: f (balanced) or c (1 - exp(-f/rho)) with c = rho + eps/2.

    The unbalanced form is GeomLoss's ``sinkhorn_cost`` (Sejourne et al. 2019, Prop. 12), equal to the
    dual objective at convergence when both measures have unit mass. Its exact gradients (with respect
    to the weights, and through f to the points) use c = rho + eps instead (``grad=True``): the
    "surprising inconsistency" GeomLoss documents in ``UnbalancedWeight`` but never applies, because
    autograd does not call an ``nn.Module``'s ``backward`` method. otfast applies it, so that its
    unbalanced gradients are the derivatives of the values it returns (checked by gradcheck).
    """
    if rho is None:
        return f
    return -(rho + (eps if grad else eps / 2)) * torch.expm1(-f / rho)


def phi_prime(f: torch.Tensor, eps: float, rho: float | None) -> torch.Tensor:
    """d phi / d f with the gradient constant of ``phi(..., grad=True)``."""
    if rho is None:
        return torch.ones_like(f)
    return (rho + eps) / rho * torch.exp(-f / rho)


def residual(f_old: torch.Tensor, f_new: torch.Tensor, log_w: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_i w_i |exp((f_old_i - f_new_i) / eps) - 1| per pair.

    With f_new = T(g), this is exactly the L1 error of the row marginal of the plan P(f_old, g) in
    balanced OT, and a fixed-point residual in unbalanced OT.
    """
    term = torch.exp(log_w) * torch.expm1((f_old - f_new) / eps).abs()
    return torch.where(log_w > -math.inf, term, torch.zeros_like(term)).sum(dim=-1)


def unconverged(n_iters: torch.Tensor, error: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """``[B]`` bool: the pairs that ran every update of ``schedule`` with their residual still above ``tol``.

    A pair that stopped early did reach ``tol``; the residual of the final extrapolation step that follows
    can land a rounding above it, which is not a failure to converge. All False without a ``tol``.
    """
    if schedule.tol is None:
        return torch.zeros_like(error, dtype=torch.bool)
    return (n_iters >= schedule.n_anneal() + schedule.n_iters) & (error > schedule.tol)
