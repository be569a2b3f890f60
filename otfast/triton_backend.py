"""The triton backend: host launchers of the Triton Sinkhorn kernels (``otfast.kernels.triton``).

Implements ``otfast.backends.Backend`` (``solve``, ``solve_points``, ``grad_points``, the semantics of
``otfast.reference``): shape checks, the choice of regime and configuration (among
``otfast.kernels.triton.configs``), the preparation of the points and the output buffers. Two regimes
behind one entry:

- resident (max(N, M) <= ``RESIDENT_MAX`` = 32): one program per pair holds both cost tiles in registers;
  extra device memory: the potentials, O(B (N + M)).
- streaming (longer): the cost is written once as two fp32 tiles (8 B N M bytes), then streamed.

The backward is one tiled kernel for every length, launched for dx and again (roles swapped) for dy.
The potentials are float64; the N M work is fp32 (``kernels/triton/sinkhorn.py`` says where and why float64
is used). ``OTFAST_TRITON_PRECISION`` (default "ieee") sets the ``tl.dot`` precision of S @ y in the
backward; "tf32x3" runs it on tensor cores at near-fp32 accuracy (plain tf32, ~1e-3 relative, is not
offered). ``OTFAST_DEBUG_POISON=1`` fills every output-only buffer with NaN (int32: -2^31) before the
kernels run, so that an element a kernel forgets to write shows (the tests set it); the streaming kernel's
f_prev, g_prev are inputs too and start at 0.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from .reference import Potentials, prepare_grad, prepare_points
from .schedule import Annealing, Schedule

try:
    import triton

    from .kernels.triton import sinkhorn as K
    from .kernels.triton.configs import (CENTRE_BLOCK, CENTRE_WARPS, COST_BLOCK, COST_WARPS, FP_FUSION, GRAD_BLOCK,
                                         GRAD_WARPS, NUM_STAGES, PRECISIONS, RESIDENT_MAX, RESIDENT_WARPS,
                                         STREAM_BLOCK, STREAM_WARPS)
except ImportError as exc:  # the package installs and runs without triton
    UNAVAILABLE: str | None = f"triton is not installed ({exc})"
    DESCRIPTION = "fused Triton kernels (triton not installed)"
else:
    UNAVAILABLE = None
    DEVICE_SCHEDULE = True  # derives an Annealing's temperatures on the device (otfast.ops reads this)
    DESCRIPTION = (f"fused Triton kernels: register-resident tiles up to {RESIDENT_MAX} x {RESIDENT_MAX}, "
                   "streaming beyond")


def precision() -> str:
    value = os.environ.get("OTFAST_TRITON_PRECISION", "ieee")
    if value not in PRECISIONS:
        raise ValueError(f"OTFAST_TRITON_PRECISION must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def _empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or poisoned with NaN (-2^31 for integers) when ``OTFAST_DEBUG_POISON=1``."""
    if os.environ.get("OTFAST_DEBUG_POISON") == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -(2**31), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _schedule(schedule: Schedule, device: torch.device) -> torch.Tensor:
    """The kernels' float64 schedule buffer (``sinkhorn._anneal_eps``): eps, 1 / rho (0 when balanced), then
    an ``Annealing``'s diameter with 2 log blur, 2 log scaling and blur^2 (the kernels derive the list; the
    diameter is never read on the host), or 0 and the explicit list."""
    inv_rho = 0.0 if schedule.rho is None else 1.0 / schedule.rho
    ann = schedule.anneal
    if isinstance(ann, Annealing):
        head = _constants((schedule.eps, inv_rho), device)
        tail = _constants((2 * math.log(ann.blur), 2 * math.log(ann.scaling), ann.blur**2, 0.0), device)
        return torch.cat((head, ann.diameter.reshape(1).to(torch.float64), tail))
    return _constants((schedule.eps, inv_rho, 0.0, 0.0, 1.0, 0.0, len(ann), *ann), device)


@functools.lru_cache(maxsize=256)
def _constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A float64 device tensor of host constants, copied to the device once per distinct value (a later call,
    inside a CUDA graph capture too, copies nothing)."""
    return torch.tensor(values, dtype=torch.float64, device=device)


# The kernels scale exponents by log2(e) / eps in fp32: it must stay well inside the fp32 range.
EPS_MIN = 1e-30


def _loop_args(schedule: Schedule) -> tuple:
    if schedule.eps < EPS_MIN:
        raise ValueError(f"eps = {schedule.eps:g} is below {EPS_MIN:g}, where the Triton kernels' fp32 exponents "
                         "overflow; use the cpu or torch backend (float64) for it")
    return schedule.n_iters, schedule.tol if schedule.tol is not None else 0.0


def _check(alpha: torch.Tensor, beta: torch.Tensor, n: int, m: int, b: int) -> None:
    if alpha.shape != (b, n) or beta.shape != (b, m):
        raise ValueError(f"log-weights of shapes {tuple(alpha.shape)}, {tuple(beta.shape)} do not match a "
                         f"{b} x {n} x {m} problem")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).contiguous()


def _outputs(b: int, n: int, m: int, device: torch.device) -> list[torch.Tensor]:
    f64 = torch.float64
    return [_empty((b, n), f64, device), _empty((b, m), f64, device), _empty((b, n), f64, device),
            _empty((b, m), f64, device), _empty((b,), torch.int32, device), _empty((b,), f64, device)]


class _Points(NamedTuple):
    """Points as the kernels read them (``_points``): x, y and the centre mu ``[B, D]`` float64, with its
    strides."""

    x: torch.Tensor
    y: torch.Tensor
    mu: torch.Tensor
    mu_strides: tuple[int, int]

    def swapped(self) -> "_Points":
        """The same points with the roles of x and y exchanged (the dy pass of the backward)."""
        return self._replace(x=self.y, y=self.x)


def _points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, cost: str) -> _Points:
    """For "sqeuclidean", the raw x, y (fp32 or float64, any strides) and each pair's centre, which the kernels
    subtract as they load, zeroing padding rows (``sinkhorn._centred``); "cosine": the normalised points
    (``prepare_points``) and a zero centre (strides 0)."""
    if cost == "sqeuclidean":
        x, y = _readable(x), _readable(y)
        mu = _centre(x, y, alpha, beta)
        return _Points(x, y, mu, mu.stride())
    return _Points(*prepare_points(x.double(), y.double(), alpha, beta, cost), _constants((0.0,), x.device), (0, 0))


def _readable(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype the kernels load: fp32 and float64 as they are (any strides), fp16 / bf16 as fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _centre(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` float64: the mean of each pair's valid points, x and y together (one launch)."""
    (b, n, dim), m = x.shape, y.shape[1]
    mu = _empty((b, dim), torch.float64, x.device)
    br, bd = CENTRE_BLOCK
    K._centre_kernel[(b, triton.cdiv(dim, bd))](
        x, y, alpha, beta, mu, n, m, dim, *x.stride(), *y.stride(), BLOCK_R=br, BLOCK_D=bd, num_warps=CENTRE_WARPS,
        num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return mu


def _resident(points, cost, alpha, beta, schedule, symmetric, n, m, dim):
    b = alpha.shape[0]
    outs = _outputs(b, n, m, alpha.device)
    from_points = cost is None
    if from_points:
        X, Y, MU, COST = points.x, points.y, points.mu, points.x
        strides = (*X.stride(), *Y.stride(), *points.mu_strides, 0, 0, 0)
    else:
        X, Y, MU, COST, strides = cost, cost, cost, cost, (0,) * 8 + cost.stride()
    K._sinkhorn_resident_kernel[(b,)](
        X, Y, MU, COST, alpha, beta, _schedule(schedule, alpha.device), *outs, n, m, dim, *strides,
        *_loop_args(schedule), BLOCK_N=RESIDENT_MAX, BLOCK_M=RESIDENT_MAX, FROM_POINTS=from_points,
        SYMMETRIC=symmetric, HAS_TOL=schedule.tol is not None, num_warps=RESIDENT_WARPS, num_stages=NUM_STAGES,
        enable_fp_fusion=FP_FUSION)
    return outs


def _streaming(cost_hi, cost_lo, alpha, beta, schedule, symmetric):
    b, n, m = cost_hi.shape
    device = alpha.device
    f_prev = torch.zeros((b, n), dtype=torch.float64, device=device)
    g_prev = f_prev if symmetric else torch.zeros((b, m), dtype=torch.float64, device=device)
    f = _empty((b, n), torch.float64, device)
    g = f if symmetric else _empty((b, m), torch.float64, device)
    iters, err = _empty((b,), torch.int32, device), _empty((b,), torch.float64, device)
    K._sinkhorn_streaming_kernel[(b,)](
        cost_hi, cost_lo, alpha, beta, _schedule(schedule, device), f_prev, g_prev, f, g, iters, err,
        n, m, *cost_hi.stride(), *_loop_args(schedule),
        BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK, SYMMETRIC=symmetric, HAS_TOL=schedule.tol is not None,
        num_warps=STREAM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return [f, g, f_prev, g_prev, iters, err]


def cost_matrix(points: _Points, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``, fp32 ``[B, N, M]`` each: the cost |x_i - y_j|^2 / 2 of the prepared points, accumulated in
    float64 and split as hi + lo; alpha, beta: the float64 log-weights (-inf marks padding)."""
    x, y = points.x, points.y
    (b, n, dim), m = x.shape, y.shape[1]
    hi, lo = _empty((b, n, m), torch.float32, x.device), _empty((b, n, m), torch.float32, x.device)
    bn, bm, bk = COST_BLOCK
    K._cost_kernel[(b, triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, y, points.mu, alpha, beta, hi, lo, n, m, dim, *x.stride(), *y.stride(), *points.mu_strides, BLOCK_N=bn,
        BLOCK_M=bm, BLOCK_K=bk, num_warps=COST_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return hi, lo


def solve(cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """The Sinkhorn loop on precomputed costs ``cost_matrix [B, N, M]`` (see ``otfast.reference.solve``)."""
    b, n, m = cost_matrix.shape
    _check(alpha, beta, n, m, b)
    cost, alpha, beta = _f64(cost_matrix), _f64(alpha), _f64(beta)
    if max(n, m) <= RESIDENT_MAX:
        return Potentials(*_resident(None, cost, alpha, beta, schedule, symmetric, n, m, 1))
    hi = cost.float()
    return Potentials(*_streaming(hi, (cost - hi.double()).float(), alpha, beta, schedule, symmetric))


def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """The Sinkhorn loop on the cost ``cost`` between the raw points ``x [B, N, D]``, ``y [B, M, D]``.

    The kernels mask and centre the points as they load them ("sqeuclidean": one more launch finds each
    pair's centre, ``_Points``); "cosine" normalises them first (``otfast.reference.prepare_points``). Up
    to ``RESIDENT_MAX`` tokens the cost never leaves the chip; beyond, it is written once as two fp32 tiles.
    """
    (b, n, dim), m = x.shape, y.shape[1]
    _check(alpha, beta, n, m, b)
    alpha, beta = _f64(alpha), _f64(beta)
    points = _points(x, y, alpha, beta, cost)
    if max(n, m) <= RESIDENT_MAX:
        return Potentials(*_resident(points, None, alpha, beta, schedule, symmetric, n, m, dim))
    return Potentials(*_streaming(*cost_matrix(points, alpha, beta), alpha, beta, schedule, symmetric))


def _grad(points, f, g_prev, alpha, beta, u, eps):
    """dx ``[B, N, D]`` in the points' dtype (the kernel reads u and writes dx in it, converting nothing for
    fp32 or float64 embeddings)."""
    x, y = points.x, points.y
    (b, n, dim), m = x.shape, y.shape[1]
    out = _empty((b, n, dim), x.dtype, x.device)
    bn, bm, bk, bdo = GRAD_BLOCK
    K._grad_kernel[(b, triton.cdiv(n, bn), triton.cdiv(dim, bdo))](
        x, y, points.mu, _f64(f), _f64(g_prev), alpha, beta, _constants((eps,), x.device),
        u.to(x.dtype).contiguous(), out, n, m, dim, *x.stride(), *y.stride(), *points.mu_strides,
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=precision(), num_warps=GRAD_WARPS,
        num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients with respect to the raw points (see ``otfast.reference.grad_points``), no [B, N, M]
    buffer; in x's dtype."""
    alpha, beta = _f64(alpha), _f64(beta)
    points = _points(x, y, alpha, beta, cost)
    dx = _map_grad(x, points.x, _grad(points, pots.f, pots.g_prev, alpha, beta, u, eps), alpha, cost)
    if v is None:
        return dx, None
    dy = _grad(points.swapped(), pots.g, pots.f_prev, beta, alpha, v, eps)
    return dx, _map_grad(y, points.y, dy, beta, cost)


def _map_grad(x: torch.Tensor, xp: torch.Tensor, dxp: torch.Tensor, alpha: torch.Tensor, cost: str) -> torch.Tensor:
    """``prepare_grad`` in x's dtype. For "sqeuclidean" it is the identity on what ``_grad_kernel`` writes
    (centring passes the gradient unchanged, and a padding row's is already 0: its prepared point is 0, its
    weight u_i is 0 and its plan row is empty), so no launch is spent on it."""
    if cost == "sqeuclidean":
        return dxp.to(x.dtype)
    return prepare_grad(x.to(dxp.dtype), xp, dxp, alpha, cost).to(x.dtype)
