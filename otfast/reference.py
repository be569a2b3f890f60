"""The torch backend: a readable, float64 log-domain Sinkhorn, the oracle of every test.

It implements the loop of ``otfast.schedule`` (the soft-min T, its transpose T~ and the dampening d are
defined there) as plainly as possible, and defines what every backend shares: the ``Potentials`` a solve
returns, and the preparation of the points (``prepare_points``) and its backward (``prepare_grad``).

Precision: this backend computes in float64 whatever the input dtype (inputs are converted, results
rounded back once; the potentials stay float64, see ``Potentials``). It is the accuracy anchor, not a
speed path. In fp32, at the paper's settings (C / eps ~ 1e5), three things each cost percent-level gradient
errors (measured with ``python -m benchmarks.accuracy``): plan rows assumed to sum to 1, potentials rounded
to fp32 (one rounding of a potential of the cost's size is a 1% change in the plan), and log-sum-exps
rounded to fp32 at the large temperatures of the annealing (an absolute error of eps_k 2^-24 in the
potentials that the following steps carry down to the final eps). The fused backends say in their headers
how they avoid each.

Gradients (envelope theorem, GeomLoss's convention): the final step f = T(g_prev), g = T~(f_prev) is
differentiated with its inputs g_prev, f_prev held fixed, f through x only and g through y only. With the
plan rows S^x_i = softmax_j(beta_j + (g_prev_j - C_ij) / eps), each normalised by its own log-sum-exp
(never exp(... + f_i / (d eps)), whose rows sum to 1 only in exact arithmetic), likewise the columns
S^y_j = softmax_i(alpha_i + (f_prev_i - C_ij) / eps), and upstream weights u_i = dL/df_i * d,
v_j = dL/dg_j * d, the sqeuclidean cost C_ij = |x_i - y_j|^2 / 2 gives

    dL/dx_i = u_i sum_j S^x_ij (x_i - y_j) = u_i (x_i - sum_j S^x_ij y_j),      dL/dy_j likewise.

The second form (a matrix product) is computed on centred points; its cancellation costs about
2^-53 max|y| / |x_i - (S y)_i| relative here, 2^-24 in an fp32 backend (``tests/test_accuracy.py`` measures
it on nearly aligned points).

The point functions take the raw points and a cost name: rows on padding (log-weight -inf) are
ignored whatever they hold; "sqeuclidean" centres each pair on the mean of its valid points (the cost
is translation invariant, and the norm expansion below then does not cancel), "cosine" normalises the
rows (1 - cos(x, y) is the sqeuclidean cost of unit vectors). ``prepare_points`` is that step and
``prepare_grad`` its backward; every backend follows them.

This module materialises [B, N, M] tensors on purpose: it is the specification, not the fast path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .schedule import Schedule, residual

COSTS = ("sqeuclidean", "cosine")


class Potentials(NamedTuple):
    """What a solve returns; every backend returns the same fields.

    f [B, N], g [B, M]: potentials after the final step (0 on padding), float64 whatever the input dtype.
    f_prev [B, N], g_prev [B, M]: potentials the final step started from (needed by the backward), float64.
    n_iters [B] int32: updates run per pair (annealing steps included, the final step not).
    error [B]: residual of the final step (``otfast.schedule.residual``, rows plus columns).
    """

    f: torch.Tensor
    g: torch.Tensor
    f_prev: torch.Tensor
    g_prev: torch.Tensor
    n_iters: torch.Tensor
    error: torch.Tensor


def prepare_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   cost: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The points a cost is formed from: padding rows 0, then centred ("sqeuclidean") or normalised ("cosine").

    Args:
        x: ``[B, N, D]``, y: ``[B, M, D]`` raw points; alpha ``[B, N]``, beta ``[B, M]``: log-weights,
            -inf on padding; cost: one of ``COSTS``.

    Returns:
        ``(xp, yp)``, with C = sqeuclidean_cost(xp, yp).
    """
    vx, vy = (alpha > -math.inf).unsqueeze(2), (beta > -math.inf).unsqueeze(2)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x, y = torch.where(vx, x, zero), torch.where(vy, y, zero)
    if cost == "cosine":
        return F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    mean = ((x.sum(1) + y.sum(1)) / (vx.sum(1) + vy.sum(1))).unsqueeze(1)
    return torch.where(vx, x - mean, zero), torch.where(vy, y - mean, zero)


def prepare_grad(x: torch.Tensor, xp: torch.Tensor, dxp: torch.Tensor, alpha: torch.Tensor, cost: str) -> torch.Tensor:
    """The gradient with respect to the raw points ``x`` from the one with respect to ``xp = prepare_points(x)``.

    Centring is a translation, which the loss does not see: its gradient passes unchanged. Normalising
    x / |x| has the Jacobian (I - xp xp^T) / |x|. Padding rows get 0.
    """
    if cost == "cosine":
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        dxp = (dxp - xp * (xp * dxp).sum(-1, keepdim=True)) / norm
    return torch.where((alpha > -math.inf).unsqueeze(2), dxp, torch.zeros((), dtype=dxp.dtype, device=dxp.device))


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C_ij = |x_i - y_j|^2 / 2 for ``x [B, N, D]``, ``y [B, M, D]`` -> ``[B, N, M]``.

    Callers centre x and y first (``prepare_points``) so that the norm expansion
    |x|^2/2 + |y|^2/2 - <x, y> does not cancel catastrophically.
    """
    xx = (x * x).sum(-1, keepdim=True) / 2
    yy = (y * y).sum(-1).unsqueeze(1) / 2
    return (xx + yy - x @ y.transpose(1, 2)).clamp_min(0)


def softmin(C: torch.Tensor, h: torch.Tensor, eps: float, damping: float, mask: torch.Tensor) -> torch.Tensor:
    """-d eps LSE_j(h_j - C_ij / eps) over the last axis, 0 where ``mask`` is False."""
    out = -damping * eps * torch.logsumexp(h.unsqueeze(1) - C / eps, dim=2)
    return torch.where(mask, out, torch.zeros_like(out))


def solve(cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """Run the Sinkhorn loop on a batch of cost matrices.

    Args:
        cost_matrix: ``[B, N, M]`` cost, finite everywhere (padding entries are ignored); converted to float64.
        alpha: ``[B, N]`` log-weights, -inf on padding; beta: ``[B, M]``.
        schedule: temperatures, iteration count, tolerance and rho.
        symmetric: the cost is symmetric and alpha == beta (the OT(a, a) problem of the debiased loss):
            one potential, f == g, and only the row pass runs.

    Returns:
        ``Potentials`` (float64 potentials and error).
    """
    C, alpha, beta = cost_matrix.double(), alpha.double(), beta.double()
    Ct = C.transpose(1, 2)
    mask_a, mask_b = alpha > -math.inf, beta > -math.inf

    def update(f, g, eps):
        damping = schedule.damping(eps)
        ft = softmin(C, beta + g / eps, eps, damping, mask_a)
        gt = ft if symmetric else softmin(Ct, alpha + f / eps, eps, damping, mask_b)
        return ft, gt

    f, g = update(torch.zeros_like(alpha), torch.zeros_like(beta), schedule.eps_init)
    for eps in schedule.anneal:
        ft, gt = update(f, g, eps)
        f, g = (f + ft) / 2, (g + gt) / 2

    eps = schedule.eps
    n_done = torch.full(alpha.shape[:1], len(schedule.anneal), dtype=torch.int32, device=C.device)
    active = torch.ones(alpha.shape[:1], dtype=torch.bool, device=C.device)
    for _ in range(schedule.n_iters):
        ft, gt = update(f, g, eps)
        if schedule.tol is not None:
            err = residual(f, ft, alpha, eps) + residual(g, gt, beta, eps)
            active = active & (err > schedule.tol)
            if not bool(active.any()):
                break
        f = torch.where(active[:, None], (f + ft) / 2, f)
        g = torch.where(active[:, None], (g + gt) / 2, g)
        n_done += active.to(torch.int32)

    f_new, g_new = update(f, g, eps)
    error = residual(f, f_new, alpha, eps) + residual(g, g_new, beta, eps)
    return Potentials(f_new, g_new, f, g, n_done, error)


def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """``solve`` on the cost ``cost`` between the raw points ``x [B, N, D]`` and ``y [B, M, D]`` (in float64)."""
    xp, yp = prepare_points(x.double(), y.double(), alpha.double(), beta.double(), cost)
    return solve(sqeuclidean_cost(xp, yp), alpha, beta, schedule, symmetric)


def plan_rows(C: torch.Tensor, q: torch.Tensor, logw: torch.Tensor, eps: float, mask: torch.Tensor) -> torch.Tensor:
    """S_ij = softmax_j(logw_j + (q_j - C_ij) / eps), each row normalised by its own log-sum-exp; 0 where
    ``mask`` is False."""
    S = torch.softmax(logw.unsqueeze(1) + (q.unsqueeze(1) - C) / eps, dim=2)
    return torch.where(mask.unsqueeze(2), S, torch.zeros_like(S))


def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients of a loss through the final step, with respect to the raw points.

    Args:
        x, y: the raw points the solve ran on, and its ``cost``.
        pots: the ``Potentials`` of that solve (only f_prev and g_prev are read).
        u: ``[B, N]`` = dL/df * damping; v: ``[B, M]`` = dL/dg * damping, or None to skip dy
            (the symmetric problems, where the second argument of C is held fixed, as in GeomLoss).

    Returns:
        ``(dx [B, N, D], dy [B, M, D] or None)`` in x's dtype.
    """
    dtype = x.dtype
    x, y, alpha, beta = x.double(), y.double(), alpha.double(), beta.double()
    xp, yp = prepare_points(x, y, alpha, beta, cost)
    C = sqeuclidean_cost(xp, yp)
    Sx = plan_rows(C, pots.g_prev.double(), beta, eps, alpha > -math.inf)
    dx = prepare_grad(x, xp, u.double().unsqueeze(2) * (xp - Sx @ yp), alpha, cost).to(dtype)
    if v is None:
        return dx, None
    Sy = plan_rows(C.transpose(1, 2), pots.f_prev.double(), alpha, eps, beta > -math.inf)
    return dx, prepare_grad(y, yp, v.double().unsqueeze(2) * (yp - Sy @ xp), beta, cost).to(dtype)
