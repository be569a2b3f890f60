"""The triton backend: host launchers of the Triton Sinkhorn kernels (``otfast.kernels.triton``).

Implements ``otfast.backends.Backend`` (``solve``, ``solve_points``, ``grad_points``, the semantics of
``otfast.reference``): shape checks, the choice of regime and configuration (among
``otfast.kernels.triton.configs``), float64 point preparation (``otfast.reference.prepare_points``) and
the output buffers. Two regimes behind one entry:

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

import torch

from .reference import Potentials, prepare_grad, prepare_points
from .schedule import Annealing, Schedule

try:
    import triton

    from .kernels.triton import sinkhorn as K
    from .kernels.triton.configs import (COST_BLOCK, COST_WARPS, FP_FUSION, GRAD_BLOCK, GRAD_WARPS, NUM_STAGES,
                                         PRECISIONS, RESIDENT_MAX, RESIDENT_WARPS, STREAM_BLOCK, STREAM_WARPS)
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
            _empty((b, m), f64, device), _empty((b,), torch.int32, device), _empty((b,), torch.float32, device)]


def _finish(outs: list[torch.Tensor]) -> Potentials:
    f, g, f_prev, g_prev, iters, err = outs
    return Potentials(f, g, f_prev, g_prev, iters, err.double())


def _resident(x, y, cost, alpha, beta, schedule, symmetric, n, m, dim):
    b = alpha.shape[0]
    outs = _outputs(b, n, m, alpha.device)
    from_points = cost is None
    if from_points:
        X, Y, COST, strides = x, y, x, (*x.stride(), *y.stride(), 0, 0, 0)
    else:
        X, Y, COST, strides = cost, cost, cost, (0, 0, 0, 0, 0, 0, *cost.stride())
    K._sinkhorn_resident_kernel[(b,)](
        X, Y, COST, _f64(alpha), _f64(beta), _schedule(schedule, alpha.device), *outs, n, m, dim, *strides,
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
    iters, err = _empty((b,), torch.int32, device), _empty((b,), torch.float32, device)
    K._sinkhorn_streaming_kernel[(b,)](
        cost_hi, cost_lo, _f64(alpha), _f64(beta), _schedule(schedule, device), f_prev, g_prev, f, g, iters, err,
        n, m, *cost_hi.stride(), *_loop_args(schedule),
        BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK, SYMMETRIC=symmetric, HAS_TOL=schedule.tol is not None,
        num_warps=STREAM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return [f, g, f_prev, g_prev, iters, err]


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``, fp32 ``[B, N, M]`` each: the cost |x_i - y_j|^2 / 2 of centred float64 points
    ``x [B, N, D]``, ``y [B, M, D]``, accumulated in float64 and split as hi + lo."""
    (b, n, dim), m = x.shape, y.shape[1]
    hi, lo = _empty((b, n, m), torch.float32, x.device), _empty((b, n, m), torch.float32, x.device)
    bn, bm, bk = COST_BLOCK
    K._cost_kernel[(b, triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, y, hi, lo, n, m, dim, *x.stride(), *y.stride(), BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=COST_WARPS,
        num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return hi, lo


def solve(cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """The Sinkhorn loop on precomputed costs ``cost_matrix [B, N, M]`` (see ``otfast.reference.solve``)."""
    b, n, m = cost_matrix.shape
    _check(alpha, beta, n, m, b)
    cost = _f64(cost_matrix)
    if max(n, m) <= RESIDENT_MAX:
        return _finish(_resident(None, None, cost, alpha, beta, schedule, symmetric, n, m, 1))
    hi = cost.float()
    return _finish(_streaming(hi, (cost - hi.double()).float(), alpha, beta, schedule, symmetric))


def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """The Sinkhorn loop on the cost ``cost`` between the raw points ``x [B, N, D]``, ``y [B, M, D]``.

    The points are masked and centred or normalised in float64 by ``otfast.reference.prepare_points``
    (elementwise torch ops). Up to ``RESIDENT_MAX`` tokens the cost never leaves the chip; beyond, it is
    written once as two fp32 tiles.
    """
    (b, n, dim), m = x.shape, y.shape[1]
    _check(alpha, beta, n, m, b)
    xp, yp = prepare_points(x.double(), y.double(), alpha.double(), beta.double(), cost)
    if max(n, m) <= RESIDENT_MAX:
        return _finish(_resident(xp, yp, None, alpha, beta, schedule, symmetric, n, m, dim))
    return _finish(_streaming(*cost_matrix(xp, yp), alpha, beta, schedule, symmetric))


def _grad(x, y, f, g_prev, alpha, beta, u, eps):
    (b, n, dim), m = x.shape, y.shape[1]
    out = _empty((b, n, dim), torch.float32, x.device)
    bn, bm, bk, bdo = GRAD_BLOCK
    K._grad_kernel[(b, triton.cdiv(n, bn), triton.cdiv(dim, bdo))](
        x, y, _f64(f), _f64(g_prev), _f64(alpha), _f64(beta), _constants((eps,), x.device),
        u.float().contiguous(), out, n, m, dim, *x.stride(), *y.stride(),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=precision(), num_warps=GRAD_WARPS,
        num_stages=NUM_STAGES, enable_fp_fusion=FP_FUSION)
    return out


def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients with respect to the raw points (see ``otfast.reference.grad_points``), no [B, N, M]
    buffer; in x's dtype."""
    xp, yp = prepare_points(x.double(), y.double(), alpha.double(), beta.double(), cost)
    dxp = _grad(xp, yp, pots.f, pots.g_prev, alpha, beta, u, eps)
    dx = _map_grad(x, xp, dxp, alpha, cost)
    if v is None:
        return dx, None
    dyp = _grad(yp, xp, pots.g, pots.f_prev, beta, alpha, v, eps)
    return dx, _map_grad(y, yp, dyp, beta, cost)


def _map_grad(x: torch.Tensor, xp: torch.Tensor, dxp: torch.Tensor, alpha: torch.Tensor, cost: str) -> torch.Tensor:
    """``prepare_grad`` in x's dtype. For "sqeuclidean" it is the identity on what ``_grad_kernel`` writes
    (centring passes the gradient unchanged, and a padding row's is already 0: its prepared point is 0, its
    weight u_i is 0 and its plan row is empty), so no launch is spent on it."""
    if cost == "sqeuclidean":
        return dxp.to(x.dtype)
    return prepare_grad(x.float(), xp.float(), dxp, alpha, cost).to(x.dtype)
