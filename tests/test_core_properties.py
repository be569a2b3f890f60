"""Properties of ``otfast.sinkhorn`` / ``sinkhorn_loss`` that hold whatever the reference library says.

Padding invariance, S(x, x) = 0, symmetry, marginals at convergence, the per-pair stop, gradcheck
(finite differences) in float64, bitwise reproducibility, reductions, the module face, unbatched
inputs, half-precision inputs and the envelope gradient of the value with respect to the cost.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import otfast
from otfast import reference
from otfast.schedule import Schedule
from conftest import TOL, assert_close, case_id, make_costs, make_points

F64 = torch.float64
# Converged fixed-eps settings: gradients by the envelope theorem are exact only at convergence.
CONVERGED = dict(blur=0.5, scaling=None, n_iters=20000, tol=1e-13)
ANNEALED = dict(blur=0.1, scaling=0.5, diameter=8.0)  # a fixed diameter: the schedule ignores the batch
GRADCHECK = dict(blur=0.7, scaling=None, n_iters=20000, tol=1e-11)  # eps ~ 0.5: converges in few updates


def loss_and_grads(batch, **kwargs):
    """``sinkhorn_loss`` per pair (``reduction="none"``) and the gradients of its sum.

    Returns:
        ``(value [B], (dx, dy, dwx, dwy))``; weight gradients are None for uniform weights.
    """
    x, y = batch.x.detach().clone().requires_grad_(), batch.y.detach().clone().requires_grad_()
    wx, wy = (None if w is None else w.detach().clone().requires_grad_() for w in (batch.weights_x, batch.weights_y))
    value = otfast.sinkhorn_loss(x, y, batch.mask_x, batch.mask_y, weights_x=wx, weights_y=wy, reduction="none",
                                 backend="torch", **kwargs)
    leaves = [t for t in (x, y, wx, wy) if t is not None]
    grads = iter(torch.autograd.grad(value.sum(), leaves))
    return value.detach(), tuple(None if t is None else next(grads) for t in (x, y, wx, wy))


def single(x, y, wx, wy, **kwargs):
    """``sinkhorn_loss`` on one unbatched pair and its gradients (x, y, wx, wy)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, y, wx, wy)]
    value = otfast.sinkhorn_loss(leaves[0], leaves[1], weights_x=leaves[2], weights_y=leaves[3], backend="torch",
                                 **kwargs)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(value, present))
    return value.detach(), tuple(None if t is None else next(grads) for t in leaves)


# ---------------------------------------------------------------------------------------------------
# Padding: a masked batch equals each pair computed alone.

@pytest.mark.parametrize("junk", [1e3, float("nan")], ids=["junk1e3", "junkNaN"])
@pytest.mark.parametrize("reach", [None, 1.0], ids=lambda r: f"reach{r}")
@pytest.mark.parametrize("settings", [CONVERGED, ANNEALED], ids=["converged", "annealed"])
def test_padded_batch_equals_pairs_alone(settings, reach, junk):
    """Values and gradients (x, y, weights) of a padded batch equal those of each pair alone; padding gets 0."""
    batch = make_points(4, 7, 9, 3, seed=10, weights=True, junk=junk)
    value, grads = loss_and_grads(batch, reach=reach, **settings)
    for i in range(batch.B):
        v_i, g_i = single(*batch.pair(i), reach=reach, **settings)
        assert_close(value[i], v_i, rtol=1e-10, atol=1e-13, what=f"value of pair {i}")
        for name, g, gi, n in zip(("x", "y", "wx", "wy"), grads, g_i,
                                  (batch.len_x[i], batch.len_y[i]) * 2):
            assert_close(g[i, :n], gi, rtol=1e-9, atol=1e-13, what=f"grad {name} of pair {i}")
            assert torch.equal(g[i, n:], torch.zeros_like(g[i, n:])), f"grad {name} of pair {i} is not 0 on padding"


@pytest.mark.parametrize("rho", [None, 0.5], ids=lambda r: f"rho{r}")
def test_sinkhorn_padded_batch_equals_pairs_alone(rho):
    """``sinkhorn`` on a padded batch: potentials, values, plans and iteration counts of each pair alone."""
    batch = make_costs(4, 7, 9, seed=11, weights=True, junk=float("nan"))
    kwargs = dict(eps=0.1, rho=rho, n_iters=5000, tol=1e-11, backend="torch")
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, mask_a=batch.mask_a, mask_b=batch.mask_b, **kwargs)
    plan = res.plan()
    for i in range(4):
        C, a, b = batch.pair(i)
        n, m = C.shape
        alone = otfast.sinkhorn(C, a, b, **kwargs)
        assert int(res.n_iters[i]) == int(alone.n_iters), f"pair {i}: iterations differ"
        assert_close(res.value[i], alone.value, rtol=1e-12, atol=0, what=f"value {i}")
        assert_close(plan[i, :n, :m], alone.plan(), rtol=1e-11, atol=0, what=f"plan {i}")
        assert_close(res.f[i, :n], alone.f, rtol=1e-11, atol=1e-14, what=f"f {i}")
        assert_close(res.g[i, :m], alone.g, rtol=1e-11, atol=1e-14, what=f"g {i}")
        assert not res.f[i, n:].any() and not res.g[i, m:].any(), f"pair {i}: potentials not 0 on padding"


# ---------------------------------------------------------------------------------------------------
# The debiased divergence: S(x, x) = 0 and S(x, y) = S(y, x).

@pytest.mark.parametrize("reach", [None, 0.7], ids=lambda r: f"reach{r}")
@pytest.mark.parametrize("settings", [CONVERGED, ANNEALED, dict(blur=0.05, scaling=0.5)],
                         ids=["converged", "annealed", "default"])
def test_divergence_of_a_measure_with_itself_is_zero(settings, reach):
    """S(x, x) = 0 to rounding, with weights and padding, balanced and unbalanced."""
    batch = make_points(3, 7, 7, 4, seed=12, weights=True)
    value = otfast.sinkhorn_loss(batch.x, batch.x, batch.mask_x, batch.mask_x, weights_x=batch.weights_x,
                                 weights_y=batch.weights_x, reach=reach, reduction="none", backend="torch", **settings)
    biased = otfast.sinkhorn_loss(batch.x, batch.x, batch.mask_x, batch.mask_x, weights_x=batch.weights_x,
                                  weights_y=batch.weights_x, reach=reach, reduction="none", backend="torch",
                                  debias=False, **settings)
    several = torch.tensor(batch.len_x) > 1
    assert several.any() and (biased[several].abs() > 1e-3).all(), "OT_eps(x, x) is 0: the test would be vacuous"
    assert_close(value, torch.zeros(3, dtype=F64), rtol=0, atol=1e-12, what="S(x, x)")


@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
@pytest.mark.parametrize("reach", [None, 0.7], ids=lambda r: f"reach{r}")
@pytest.mark.parametrize("settings", [CONVERGED, dict(blur=0.05, scaling=0.5)], ids=["converged", "default"])
def test_symmetry(settings, reach, debias):
    """S(x, y) = S(y, x) (weights and masks swapped too); OT_eps is symmetric as well."""
    batch = make_points(3, 7, 9, 4, seed=13, weights=True)
    common = dict(reach=reach, debias=debias, reduction="none", backend="torch", **settings)
    xy = otfast.sinkhorn_loss(batch.x, batch.y, batch.mask_x, batch.mask_y, weights_x=batch.weights_x,
                              weights_y=batch.weights_y, **common)
    yx = otfast.sinkhorn_loss(batch.y, batch.x, batch.mask_y, batch.mask_x, weights_x=batch.weights_y,
                              weights_y=batch.weights_x, **common)
    assert (xy.abs() > 1e-3).all()
    assert_close(yx, xy, rtol=1e-12, atol=0, what="S(y, x) vs S(x, y)")


# ---------------------------------------------------------------------------------------------------
# Convergence: marginals, the reported error and iteration counts, the per-pair stop.

@pytest.mark.parametrize("scaling", [None, 0.5], ids=["fixed-eps", "scaling0.5"])
@pytest.mark.parametrize("tol", [1e-6, 1e-10], ids=lambda t: f"tol{t}")
def test_marginals_at_convergence(tol, scaling):
    """plan() has marginals a and b up to tol; marginal_error <= tol; fewer than n_iters updates ran."""
    batch = make_costs(3, 7, 9, seed=14, weights=True)
    n_max = 10000
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, mask_a=batch.mask_a, mask_b=batch.mask_b, eps=0.1,
                          n_iters=n_max, tol=tol, scaling=scaling, backend="torch")
    plan = res.plan()
    assert (res.marginal_error <= tol).all(), res.marginal_error
    assert (res.n_iters < n_max).all(), res.n_iters
    for i in range(3):
        C, a, b = batch.pair(i)
        n, m = C.shape
        error = (plan[i, :n, :m].sum(1) - a).abs().sum() + (plan[i, :n, :m].sum(0) - b).abs().sum()
        assert error <= 2 * tol, f"pair {i}: L1 marginal error of plan() {error:.3e} > 2 tol"


def _backends_on_cpu() -> list:
    """torch, and the C++ kernel where it is built (``tests/test_cpu_backend.py`` says why it is not)."""
    built = otfast.backends()["cpu"].available
    return ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not built, reason="the C++ kernel is not built"))]


@pytest.mark.parametrize("backend", _backends_on_cpu())
def test_float32_inputs_converge_below_float32_rounding(backend):
    """The weights are normalised in float64 whatever the data's dtype. Rounded to float32 (as they were),
    uniform weights of 7 and 15 tokens summed to 1 only within ~1e-8: a balanced problem between masses that
    differ by that never got its marginal error below it, and tol=1e-10 ran every update."""
    batch = make_costs(2, 7, 15, dtype=torch.float32, seed=17, ragged=False, junk=None)
    res = otfast.sinkhorn(batch.cost, eps=0.1, n_iters=5000, tol=1e-10, backend=backend)
    assert (res.marginal_error <= 1e-10).all() and (res.n_iters < 5000).all(), (res.marginal_error, res.n_iters)
    x = make_points(2, 7, 15, 8, dtype=torch.float32, seed=18, ragged=False, junk=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an unconverged pair warns
        otfast.sinkhorn_loss(x.x, x.y, blur=0.5, scaling=None, n_iters=2000, tol=1e-10, backend=backend)


@pytest.mark.parametrize("backend", _backends_on_cpu())
def test_a_zero_weight_has_no_gradient(backend):
    """A valid token of weight 0 is padding: the loss is the one without it, and every gradient at it is 0,
    the weight's included (the total that normalises the weights must not pass it one: it was -<a, f> / W,
    which depends on the potentials' arbitrary constant)."""
    batch = make_points(2, 5, 6, 4, seed=19, ragged=False, junk=None, weights=True)
    wx = batch.weights_x.clone()
    wx[0, 4] = 0
    mask_x = torch.ones(2, 5, dtype=torch.long)
    mask_x[0, 4] = 0
    runs = []
    for mask in (None, mask_x):
        x, w = batch.x.clone().requires_grad_(), wx.clone().requires_grad_()
        value = otfast.sinkhorn_loss(x, batch.y, mask, weights_x=w, weights_y=batch.weights_y, backend=backend,
                                     **CONVERGED)
        runs.append((value, *torch.autograd.grad(value, (x, w))))
    (value, dx, dw), (value_masked, dx_masked, dw_masked) = runs
    assert dw[0, 4] == 0 and dx[0, 4].abs().max() == 0
    assert_close(value, value_masked, dtype=F64, what="value")
    assert_close(dw, dw_masked, dtype=F64, what="weight gradient")
    assert_close(dx, dx_masked, dtype=F64, what="x gradient")


def test_marginal_error_before_convergence():
    """With 3 iterations, marginal_error is the L1 marginal error (rows plus columns) of the plan built from
    the potentials the final step started from (``Potentials.f_prev``, ``g_prev``), not 0."""
    batch = make_costs(2, 7, 9, seed=15, weights=True, ragged=False, junk=None)
    kwargs = dict(mask_a=batch.mask_a, mask_b=batch.mask_b, eps=0.01, n_iters=3, backend="torch")
    res = otfast.sinkhorn(batch.cost, batch.a, batch.b, **kwargs)
    log_a, log_b = res.log_a, res.log_b
    pots = reference.solve(res.cost_matrix, log_a, log_b, Schedule(eps=0.01, n_iters=3))
    assert (res.n_iters == 3).all()
    assert torch.equal(res.f, pots.f) and torch.equal(res.marginal_error, pots.error)
    for i in range(2):
        C, a, b = batch.pair(i)
        n, m = C.shape
        P = a[:, None] * b[None, :] * torch.exp((pots.f_prev[i, :n, None] + pots.g_prev[i, None, :m] - C) / 0.01)
        error = (P.sum(1) - a).abs().sum() + (P.sum(0) - b).abs().sum()
        assert error > 1e-3
        assert_close(res.marginal_error[i], error, rtol=1e-12, atol=0, what=f"marginal_error of pair {i}")


def test_per_pair_stop():
    """In one batch, an easy pair (small costs) stops earlier than a hard one, with the same result as alone."""
    batch = make_costs(2, 7, 9, seed=16, ragged=False, junk=None)
    cost = batch.cost * torch.tensor([0.05, 2.0], dtype=F64)[:, None, None]
    kwargs = dict(eps=0.1, n_iters=20000, tol=1e-10, backend="torch")
    res = otfast.sinkhorn(cost, **kwargs)
    assert int(res.n_iters[0]) < int(res.n_iters[1]) < 20000, res.n_iters
    easy = otfast.sinkhorn(cost[0], **kwargs)
    assert int(easy.n_iters) == int(res.n_iters[0])
    assert torch.equal(easy.f, res.f[0]) and torch.equal(easy.g, res.g[0]), "the easy pair's frozen potentials moved"


# ---------------------------------------------------------------------------------------------------
# Gradients: finite differences (float64) and the envelope gradient with respect to the cost.

def _gradcheck_loss(batch, **kwargs):
    def fn(x, y, wx, wy):
        return otfast.sinkhorn_loss(x, y, batch.mask_x, batch.mask_y, weights_x=wx, weights_y=wy, reduction="none",
                                    backend="torch", **kwargs)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (batch.x, batch.y, batch.weights_x, batch.weights_y))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("debias", [True, False], ids=["debias", "biased"])
def test_gradcheck_balanced(debias, cost):
    """Envelope gradients w.r.t. x, y and the weights equal finite differences at convergence (padded batch)."""
    batch = make_points(2, 3, 4, 2, seed=17, weights=True, junk=1e3, scale=0.5, shift=0.3)
    _gradcheck_loss(batch, cost=cost, debias=debias, **GRADCHECK)


def test_gradcheck_unbalanced():
    """Finite differences of the unbalanced loss: its gradients are those of the value it returns."""
    batch = make_points(2, 3, 4, 2, seed=18, weights=True, junk=1e3)
    _gradcheck_loss(batch, reach=1.0, debias=False, **GRADCHECK)


@pytest.mark.parametrize("rho", [None, 0.5], ids=lambda r: f"rho{r}")
def test_value_gradient_wrt_cost_is_plan(rho):
    """d value / d cost = plan() (0 on padding), and that gradient matches finite differences."""
    batch = make_costs(2, 4, 5, seed=19, weights=True, junk=1e3)
    kwargs = dict(mask_a=batch.mask_a, mask_b=batch.mask_b, eps=0.2, rho=rho, n_iters=20000, tol=1e-13,
                  backend="torch")
    cost = batch.cost.clone().requires_grad_()
    res = otfast.sinkhorn(cost, batch.a, batch.b, **kwargs)
    (grad,) = torch.autograd.grad(res.value.sum(), cost)
    assert_close(grad, res.plan().detach(), rtol=1e-14, atol=0, what="grad wrt cost vs plan")
    valid = (batch.mask_a[:, :, None] * batch.mask_b[:, None, :]).bool()
    assert not grad[~valid].any(), "gradient on padded cost entries"
    assert torch.autograd.gradcheck(lambda c: otfast.sinkhorn(c, batch.a, batch.b, **kwargs).value,
                                    (cost,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Reproducibility and the faces of the API.

@pytest.mark.parametrize("reach", [None, 1.0], ids=lambda r: f"reach{r}")
def test_repeated_runs_are_bitwise_identical(reach):
    """Same input, same values and gradients, bit for bit (loss and sinkhorn)."""
    batch = make_points(3, 7, 9, 5, dtype=torch.float32, seed=20, weights=True)
    v1, g1 = loss_and_grads(batch, reach=reach)
    v2, g2 = loss_and_grads(batch, reach=reach)
    assert torch.equal(v1, v2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    costs = make_costs(3, 7, 9, dtype=torch.float32, seed=20, weights=True)
    r1, r2 = (otfast.sinkhorn(costs.cost, costs.a, costs.b, mask_a=costs.mask_a, mask_b=costs.mask_b, eps=0.05,
                              rho=reach, n_iters=2000, tol=1e-4, scaling=0.5, backend="torch") for _ in range(2))
    for name in ("f", "g", "value", "n_iters", "marginal_error"):
        assert torch.equal(getattr(r1, name), getattr(r2, name)), name
    assert torch.equal(r1.plan(), r2.plan())


def test_reductions():
    """"none" gives each pair (= the unbatched call), "mean" and "sum" reduce it, gradients scale by 1/B."""
    batch = make_points(3, 5, 6, 4, seed=21, ragged=False, junk=None)
    x = batch.x.clone().requires_grad_()
    kw = dict(backend="torch", **ANNEALED)
    per_pair = torch.stack([otfast.sinkhorn_loss(batch.x[i], batch.y[i], **kw) for i in range(3)])
    none = otfast.sinkhorn_loss(x, batch.y, reduction="none", **kw)
    assert none.shape == (3,)
    assert_close(none, per_pair, rtol=1e-13, atol=0, what="none")
    total = otfast.sinkhorn_loss(x, batch.y, reduction="sum", **kw)
    mean = otfast.sinkhorn_loss(x, batch.y, reduction="mean", **kw)
    assert total.shape == mean.shape == ()
    assert_close(total, per_pair.sum(), rtol=1e-13, atol=0, what="sum")
    assert_close(mean, per_pair.mean(), rtol=1e-13, atol=0, what="mean")
    (g_sum,) = torch.autograd.grad(total, x)
    (g_mean,) = torch.autograd.grad(mean, x)
    assert_close(g_mean, g_sum / 3, rtol=1e-13, atol=0, what="grad of mean")


def test_module_equals_functional():
    """``SinkhornLoss(**kw)(x, y, mask_x, mask_y)`` equals ``sinkhorn_loss(x, y, mask_x, mask_y, **kw)`` exactly."""
    batch = make_points(3, 7, 9, 5, dtype=torch.float32, seed=22)
    kw = dict(blur=0.1, scaling=0.7, reach=2.0, reduction="sum", backend="torch")
    module = otfast.SinkhornLoss(**kw)
    x1, x2 = batch.x.clone().requires_grad_(), batch.x.clone().requires_grad_()
    v1 = module(x1, batch.y, batch.mask_x, batch.mask_y)
    v2 = otfast.sinkhorn_loss(x2, batch.y, batch.mask_x, batch.mask_y, **kw)
    v1.backward()
    v2.backward()
    assert torch.equal(v1, v2) and torch.equal(x1.grad, x2.grad)
    assert "reach=2.0" in repr(module)


def test_unbatched_inputs():
    """[N, D] / [M, D] points and [N, M] costs give the B = 1 result without the batch axis."""
    batch = make_points(1, 7, 9, 3, seed=23, ragged=False, junk=None, weights=True)
    x, y, wx, wy = batch.pair(0)
    mask_x = torch.ones(7, dtype=torch.long)
    loss = otfast.sinkhorn_loss(x, y, mask_x, None, weights_x=wx, weights_y=wy, backend="torch")
    batched = otfast.sinkhorn_loss(batch.x, batch.y, weights_x=batch.weights_x, weights_y=batch.weights_y,
                                   reduction="none", backend="torch")
    assert loss.shape == ()
    assert torch.equal(loss, batched[0])

    costs = make_costs(1, 7, 9, seed=23, ragged=False, junk=None)
    one = otfast.sinkhorn(costs.cost[0], eps=0.1, tol=1e-9, n_iters=1000, backend="torch")
    many = otfast.sinkhorn(costs.cost, eps=0.1, tol=1e-9, n_iters=1000, backend="torch")
    assert one.f.shape == (7,) and one.g.shape == (9,) and one.plan().shape == (7, 9)
    assert one.value.shape == one.n_iters.shape == one.marginal_error.shape == ()
    assert torch.equal(one.value, many.value[0]) and torch.equal(one.plan(), many.plan()[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: case_id(3, 7, 9, 16, d))
def test_half_precision_inputs(dtype):
    """fp16/bf16 inputs: finite values and gradients (in the input dtype) close to the float32 result."""
    batch = make_points(3, 7, 9, 16, dtype=torch.float32, seed=24, scale=0.3)
    ref_x = batch.x.clone().requires_grad_()
    ref = otfast.sinkhorn_loss(ref_x, batch.y, batch.mask_x, batch.mask_y, reduction="none", backend="torch")
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    x = batch.x.to(dtype).requires_grad_()
    value = otfast.sinkhorn_loss(x, batch.y.to(dtype), batch.mask_x, batch.mask_y, reduction="none", backend="torch")
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert grad.dtype == dtype
    assert_close(value, ref, dtype=dtype, what="value")
    assert_close(grad, ref_grad, dtype=dtype, what="grad x")
    costs = make_costs(3, 7, 9, dtype=torch.float32, seed=24)
    kwargs = dict(mask_a=costs.mask_a, mask_b=costs.mask_b, eps=0.1, backend="torch")
    res, ref_res = otfast.sinkhorn(costs.cost.to(dtype), **kwargs), otfast.sinkhorn(costs.cost, **kwargs)
    assert_close(res.value, ref_res.value, dtype=dtype, what="sinkhorn value")
    assert_close(res.plan(), ref_res.plan(), rtol=TOL[dtype].rtol, atol=0, what="sinkhorn plan")
