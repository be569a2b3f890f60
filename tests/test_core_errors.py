"""Bad input raises a clear ValueError/TypeError (type and message checked), one test per case.

Also: an unconverged pair gives a RuntimeWarning naming how many pairs, and extreme but valid input
(eps = 1e-4 with costs near 1e2, float32) stays finite.
"""

from __future__ import annotations

import inspect

import warnings

import pytest
import torch

import otfast
from conftest import assert_close, make_costs, make_points


@pytest.fixture
def pts():
    """A small valid float32 batch: x [2, 4, 3], y [2, 5, 3] with masks."""
    return make_points(2, 4, 5, 3, dtype=torch.float32, seed=30, ragged=False, junk=None)


@pytest.fixture
def cost():
    """A small valid float32 cost batch [2, 4, 5]."""
    return make_costs(2, 4, 5, dtype=torch.float32, seed=31, ragged=False, junk=None).cost


def loss(x, y, mask_x=None, mask_y=None, **kwargs):
    return otfast.sinkhorn_loss(x, y, mask_x, mask_y, backend=kwargs.pop("backend", "torch"), **kwargs)


# --- shapes -------------------------------------------------------------------------------------

def test_mismatched_batch_sizes(pts):
    with pytest.raises(ValueError, match="batch sizes differ: x has 2 pairs, y has 1"):
        loss(pts.x, pts.y[:1])


def test_mismatched_feature_sizes(pts):
    with pytest.raises(ValueError, match="feature sizes differ: x has D=3, y has D=2"):
        loss(pts.x, pts.y[..., :2])


def test_mismatched_point_ranks(pts):
    with pytest.raises(ValueError, match=r"x and y must both be \[B, N, D\]"):
        loss(pts.x, pts.y[0])


def test_empty_input(pts):
    with pytest.raises(ValueError, match="empty input"):
        loss(pts.x[:, :0], pts.y)


def test_mask_of_wrong_shape(pts):
    with pytest.raises(ValueError, match=r"mask_x has shape \(2, 3\), expected \(2, 4\)"):
        loss(pts.x, pts.y, pts.mask_x[:, :3], pts.mask_y)


def test_unbatched_shape_errors_name_the_shapes_passed(pts):
    """An unbatched call's masks and weights are named by the shapes the caller passed, without a batch axis."""
    x, y = pts.x[0], pts.y[0]
    with pytest.raises(ValueError, match=r"mask_x has shape \(1, 4\), expected \(4,\) \(length\)"):
        loss(x, y, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weights_y has shape \(4,\), expected \(5,\)$"):
        loss(x, y, weights_y=torch.ones(4))
    with pytest.raises(ValueError, match=r"mask_a has shape \(3,\), expected \(4,\) \(length\)"):
        otfast.sinkhorn(make_costs(1, 4, 5, dtype=torch.float32, seed=3).cost[0], mask_a=[1, 1, 0], eps=0.1)


def test_sinkhorn_mask_of_wrong_shape(cost):
    with pytest.raises(ValueError, match=r"mask_b has shape \(2, 4\), expected \(2, 5\)"):
        otfast.sinkhorn(cost, mask_b=torch.ones(2, 4, dtype=torch.bool), eps=0.1)


def test_weights_of_wrong_shape(pts):
    with pytest.raises(ValueError, match=r"weights_y has shape \(2, 4\), expected \(2, 5\)"):
        loss(pts.x, pts.y, weights_y=torch.ones(2, 4))


def test_cost_1d():
    with pytest.raises(ValueError, match="cost_matrix must be 2-D .* got 1-D"):
        otfast.sinkhorn(torch.rand(5), eps=0.1)


def test_cost_4d():
    with pytest.raises(ValueError, match="cost_matrix must be 2-D .* got 4-D"):
        otfast.sinkhorn(torch.rand(2, 2, 3, 4), eps=0.1)


# --- masks --------------------------------------------------------------------------------------

def test_mask_values_other_than_0_1(pts):
    mask = pts.mask_x.clone()
    mask[1, 2] = 2
    with pytest.raises(ValueError, match="mask_x must hold only 0 and 1"):
        loss(pts.x, pts.y, mask, pts.mask_y)


def test_float_mask(pts):
    with pytest.raises(TypeError, match="mask_y must be a bool or integer tensor, got torch.float32"):
        loss(pts.x, pts.y, pts.mask_x, pts.mask_y.float())


def test_pair_without_valid_token(pts):
    mask = pts.mask_y.clone()
    mask[1] = 0
    with pytest.raises(ValueError, match="mask_y: pair at batch index 1 has no valid token"):
        loss(pts.x, pts.y, pts.mask_x, mask)


def test_sinkhorn_pair_without_valid_token(cost):
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0] = False
    with pytest.raises(ValueError, match="mask_a: pair at batch index 0 has no valid token"):
        otfast.sinkhorn(cost, mask_a=mask, eps=0.1)


# --- non-finite values ----------------------------------------------------------------------------

def test_nan_in_x(pts):
    x = pts.x.clone()
    x[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        loss(x, pts.y)


def test_inf_in_y(pts):
    y = pts.y.clone()
    y[0, 4, 0] = float("inf")
    with pytest.raises(ValueError, match="y contains inf"):
        loss(pts.x, y)


def test_nan_in_cost_on_valid_entry(cost):
    c = cost.clone()
    c[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="cost_matrix contains NaN"):
        otfast.sinkhorn(c, eps=0.1)


def test_nan_in_cost_on_masked_entry_is_fine(cost):
    """NaN on a padded row or column is ignored: same result as the cost without it."""
    mask_a = torch.ones(2, 4, dtype=torch.bool)
    mask_a[1, 3] = False
    c = cost.clone()
    c[1, 3, :] = float("nan")
    res = otfast.sinkhorn(c, mask_a=mask_a, eps=0.1, backend="torch")
    ref = otfast.sinkhorn(cost[1:, :3], eps=0.1, backend="torch")
    assert torch.isfinite(res.value).all() and torch.isfinite(res.plan()).all()
    assert torch.allclose(res.value[1], ref.value[0], rtol=1e-6)


@pytest.mark.parametrize("junk", [float("nan"), float("inf")], ids=["NaN", "inf"])
def test_non_finite_masked_cost_with_gradient(cost, junk):
    """Non-finite junk on padded cost entries leaves the value and its gradient (the plan) finite."""
    mask_b = torch.ones(2, 5, dtype=torch.bool)
    mask_b[0, 4] = False
    c = cost.clone()
    c[0, :, 4] = junk
    c.requires_grad_()
    res = otfast.sinkhorn(c, mask_b=mask_b, eps=0.1, backend="torch")
    (grad,) = torch.autograd.grad(res.value.sum(), c)
    ref = otfast.sinkhorn(cost[:1, :, :4], eps=0.1, backend="torch")
    assert torch.isfinite(res.value).all() and torch.isfinite(grad).all()
    assert torch.allclose(res.value[0], ref.value[0], rtol=1e-6)
    assert not grad[0, :, 4].any()


def test_nan_in_weights(pts):
    w = torch.ones(2, 4)
    w[0, 1] = float("nan")
    with pytest.raises(ValueError, match="weights_x contains NaN"):
        loss(pts.x, pts.y, weights_x=w)


# --- numbers --------------------------------------------------------------------------------------

POSITIVE_LOSS_ARGS = [("eps", 0.0), ("eps", -1.0), ("blur", 0.0), ("blur", -0.05), ("reach", 0.0), ("reach", -1.0),
                      ("diameter", -2.0), ("tol", 0.0)]
POSITIVE_SINKHORN_ARGS = [("eps", 0.0), ("eps", -0.1), ("eps", float("nan")), ("eps", float("inf")), ("tol", 0.0),
                          ("tol", -1e-6), ("rho", 0.0), ("rho", -1.0)]


@pytest.mark.parametrize("name, value", POSITIVE_LOSS_ARGS, ids=[f"{n}{v}" for n, v in POSITIVE_LOSS_ARGS])
def test_loss_number_not_positive(pts, name, value):
    """eps, blur, reach (rho = reach^2), diameter and tol of sinkhorn_loss must be > 0."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got {value}"):
        loss(pts.x, pts.y, **{name: value})


@pytest.mark.parametrize("name, value", POSITIVE_SINKHORN_ARGS, ids=[f"{n}{v}" for n, v in POSITIVE_SINKHORN_ARGS])
def test_sinkhorn_number_not_positive(cost, name, value):
    """eps, tol and rho of sinkhorn must be finite and > 0."""
    kwargs = {"eps": 0.1, name: value}
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got {value}"):
        otfast.sinkhorn(cost, **kwargs)


def test_eps_not_a_number(cost):
    with pytest.raises(TypeError, match="eps must be a number, got str"):
        otfast.sinkhorn(cost, eps="0.1")


@pytest.mark.parametrize("name", ["blur", "reach", "diameter"])
def test_length_whose_square_overflows(pts, name):
    """blur, reach and diameter are squared (eps = blur^2, rho = reach^2, the first temperature diameter^2)."""
    with pytest.raises(ValueError, match=f"{name} = 1e\\+160 is too large: its square overflows float64"):
        loss(pts.x, pts.y, **{name: 1e160})


def test_points_too_large_to_anneal_from(pts):
    """Finite float64 points whose bounding box has no finite squared diagonal (the first temperature)."""
    x = pts.x.double() * 1e160
    with pytest.raises(ValueError, match="the annealing start .* is inf, too large to anneal from in float64"):
        loss(x, -x)


def test_numpy_numbers_are_numbers(pts, cost):
    """Options from numpy (a sweep over ``np.linspace``, say) give what the same Python numbers give."""
    np = pytest.importorskip("numpy")
    kw = dict(blur=0.5, scaling=0.5, n_iters=300, tol=1e-3, reach=2.0, diameter=4.0)
    want = loss(pts.x, pts.y, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 compared with a bound beyond its range warned of an overflow
        got = loss(pts.x, pts.y, **{k: (np.int64 if isinstance(v, int) else np.float32)(v) for k, v in kw.items()})
    assert_close(got, want, rtol=1e-6, atol=0, what="loss")
    res = otfast.sinkhorn(cost, eps=np.float64(0.1), n_iters=np.int32(5), rho=np.float32(1.0))
    assert torch.equal(res.f, otfast.sinkhorn(cost, eps=0.1, n_iters=5, rho=1.0).f)


def test_negative_weights(pts):
    w = torch.ones(2, 5)
    w[1, 3] = -0.5
    with pytest.raises(ValueError, match="weights_y has negative weights"):
        loss(pts.x, pts.y, weights_y=w)


def test_sinkhorn_negative_weights(cost):
    a = torch.ones(2, 4)
    a[0, 0] = -1.0
    with pytest.raises(ValueError, match="a has negative weights"):
        otfast.sinkhorn(cost, a, eps=0.1)


def test_zero_total_weights(pts):
    w = torch.ones(2, 4)
    w[1] = 0
    with pytest.raises(ValueError, match="weights_x: pair at batch index 1 has zero total weight"):
        loss(pts.x, pts.y, weights_x=w)


@pytest.mark.parametrize("scaling", [0.0, 1.0, 1.5, -0.5], ids=lambda s: f"scaling{s}")
def test_scaling_outside_unit_interval(pts, scaling):
    with pytest.raises(ValueError, match="scaling must"):
        loss(pts.x, pts.y, scaling=scaling)


def test_sinkhorn_scaling_outside_unit_interval(cost):
    with pytest.raises(ValueError, match=r"scaling must lie in \(0, 1\), got 2"):
        otfast.sinkhorn(cost, eps=0.1, scaling=2.0)


@pytest.mark.parametrize("n_iters", [-1, 2.5, True], ids=["minus1", "float", "bool"])
def test_n_iters_invalid(pts, n_iters):
    with pytest.raises(ValueError, match="n_iters must be an integer >= 0"):
        loss(pts.x, pts.y, n_iters=n_iters)


def test_sinkhorn_n_iters_none(cost):
    with pytest.raises(ValueError, match="n_iters must be an integer >= 0, got None"):
        otfast.sinkhorn(cost, eps=0.1, n_iters=None)


# --- names --------------------------------------------------------------------------------------

def test_unknown_cost(pts):
    with pytest.raises(ValueError, match="unknown cost 'euclidean'; choose one of sqeuclidean, cosine"):
        loss(pts.x, pts.y, cost="euclidean")


def test_unknown_backend(pts):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        loss(pts.x, pts.y, backend="cuda")


def test_sinkhorn_unknown_backend(cost):
    with pytest.raises(ValueError, match="unknown backend 'numpy'"):
        otfast.sinkhorn(cost, eps=0.1, backend="numpy")


def test_unknown_reduction(pts):
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        loss(pts.x, pts.y, reduction="max")


def test_module_rejects_bad_keyword_at_construction():
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        otfast.SinkhornLoss(reduction="avg")


# --- dtypes and devices ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_points(pts, dtype):
    with pytest.raises(TypeError, match=f"x must be float16, bfloat16, float32 or float64, got {dtype}"):
        loss(pts.x.to(dtype), pts.y)


def test_points_of_different_dtypes(pts):
    with pytest.raises(TypeError, match="x and y must have the same dtype, got torch.float32 and torch.float64"):
        loss(pts.x, pts.y.double())


def test_cosine_of_a_zero_vector(pts):
    """A valid point of all zeros has no cosine (its gradient was 1e11); as padding it is fine, and so is the
    sqeuclidean cost."""
    x = pts.x.clone()
    x[1, 2] = 0
    with pytest.raises(ValueError, match="y: a valid token of the pair at batch index 1 is the zero vector"):
        loss(pts.y, x, cost="cosine")
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[1, 2] = 0
    assert torch.isfinite(loss(x, pts.y, mask, cost="cosine"))
    assert torch.isfinite(loss(x, pts.y))


def test_integer_cost(cost):
    with pytest.raises(TypeError, match="cost_matrix must be float16, bfloat16, float32 or float64, got torch.int64"):
        otfast.sinkhorn((cost * 10).long(), eps=0.1)


def test_integer_weights(pts):
    with pytest.raises(TypeError, match="weights_x must be float16, bfloat16, float32 or float64"):
        loss(pts.x, pts.y, weights_x=torch.ones(2, 4, dtype=torch.long))


def test_points_not_a_tensor(pts):
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        loss(pts.x, pts.y.tolist())


def _second_device() -> str:
    """A device other than the CPU: CUDA when present, else ``meta`` (validation runs before any compute)."""
    return "cuda" if torch.cuda.is_available() else "meta"


def test_points_on_different_devices(pts):
    with pytest.raises(ValueError, match="inputs are on different devices"):
        loss(pts.x, pts.y.to(_second_device()))


def test_mask_on_another_device(pts):
    with pytest.raises(ValueError, match="inputs are on different devices"):
        loss(pts.x, pts.y, pts.mask_x.to(_second_device()), pts.mask_y)


def test_sinkhorn_weights_on_another_device(cost):
    with pytest.raises(ValueError, match="inputs are on different devices"):
        otfast.sinkhorn(cost, torch.ones(2, 4, device=_second_device()), eps=0.1)


# --- convergence warnings and extreme input ---------------------------------------------------------

def test_unconverged_pairs_warn_with_count():
    """Two hard pairs out of three miss tol: the warning says "2 of 3 pairs"; the easy one converges."""
    costs = make_costs(3, 6, 7, seed=32, ragged=False, junk=None).cost
    costs[0] = 0.5  # a constant cost: converged after the first update
    with pytest.warns(RuntimeWarning, match=r"sinkhorn: 2 of 3 pairs did not reach tol=1e-09 within 5 updates "
                                            r"\(n_iters=5\); raise n_iters or tol"):
        res = otfast.sinkhorn(costs, eps=0.005, n_iters=5, tol=1e-9, backend="torch")
    assert res.marginal_error[0] <= 1e-9 < res.marginal_error[1:].min()


def test_unconverged_loss_warns(pts):
    with pytest.warns(RuntimeWarning, match=r"sinkhorn_loss OT\(x, y\): 2 of 2 pairs did not reach tol"):
        loss(pts.x, pts.y, blur=0.01, scaling=None, n_iters=2, tol=1e-12)


def test_tol_with_zero_iterations_warns_with_the_real_count(pts):
    """tol with the default annealing (n_iters defaults to 0) is not silently ignored, and the warning counts
    the annealing steps that did run."""
    steps = len(otfast.schedule.epsilon_schedule(otfast.schedule.bounding_diameter(
        pts.x, pts.y, torch.ones(pts.x.shape[:2], dtype=torch.bool), torch.ones(pts.y.shape[:2], dtype=torch.bool)),
        0.05, 0.5))
    with pytest.warns(RuntimeWarning, match=rf"2 of 2 pairs did not reach tol=1e-09 within {steps} updates "
                                            rf"\({steps} annealing steps \+ n_iters=0\)"):
        loss(pts.x, pts.y, tol=1e-9)


def test_only_pairs_that_ran_out_count_as_unconverged():
    """A pair that stopped early reached tol; the final extrapolation step's residual may land a rounding
    above it, which is no failure. A pair that used every update and is above tol is one."""
    from otfast.schedule import Schedule, unconverged

    sched = Schedule(eps=0.1, anneal=(2.0, 1.0), n_iters=10, tol=1e-5)
    error = torch.tensor([1.01e-5, 1.01e-5, 0.99e-5])
    n_iters = torch.tensor([7, 12, 12], dtype=torch.int32)  # stopped early, ran out, ran out
    assert unconverged(n_iters, error, sched).tolist() == [False, True, False]
    assert not unconverged(n_iters, error, Schedule(eps=0.1, anneal=(2.0, 1.0), n_iters=10)).any()  # no tol


def test_converged_run_does_not_warn(pts):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = loss(pts.x, pts.y, blur=1.0, scaling=None, n_iters=1000, tol=1e-5)
    assert [str(w.message) for w in caught] == []
    assert torch.isfinite(value).all()


def test_extreme_sinkhorn_input_is_finite():
    """eps = 1e-4 with costs up to 1e2 in float32 (C / eps = 1e6): finite potentials, values, plans, gradients."""
    c = (100 * make_costs(3, 7, 9, dtype=torch.float32, seed=33).cost.clamp(0, 1)).requires_grad_()
    res = otfast.sinkhorn(c, eps=1e-4, scaling=0.5, n_iters=50, backend="torch")
    (grad,) = torch.autograd.grad(res.value.sum(), c)
    for t in (res.f, res.g, res.value, res.plan(), grad):
        assert torch.isfinite(t).all()
    ref = otfast.sinkhorn(c.detach().double(), eps=1e-4, scaling=0.5, n_iters=50, backend="torch")
    assert torch.allclose(res.value.double(), ref.value, rtol=1e-4), "float32 value far from the float64 run"


@pytest.mark.parametrize("reach", [None, 10.0], ids=lambda r: f"reach{r}")
def test_extreme_loss_input_is_finite(reach):
    """eps = 1e-4 with costs near 1e2 (|x - y|^2 / 2), float32: finite loss and gradients."""
    batch = make_points(3, 7, 9, 4, dtype=torch.float32, seed=34, scale=7.0, shift=3.0)
    x, y = batch.x.clone().requires_grad_(), batch.y.clone().requires_grad_()
    value = otfast.sinkhorn_loss(x, y, batch.mask_x, batch.mask_y, eps=1e-4, reach=reach, reduction="none",
                                 backend="torch")
    gx, gy = torch.autograd.grad(value.sum(), (x, y))
    assert torch.isfinite(value).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    ref = otfast.sinkhorn_loss(batch.x.double(), batch.y.double(), batch.mask_x, batch.mask_y, eps=1e-4, reach=reach,
                               reduction="none", backend="torch")
    assert torch.allclose(value.double(), ref, rtol=1e-3), "float32 loss far from the float64 run"


# --- renamed arguments ------------------------------------------------------------------------------

def test_old_name_of_the_cost_matrix_still_works_with_a_warning():
    cost_matrix = make_costs(2, 4, 5, seed=40, ragged=False, junk=None).cost
    want = otfast.sinkhorn(cost_matrix, eps=0.1)
    with pytest.warns(FutureWarning, match=r"cost= is deprecated; use cost_matrix="):
        got = otfast.sinkhorn(cost=cost_matrix, eps=0.1)
    assert torch.equal(got.value, want.value)
    with pytest.warns(FutureWarning, match=r"SinkhornResult.cost is deprecated"):
        assert got.cost is got.cost_matrix
    with pytest.raises(TypeError, match="give cost_matrix only"):
        otfast.sinkhorn(cost_matrix, cost=cost_matrix, eps=0.1)
    with pytest.raises(TypeError, match="needs the cost_matrix"):
        otfast.sinkhorn(eps=0.1)


@pytest.mark.parametrize("options,match", [(dict(backend="gpu"), "unknown backend 'gpu'"),
                                           (dict(cost="l1"), "unknown cost 'l1'"),
                                           (dict(blur=0.0), "blur must be a finite number > 0"),
                                           (dict(scaling=1.5), "scaling must lie in"),
                                           (dict(n_iters=-1), "n_iters must be an integer")])
def test_module_checks_its_options_when_built(options, match):
    with pytest.raises(ValueError, match=match):
        otfast.SinkhornLoss(**options)


def test_module_takes_no_positional_options():
    with pytest.raises(TypeError):
        otfast.SinkhornLoss("cosine")


def test_module_options_are_the_functions_with_the_same_defaults():
    """``SinkhornLoss`` restates ``sinkhorn_loss``'s options (its keyword-only parameters but the weights,
    which are data of each call): every one, with the same default."""
    module = inspect.signature(otfast.SinkhornLoss.__init__).parameters
    function = inspect.signature(otfast.sinkhorn_loss).parameters
    options = {name: p.default for name, p in function.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("weights_x", "weights_y")}
    assert {name: p.default for name, p in module.items() if name != "self"} == options


# --- what the adversarial runs of issue 15 found ----------------------------------------------------

@pytest.mark.parametrize("options", [dict(blur=1e-160), dict(eps=1e-301)], ids=["blur", "eps"])
def test_temperature_below_float64_is_refused(pts, options):
    with pytest.raises(ValueError, match=r"is below 1e-300, where 1 / eps and C / eps stop being finite"):
        loss(pts.x, pts.y, **options)


def test_tiny_but_representable_blur_gives_finite_values(pts):
    """blur = 1e-20 (eps = 1e-40, below the fp32 range) was [nan, nan]: the solvers compute in float64."""
    assert torch.isfinite(loss(pts.x, pts.y, blur=1e-20, reduction="none")).all()


def test_huge_weights_do_not_overflow_their_normalisation(pts):
    """Weights of 1e38 each sum past the float32 maximum; they are normalised in float64 (the result is the
    uniform loss, as any constant weights give)."""
    huge = torch.full(pts.x.shape[:2], 1e38)
    assert_close(loss(pts.x, pts.y, weights_x=huge, reduction="none"), loss(pts.x, pts.y, reduction="none"),
                 rtol=1e-6, atol=0, what="loss")


def test_masks_given_as_lists(pts):
    mask_x, mask_y = pts.mask_x.tolist(), pts.mask_y.tolist()
    assert torch.equal(loss(pts.x, pts.y, mask_x, mask_y, reduction="none"),
                       loss(pts.x, pts.y, pts.mask_x, pts.mask_y, reduction="none"))
    with pytest.raises(TypeError, match="mask_x must be a tensor"):
        loss(pts.x, pts.y, "all", None)
    # one pair without the batch axis, and the cost-matrix entry point
    assert torch.equal(loss(pts.x[0], pts.y[0], mask_x[0], mask_y[0]), loss(pts.x[0], pts.y[0], pts.mask_x[0],
                                                                             pts.mask_y[0]))
    cost = torch.cdist(pts.x[0], pts.y[0]) ** 2 / 2
    assert torch.equal(otfast.sinkhorn(cost, mask_a=mask_x[0], mask_b=mask_y[0], eps=0.1).value,
                       otfast.sinkhorn(cost, mask_a=pts.mask_x[0], mask_b=pts.mask_y[0], eps=0.1).value)
