"""The C++ CPU backend (``otfast.kernels.cpu``) against the torch reference.

Every option runs on both backends with the same inputs, through the public API (``sinkhorn_loss``,
``sinkhorn``) and through the backend functions themselves: fixed eps and annealing, per-pair tol (iteration
counts compared exactly), balanced and unbalanced, debias on and off, both costs, odd lengths (1, 7, 37,
and around the kernel's 16-lane blocks), masks with junk in the padding, weights, float32 and float64.
Both compute in float64 whatever the input dtype: values and gradients agree to 1e-6 in float32 (the
final rounding) and to 1e-9 / 1e-8 in float64 (relative to the largest reference entry). Results are bitwise
identical whatever the thread count, and bad input still gets the core API's errors.

Outside CI the module is skipped, with otfast's reason, when the extension was not built; in CI (where
``CI`` is set) it runs regardless, so a broken build fails loudly instead of skipping.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import otfast
from conftest import assert_close, assert_finite_at_extreme_eps, case_id, make_costs, make_points
from otfast import reference
from otfast.backends import resolve
from otfast.schedule import Schedule

INFO = otfast.backends()["cpu"]
if not INFO.available and not os.environ.get("CI"):
    pytest.skip(f"cpu backend unavailable: {INFO.detail}", allow_module_level=True)

from otfast import cpu_backend as launch  # noqa: E402  (after the skip: the import itself is fine, its use is not)

DTYPES = [torch.float32, torch.float64]
# Both backends compute in float64 whatever the input dtype, so float32 results agree to their final rounding.
VALUE_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-9, atol=1e-12)}
GRAD_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float64: dict(rtol=1e-8, atol=1e-12)}
ERROR_ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Stopping tolerances for exact iteration-count comparisons: well above the rounding noise of the residual,
# which is a sum of |exp((f_old - f_new) / eps) - 1| and loses digits to the difference in fp32.
STOP_TOL = {torch.float32: 1e-2, torch.float64: 1e-6}

SETTINGS = {
    "fixed-cosine": dict(cost="cosine", eps=0.1, scaling=None, n_iters=40, debias=False),
    "fixed-debias": dict(eps=0.5, scaling=None, n_iters=30, debias=True),
    "anneal-debias": dict(blur=0.3, scaling=0.5, debias=True),
    "anneal-cosine": dict(cost="cosine", blur=0.2, scaling=0.7, n_iters=5, debias=False),
    "unbalanced-anneal": dict(blur=0.5, scaling=0.5, reach=1.0, debias=True),
    "unbalanced-fixed": dict(eps=0.3, scaling=None, n_iters=50, reach=2.0, debias=False),
    "tol": dict(eps=1.0, scaling=None, n_iters=300, tol=1e-4, debias=False),
    "tol-anneal-debias": dict(cost="cosine", blur=0.3, scaling=0.5, n_iters=200, tol=1e-5, debias=True),
}
# (N, M, D): the lengths 1, 7, 37 of the issue, plus 16/17/33 around the 16-lane blocks; D below, at and
# above one vector of lanes (the dot products' tail).
SHAPES = [(1, 7, 5), (7, 37, 16), (37, 1, 37), (17, 16, 13), (33, 20, 8)]
LOSS_CASES = [(n, m, d, s, dt) for n, m, d in SHAPES for s in SETTINGS for dt in DTYPES]


def _run(batch, backend, weights_grad=True, **kw):
    """Loss per pair and the gradients of its sum: (value [B], dx, dy, d weights_x or None)."""
    x, y = batch.x.clone().requires_grad_(), batch.y.clone().requires_grad_()
    wx = batch.weights_x
    if wx is not None and weights_grad:
        wx = wx.clone().requires_grad_()
    loss = otfast.sinkhorn_loss(x, y, batch.mask_x, batch.mask_y, weights_x=wx, weights_y=batch.weights_y,
                                reduction="none", backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad, y.grad, None if wx is None or not weights_grad else wx.grad


@pytest.mark.parametrize("N,M,D,setting,dtype", LOSS_CASES,
                         ids=[case_id(3, n, m, d, dt, s=s) for n, m, d, s, dt in LOSS_CASES])
def test_loss_and_gradients_match_reference(N, M, D, setting, dtype):
    batch = make_points(3, N, M, D, dtype=dtype, seed=N * 1000 + M, weights=setting in ("anneal-debias", "tol"))
    kw = SETTINGS[setting]
    ref = _run(batch, "torch", **kw)
    got = _run(batch, "cpu", **kw)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None) and (g is None or g.dtype == r.dtype)
    assert_close(got[0], ref[0], **VALUE_TOL[dtype], what="value")
    assert_close(got[1], ref[1], **GRAD_TOL[dtype], what="dx")
    assert_close(got[2], ref[2], **GRAD_TOL[dtype], what="dy")
    if ref[3] is not None:  # f - <a, f> (normalised weights): exactly 0 at N = 1 up to the rounding of f
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        assert_close(got[3], ref[3], rtol=GRAD_TOL[dtype]["rtol"], atol=atol, what="d weights_x")


COST_CASES = [(n, m, rho, scaling, dt) for n, m in [(1, 7), (7, 37), (37, 20), (129, 40)]
              for rho, scaling in [(None, None), (0.5, 0.7), (None, 0.5), (2.0, None)] for dt in DTYPES]


@pytest.mark.filterwarnings("ignore:sinkhorn. . of 3 pairs did not reach tol")  # some pairs run all n_iters
@pytest.mark.parametrize("N,M,rho,scaling,dtype", COST_CASES,
                         ids=[case_id(3, n, m, None, dt, rho=r, scaling=s) for n, m, r, s, dt in COST_CASES])
def test_sinkhorn_on_costs_matches_reference(N, M, rho, scaling, dtype):
    """``otfast.sinkhorn``: potentials, values, plans, per-pair iteration counts (exactly) and errors."""
    batch = make_costs(3, N, M, dtype=dtype, seed=N + M, weights=True)
    kw = dict(mask_a=batch.mask_a, mask_b=batch.mask_b, eps=0.05, n_iters=300, tol=STOP_TOL[dtype], rho=rho,
              scaling=scaling)
    ref = otfast.sinkhorn(batch.cost, batch.a, batch.b, backend="torch", **kw)
    got = otfast.sinkhorn(batch.cost, batch.a, batch.b, backend="cpu", **kw)
    assert torch.equal(got.n_iters, ref.n_iters), (got.n_iters, ref.n_iters)
    assert got.n_iters.dtype == torch.int32
    assert_close(got.value, ref.value, **VALUE_TOL[dtype], what="value")
    assert_close(got.f, ref.f, **VALUE_TOL[dtype], what="f")
    assert_close(got.g, ref.g, **VALUE_TOL[dtype], what="g")
    # the error of a converged pair sits at the rounding floor of its dtype, where only its size is comparable
    assert_close(got.marginal_error, ref.marginal_error, rtol=1e-3, atol=ERROR_ATOL[dtype], what="marginal error")
    assert_close(got.plan(), ref.plan(), **GRAD_TOL[dtype], what="plan")
    pad_a, pad_b = batch.mask_a == 0, batch.mask_b == 0
    assert bool((got.f[pad_a] == 0).all()) and bool((got.g[pad_b] == 0).all()), "potentials must be 0 on padding"


KERNEL_CASES = [(0.01, 1.0, torch.float32), (0.005, 1.0, torch.float32), (0.02, 3.0, torch.float32),
                (0.1, 10.0, torch.float32), (0.002, 1.0, torch.float64), (0.05, 30.0, torch.float64)]


@pytest.mark.parametrize("eps,scale,dtype", KERNEL_CASES,
                         ids=[f"eps{e}-scale{s}-{str(dt)[6:]}" for e, s, dt in KERNEL_CASES])
def test_kernel_domain_iterations_match_reference(eps, scale, dtype):
    """The fixed-temperature iterations run on kernels exp((f_hat + g_hat - C) / eps) while their sums stay
    in range, form them again when the potentials drift, and fall back to the log domain when a fresh
    kernel cannot hold the pair (C / eps in the thousands). These temperatures and cost scales exercise
    all three (checked with a counting build when written); every one must give the reference's answer."""
    batch = make_costs(3, 30, 25, dtype=dtype, seed=4, weights=True, scale=scale)
    kw = dict(mask_a=batch.mask_a, mask_b=batch.mask_b, eps=eps, n_iters=300)
    ref = otfast.sinkhorn(batch.cost, batch.a, batch.b, backend="torch", **kw)
    got = otfast.sinkhorn(batch.cost, batch.a, batch.b, backend="cpu", **kw)
    assert_close(got.value, ref.value, **VALUE_TOL[dtype], what="value")
    f_atol = 5 * eps * (1e-5 if dtype == torch.float32 else 1e-12)  # potentials: ~eps ulp(C / eps) apart
    assert_close(got.f, ref.f, rtol=VALUE_TOL[dtype]["rtol"], atol=f_atol, what="f")
    assert_close(got.g, ref.g, rtol=VALUE_TOL[dtype]["rtol"], atol=f_atol, what="g")
    assert_close(got.plan(), ref.plan(), **GRAD_TOL[dtype], what="plan")


@pytest.mark.parametrize("dtype,tiny,c", [(torch.float32, 1e-38, 52.0), (torch.float32, 1e-38, 70.0),
                                           (torch.float64, 2e-308, 380.0)], ids=["fp32-c52", "fp32-c70", "fp64"])
def test_weight_below_the_normal_range_keeps_its_term(dtype, tiny, c):
    """A weight below the smallest normal number (subnormal) must weigh in the kernel-domain sums as in the
    log domain: kept in the kernel's exponent, it is not flushed with the denormals (a review found it
    lost when the weight was a separate factor)."""
    C = torch.tensor([[0.0, c], [c, 0.0]], dtype=dtype)
    a = torch.tensor([1.0, tiny], dtype=dtype)
    for kw in (dict(n_iters=300), dict(n_iters=300, scaling=0.9)):
        ref = otfast.sinkhorn(C, a, a, eps=1.0, backend="torch", **kw)
        got = otfast.sinkhorn(C, a, a, eps=1.0, backend="cpu", **kw)
        assert_close(got.f, ref.f, **VALUE_TOL[dtype], what="f")
        assert_close(got.value, ref.value, **VALUE_TOL[dtype], what="value")


def test_points_sharing_memory_with_different_lengths():
    """x [B, N, D] and y [B, M, D] that are two views of one buffer (same data pointer, N != M), with
    alpha and beta likewise, are two point sets, not one symmetric problem."""
    B, N, M, D = 2, 9, 6, 5
    buf = torch.randn(B * N * D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, y = buf.view(B, N, D), buf[:B * M * D].view(B, M, D)
    logw = torch.full((B * N,), -math.log(N), dtype=torch.float64)
    alpha, beta = logw.view(B, N), logw[:B * M].view(B, M)
    sched = Schedule(eps=0.5, n_iters=50)
    ref = reference.solve_points(x, y, alpha, beta, sched)
    got = launch.solve_points(x, y, alpha, beta, sched)
    assert_close(got.f, ref.f, **VALUE_TOL[torch.float64], what="f")
    assert_close(got.g, ref.g, **VALUE_TOL[torch.float64], what="g")


def test_sinkhorn_cost_gradient_matches_reference():
    batch = make_costs(2, 9, 11, dtype=torch.float64, seed=8)
    grads = {}
    for be in ("torch", "cpu"):
        cost = batch.cost.clone().requires_grad_()
        otfast.sinkhorn(cost, mask_a=batch.mask_a, mask_b=batch.mask_b, eps=0.1, backend=be).value.sum().backward()
        grads[be] = cost.grad
    assert_close(grads["cpu"], grads["torch"], **GRAD_TOL[torch.float64], what="d cost")


def _log_weights(batch):
    a = batch.mask_x.double() if batch.weights_x is None else batch.weights_x.double() * batch.mask_x
    b = batch.mask_y.double() if batch.weights_y is None else batch.weights_y.double() * batch.mask_y
    return (a / a.sum(1, keepdim=True)).log(), (b / b.sum(1, keepdim=True)).log()


def _raw(batch, dtype):
    """The points as the model gives them: uncentred, NaN on padding (the kernel must never read them)."""
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    x = torch.where(batch.mask_x.bool()[..., None], batch.x.double(), nan)
    y = torch.where(batch.mask_y.bool()[..., None], batch.y.double(), nan)
    return x.to(dtype), y.to(dtype)


SCHEDULES = {  # temperatures on the scale of the costs (|x_i - y_j|^2 / 2 ~ D = 11): plans far from identity
    "fixed": dict(eps=2.0, n_iters=60),
    "anneal-unbalanced": dict(eps=1.0, anneal=(30.0, 30.0, 8.0, 2.0, 1.0), n_iters=3, rho=5.0),
    "tol": dict(eps=1.0, n_iters=400, tol=True),
    "tol-unbalanced": dict(eps=1.0, n_iters=400, tol=True, rho=3.0),
    "no-iters": dict(eps=1.0, n_iters=0, tol=True),
}


@pytest.mark.parametrize("cost", reference.COSTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_backend_functions_match_reference(name, dtype, cost):
    """solve_points (plain and symmetric) on raw points, solve on their cost (plain and symmetric) and
    grad_points with respect to the raw points, field by field."""
    batch = make_points(4, 21, 13, 11, dtype=dtype, seed=len(name), weights=True)
    x, y = _raw(batch, dtype)
    alpha, beta = (t.to(dtype) for t in _log_weights(batch))
    kw = dict(SCHEDULES[name])
    if cost == "cosine":  # costs in [0, 2] instead of ~11: temperatures scaled alike
        kw["eps"] /= 20
        kw["anneal"] = tuple(e / 20 for e in kw.get("anneal", ()))
    sched = Schedule(**{**kw, "tol": STOP_TOL[dtype] / 10 if kw.get("tol") else None})
    problems = [(x, y, alpha, beta, False), (x, x, alpha, alpha, True), (y, y, beta, beta, True)]
    for xx, yy, aa, bb, sym in problems:
        ref = reference.solve_points(xx, yy, aa, bb, sched, sym, cost)
        pots = launch.solve_points(xx, yy, aa, bb, sched, sym, cost)
        cost_matrix = reference.sqeuclidean_cost(*reference.prepare_points(xx, yy, aa, bb, cost))
        for got in (pots, launch.solve(cost_matrix, aa, bb, sched, sym)):
            assert torch.equal(got.n_iters, ref.n_iters), (sym, got.n_iters, ref.n_iters)
            for field in ("f", "g", "f_prev", "g_prev"):
                assert getattr(got, field).dtype == torch.float64  # potentials are float64 in every backend
                assert_close(getattr(got, field), getattr(ref, field), **VALUE_TOL[dtype], what=field)
            assert_close(got.error, ref.error, rtol=1e-3, atol=ERROR_ATOL[dtype], what="error")
        # each backend differentiates through its own potentials, as the loss op's backward does (otfast/ops.py)
        gen = torch.Generator().manual_seed(1)
        u = torch.randn(aa.shape, generator=gen, dtype=torch.float64).to(dtype)
        v = None if sym else torch.randn(bb.shape, generator=gen, dtype=torch.float64).to(dtype)
        want = reference.grad_points(xx, yy, aa, bb, ref._replace(n_iters=None, error=None), sched.eps, u, v, cost)
        have = launch.grad_points(xx, yy, aa, bb, pots._replace(n_iters=None, error=None), sched.eps, u, v, cost)
        assert have[0].dtype == dtype
        assert_close(have[0], want[0], **GRAD_TOL[dtype], what="dx")
        assert bool((have[0][aa == -torch.inf] == 0).all()), "dx must be 0 on padding"
        assert (have[1] is None) == sym
        if not sym:
            assert_close(have[1], want[1], **GRAD_TOL[dtype], what="dy")


@pytest.mark.filterwarnings("ignore:sinkhorn. 1 of 2 pairs did not reach tol")  # the hard pair, on purpose
def test_tolerance_stops_pairs_independently():
    """An easy pair (y = x) stops long before a hard one in the same call, as in the reference."""
    batch = make_points(2, 20, 20, 8, dtype=torch.float64, seed=3, ragged=False, junk=None)
    y = batch.y.clone()
    y[0] = batch.x[0]
    cost = reference.sqeuclidean_cost(batch.x, y)
    out = {be: otfast.sinkhorn(cost, eps=0.05, n_iters=500, tol=1e-5, backend=be) for be in ("torch", "cpu")}
    assert out["cpu"].n_iters[0] < out["cpu"].n_iters[1]
    assert torch.equal(out["cpu"].n_iters, out["torch"].n_iters)


def _launch_everything(batch, dtype):
    """Every output of the three backend functions on one batch (tol, annealing, unbalanced, symmetric; both
    costs, so centring, normalising and its backward too)."""
    x, y = _raw(batch, dtype)
    alpha, beta = (t.to(dtype) for t in _log_weights(batch))
    out = []
    for sched, cost in ((Schedule(eps=0.1, anneal=(2.0, 1.0, 0.5), n_iters=200, tol=1e-4, rho=2.0), "sqeuclidean"),
                        (Schedule(eps=0.2), "sqeuclidean"), (Schedule(eps=0.02, n_iters=30), "cosine")):
        pots = launch.solve_points(x, y, alpha, beta, sched, False, cost)
        sym = launch.solve_points(x, x, alpha, alpha, sched, True, cost)
        u, v = torch.ones_like(alpha), torch.ones_like(beta)
        grads = launch.grad_points(x, y, alpha, beta, pots, sched.eps, u, v, cost)
        out += [*pots, *sym, *grads]
    return out


@pytest.mark.parametrize("B", [1, 2, 5], ids=["B1-split-pair", "B2", "B5-over-pairs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_bitwise_identical_across_thread_counts(B, dtype):
    """1, 2 and 3 threads: over pairs (B >= threads) or within one pair (B < threads and N M >= 64^2: the
    kernel splits large pairs only), same bits."""
    batch = make_points(B, 70, 65, 19, dtype=dtype, seed=B, weights=True)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_launch_everything(batch, dtype))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert torch.equal(got, want)


def test_repeated_loss_is_bitwise_identical():
    batch = make_points(3, 7, 37, 8, dtype=torch.float32, seed=2, weights=True)
    first, second = _run(batch, "cpu"), _run(batch, "cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_nan_in_padding_is_ignored():
    batch = make_points(3, 9, 12, 8, dtype=torch.float32, seed=6, junk=float("nan"))
    ref, got = _run(batch, "torch", blur=0.3), _run(batch, "cpu", blur=0.3)
    assert_close(got[0], ref[0], **VALUE_TOL[torch.float32], what="value")
    assert_close(got[1], ref[1], **GRAD_TOL[torch.float32], what="dx")


def test_strided_inputs():
    base = make_points(2, 9, 11, 16, dtype=torch.float32, seed=5, junk=None)
    x, y = base.x[:, :, ::2], base.y.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 1::2]
    assert not x.is_contiguous() and not y.is_contiguous()
    ref = otfast.sinkhorn_loss(x, y, base.mask_x, base.mask_y, reduction="none", backend="torch")
    got = otfast.sinkhorn_loss(x, y, base.mask_x, base.mask_y, reduction="none", backend="cpu")
    assert_close(got, ref, **VALUE_TOL[torch.float32], what="value")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_run_in_fp32(dtype):
    batch = make_points(2, 12, 17, 8, dtype=dtype, seed=11)
    ref, got = _run(batch, "torch", blur=0.3), _run(batch, "cpu", blur=0.3)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for r, g, what in zip(ref[:3], got[:3], ("value", "dx", "dy")):
        assert_close(g.float(), r.float(), **(VALUE_TOL if what == "value" else GRAD_TOL)[torch.float32], what=what)


@pytest.mark.parametrize("N,M", [(7, 37), (129, 40)], ids=lambda v: str(v))
def test_paper_setting_within_fp32_tolerance_of_the_fp64_oracle(N, M):
    """GeomLoss's defaults (blur = 0.05: eps = 0.0025, annealing, debias), where C / eps is in the thousands and
    fp32 rounding of the cost moves the potentials by ~1e-5 in any fp32 solver (torch's too): the fp32 kernel
    is held to the float64 oracle with the suite's fp32 tolerance, not to the fp32 torch run."""
    oracle = _run(make_points(2, N, M, 8, dtype=torch.float64, seed=7), "torch")
    got = _run(make_points(2, N, M, 8, dtype=torch.float32, seed=7), "cpu")
    for g, o, what in zip(got[:3], oracle[:3], ("value", "dx", "dy")):
        assert_close(g, o, dtype=torch.float32, what=what)


def test_no_nan_at_extreme_eps():
    assert_finite_at_extreme_eps(_run, "cpu")


def test_registered_and_picked_by_auto():
    assert INFO.available, INFO.detail
    assert INFO.detail == launch.DESCRIPTION and launch.UNAVAILABLE is None
    assert resolve("auto", torch.device("cpu")) is launch
    assert resolve("cpu", torch.device("cpu")) is launch


# --- bad input: the core API's errors, and the binding's own checks --------------------------------

@pytest.fixture
def pts():
    return make_points(2, 4, 5, 3, dtype=torch.float32, seed=30, ragged=False, junk=None)


def test_nan_in_x_is_rejected(pts):
    x = pts.x.clone()
    x[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        otfast.sinkhorn_loss(x, pts.y, backend="cpu")


def test_pair_without_valid_token_is_rejected(pts):
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(ValueError, match="pair at batch index 1 has no valid token"):
        otfast.sinkhorn_loss(pts.x, pts.y, mask, None, backend="cpu")


def test_bad_eps_and_weights_are_rejected(pts):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        otfast.sinkhorn_loss(pts.x, pts.y, eps=0.0, backend="cpu")
    with pytest.raises(ValueError, match="negative weights"):
        otfast.sinkhorn_loss(pts.x, pts.y, weights_x=-torch.ones(2, 4), backend="cpu")


def test_nan_cost_is_rejected():
    cost = make_costs(2, 4, 5, dtype=torch.float32, seed=31, ragged=False, junk=None).cost
    cost[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="cost_matrix contains NaN"):
        otfast.sinkhorn(cost, eps=0.1, backend="cpu")


def test_binding_rejects_inconsistent_buffers():
    """The extension checks what it is given rather than reading out of bounds."""
    from otfast.kernels.cpu import _sinkhorn

    f64 = torch.float64
    x, y = torch.zeros(2, 3, 4, dtype=f64).numpy(), torch.zeros(2, 5, 4, dtype=f64).numpy()
    alpha, beta = torch.full((2, 3), -1.0986, dtype=f64).numpy(), torch.full((2, 5), -1.6094, dtype=f64).numpy()
    args = dict(anneal=[], eps=0.1, n_iters=3, tol=None, rho=None, symmetric=False, cosine=False, threads=1)
    with pytest.raises(ValueError, match="y has the wrong shape"):
        _sinkhorn.solve_points(x, y[:, :, :3].copy(), alpha, beta, **args)
    with pytest.raises(ValueError, match="must be a float64 array"):
        _sinkhorn.solve_points(x, y.astype("float32"), alpha, beta, **args)
    with pytest.raises(ValueError, match="C-contiguous"):
        _sinkhorn.solve_points(x, y.transpose(0, 2, 1).copy().transpose(0, 2, 1), alpha, beta, **args)
    with pytest.raises(ValueError, match="eps must be > 0"):
        _sinkhorn.solve_points(x, y, alpha, beta, **{**args, "eps": 0.0})

    f, g = torch.zeros(2, 3, dtype=f64).numpy(), torch.zeros(2, 5, dtype=f64).numpy()
    grad = dict(x=x, y=y, alpha=alpha, beta=beta, f_prev=f, g_prev=g, eps=0.1, u=f, v=g, cosine=True,
                dx=np.empty_like(x), dy=np.empty_like(y), threads=1)
    with pytest.raises(ValueError, match="dx has the wrong shape"):
        _sinkhorn.grad_points(**{**grad, "dx": np.empty_like(y)})
    read_only = np.empty_like(y)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="dy must be writeable"):
        _sinkhorn.grad_points(**{**grad, "dy": read_only})
    with pytest.raises(ValueError, match="v and dy are given together"):
        _sinkhorn.grad_points(**{**grad, "dy": None})


def test_without_the_extension_otfast_says_why_and_falls_back_to_torch():
    """An install whose compile step failed: no ``_sinkhorn`` module (simulated in a fresh interpreter)."""
    code = """
import sys
sys.modules["otfast.kernels.cpu._sinkhorn"] = None  # what Python sees when the .so is missing
import torch, otfast
from otfast.backends import resolve
info = otfast.backends()["cpu"]
assert not info.available and "not built" in info.detail, info
assert resolve("auto", torch.device("cpu")) is otfast.reference
try:
    otfast.sinkhorn_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 4), backend="cpu")
except ValueError as exc:
    assert "backend 'cpu' is not available" in str(exc) and "not built" in str(exc), exc
else:
    raise AssertionError("backend='cpu' ran without its extension")
print(otfast.sinkhorn_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 4)).item())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
def test_bounding_diameter_is_the_references_bit_for_bit(dtype):
    """``cpu_backend.bounding_diameter`` (the C++ ``bounding_sides``: one pass, no temporaries) equals
    ``otfast.schedule.bounding_diameter`` bit for bit: ragged masks with NaN on padding (never read), strided
    x, D = 70 (a ragged second feature block), y scaled so that both sides hold extremes; a NaN among the valid
    points gives NaN and a batch without a valid point inf, as the reference's; float16 goes to the reference;
    a mask that is not bool is an error."""
    from otfast.schedule import bounding_diameter

    batch = make_points(3, 37, 20, 70, dtype=dtype, seed=31, junk=float("nan"))
    x = torch.stack([batch.x, batch.x], dim=-1)[..., 0]  # a feature stride of 2
    y, mx, my = 3.0 * batch.y, batch.mask_x.bool(), batch.mask_y.bool()
    want = bounding_diameter(x, y, mx, my)
    assert torch.isfinite(want)
    assert torch.equal(launch.bounding_diameter(x, y, mx, my), want)
    x[1, 0, 5] = float("nan")  # a valid point (every pair's first token is)
    assert torch.isnan(bounding_diameter(x, y, mx, my)) and torch.isnan(launch.bounding_diameter(x, y, mx, my))
    none_x, none_y = torch.zeros_like(mx), torch.zeros_like(my)
    assert launch.bounding_diameter(x, y, none_x, none_y) == bounding_diameter(x, y, none_x, none_y) == math.inf
    with pytest.raises(TypeError, match="mask_y must be a bool tensor, got torch.int64"):
        launch.bounding_diameter(x, y, mx, my.long())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="limits the address space with RLIMIT_AS")
def test_out_of_memory_is_a_memory_error_not_an_abort():
    """The per-thread work buffers are allocated before the threads start, and the first thread's is the one
    the launcher made: a solve that fits in memory with two threads' buffers runs, and one that does not
    raises MemoryError (a review found every thread copying the launcher's buffers inside the OpenMP region:
    three sets for two threads, and a std::bad_alloc there aborted the interpreter)."""
    code = """
import math, resource, torch
from otfast import cpu_backend as launch
from otfast.schedule import Schedule

def solve(B, N):
    x = torch.randn(B, N, 4, dtype=torch.float64)
    logw = torch.full((B, N), -math.log(N), dtype=torch.float64)
    return launch.solve_points(x, x + 1, logw, logw.clone(), Schedule(eps=1.0, n_iters=1))

def limit(extra):
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize:")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(extra), resource.RLIM_INFINITY))

torch.set_num_threads(2)
solve(2, 16)  # the OpenMP threads start before the limit
N = 2000
work = 5 * N * N * 8  # one set of buffers: the cost, its two scaled copies and the two kernels, float64
limit(2.5 * work)
assert torch.isfinite(solve(2, N).f).all()
limit(1.5 * work)
try:
    solve(2, N)
except MemoryError:
    print("MemoryError")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "MemoryError", (proc.returncode, proc.stdout + proc.stderr)


def test_tol_with_annealing_on_points_that_require_grad_warns_only_of_convergence():
    """sinkhorn_loss reads the annealing start it found to word its tol warning: detached, so that torch does
    not warn about converting a tensor that requires grad to a scalar (a review found that UserWarning, which
    torch gives once per process, hence the fresh interpreter)."""
    code = """
import warnings, torch, otfast
warnings.simplefilter("error")
x = torch.randn(2, 5, 3, requires_grad=True)
otfast.sinkhorn_loss(x, torch.randn(2, 6, 3), blur=0.3, tol=1.0, n_iters=50, backend="cpu").backward()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
