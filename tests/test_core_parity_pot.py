"""Parity of ``otfast.sinkhorn`` with POT on plans and values (float64, both run to tight convergence).

POT gets each pair unpadded (its solvers have no masks); otfast gets the padded batch with junk in
the padding and masks. Values are checked against the primal objective computed here from POT's
plan, independently of both libraries' value formulas:

    balanced    OT_eps = <P, C> + eps KL(P || a x b)
    unbalanced  OT_eps = <P, C> + eps KL(P || a x b) + rho KL(P 1 || a) + rho KL(P^T 1 || b)

with the generalised KL(p || q) = sum p log(p / q) - p + q (POT's ``reg_type="kl"``, ``reg_m`` = rho).
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

import otfast
from conftest import PLAN_RTOL_FP64, assert_close, case_id, make_costs

EPS = 0.1
SHAPES = [(1, 1, 7), (3, 7, 7), (2, 37, 7), (2, 7, 37), (1, 37, 37), (2, 1, 1)]
SOLVE = dict(n_iters=20000, tol=1e-12)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Generalised KL divergence sum p log(p / q) - p + q (0 log 0 = 0)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q) - p + q).sum()


def primal(P: torch.Tensor, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float,
           rho: float | None = None) -> torch.Tensor:
    """The entropic (unbalanced) OT objective of plan P; see the module docstring."""
    value = (P * C).sum() + eps * kl(P, a[:, None] * b[None, :])
    if rho is not None:
        value = value + rho * (kl(P.sum(1), a) + kl(P.sum(0), b))
    return value


def _ids(shape):
    return case_id(*shape)


def _check_pairs(res, batch, pot_plan, eps, rho=None):
    """Compare every pair of ``res`` with POT's plan for that pair, and with the primal value."""
    plan = res.plan()
    for i in range(batch.cost.shape[0]):
        C, a, b = batch.pair(i)
        n, m = C.shape
        P = pot_plan(C, a, b)
        assert_close(plan[i, :n, :m], P, rtol=PLAN_RTOL_FP64, atol=0, what=f"plan of pair {i}")
        assert_close(res.value[i], primal(P, C, a, b, eps, rho), rtol=PLAN_RTOL_FP64, atol=0, what=f"value of pair {i}")
        pad = plan[i].clone()
        pad[:n, :m] = 0
        assert torch.equal(pad, torch.zeros_like(pad)), f"plan of pair {i} is not exactly 0 on padding"


def _sinkhorn_log(C, a, b):
    P = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), C.numpy(), EPS, numItermax=100000, stopThr=1e-14, warn=False)
    return torch.from_numpy(P)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_sinkhorn_log_per_pair(shape, weights, padded):
    """Plans and values equal POT's ``ot.bregman.sinkhorn_log`` run on each unpadded pair."""
    B, N, M = shape
    batch = make_costs(B, N, M, seed=1, ragged=padded, weights=weights, junk=1e3 if padded else None)
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, mask_a=batch.mask_a, mask_b=batch.mask_b, eps=EPS,
                          backend="torch", **SOLVE)
    _check_pairs(res, batch, _sinkhorn_log, EPS)


@pytest.mark.parametrize("scaling", [None, 0.5], ids=["fixed-eps", "scaling0.5"])
def test_sinkhorn_log_small_eps(scaling):
    """A harder problem (C / eps up to 50) with and without eps-annealing converges to POT's plan."""
    batch = make_costs(2, 7, 9, seed=2, weights=True, junk=1e3)
    eps = 0.02
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, mask_a=batch.mask_a, mask_b=batch.mask_b, eps=eps,
                          scaling=scaling, backend="torch", n_iters=50000, tol=1e-12)

    def pot(C, a, b):
        return torch.from_numpy(ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), C.numpy(), eps, numItermax=200000,
                                                        stopThr=1e-14, warn=False))
    _check_pairs(res, batch, pot, eps)


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 37, 1), (4, 1, 37)], ids=_ids)
@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weighted"])
def test_solve_batch(shape, weights):
    """Plans and values equal POT's ``ot.solve_batch(..., method="log_sinkhorn", reg_type="kl")``.

    ``solve_batch`` has no masks, so the batch is dense; its ``value`` is <T, M> + reg KL(T || a x b).
    """
    B, N, M = shape
    batch = make_costs(B, N, M, seed=3, ragged=False, weights=weights, junk=None)
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, eps=EPS, backend="torch", **SOLVE)
    a = torch.stack([batch.pair(i)[1] for i in range(B)])
    b = torch.stack([batch.pair(i)[2] for i in range(B)])
    pot = ot.solve_batch(batch.cost.numpy(), reg=EPS, a=a.numpy(), b=b.numpy(), max_iter=100000, tol=1e-14,
                         method="log_sinkhorn", reg_type="kl")
    P = torch.as_tensor(pot.plan)
    assert_close(res.plan(), P, rtol=PLAN_RTOL_FP64, atol=0, what="plan")
    assert_close(res.value, torch.as_tensor(pot.value), rtol=PLAN_RTOL_FP64, atol=0, what="value vs POT value")
    expected = torch.stack([primal(P[i], batch.cost[i], a[i], b[i], EPS) for i in range(B)])
    assert_close(res.value, expected, rtol=PLAN_RTOL_FP64, atol=0, what="value vs primal")


@pytest.mark.parametrize("rho", [0.05, 1.0, 20.0], ids=lambda r: f"rho{r}")
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 7, 9), (2, 37, 7)], ids=_ids)
def test_sinkhorn_unbalanced_per_pair(shape, rho):
    """Unbalanced plans and values equal POT's ``ot.unbalanced.sinkhorn_unbalanced`` (``reg_m`` = rho)."""
    B, N, M = shape
    batch = make_costs(B, N, M, seed=4, weights=True, junk=1e3)
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, mask_a=batch.mask_a, mask_b=batch.mask_b, eps=EPS, rho=rho,
                          backend="torch", **SOLVE)

    def pot(C, a, b):
        P = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), EPS, rho, method="sinkhorn",
                                              reg_type="kl", numItermax=100000, stopThr=1e-15)
        return torch.from_numpy(np.asarray(P))
    _check_pairs(res, batch, pot, EPS, rho)
