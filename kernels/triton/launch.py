"""Host launchers of the Triton Sinkhorn kernels: shape checks, regimes, block sizes. No autograd, no policy.

Implements the backend interface of ``otfast.backends`` (``solve``, ``solve_points``, ``grad_points``,
same signatures and semantics as ``otfast.reference``). Two regimes behind one entry:

- resident (max(N, M) <= ``RESIDENT_MAX`` = 64): one program per pair holds the whole cost tile in registers;
  extra device memory: the potentials, O(B (N + M)).
- streaming (longer): the fp32 cost is written once, 4 B N M bytes, then streamed tile by tile.

The backward is one tiled kernel for every length, launched for dx and again (roles swapped) for dy.
Arithmetic is fp32 whatever the input dtype; float64 inputs are computed in fp32 and returned as float64.
``OTFAST_TRITON_PRECISION`` (default "ieee") sets the ``tl.dot`` precision of the cost and of S @ y;
"tf32x3" runs on tensor cores at near-fp32 accuracy (plain tf32, ~1e-3 relative, is too coarse for small
eps and is not offered). The resident kernel forms its cost tile with exact fp32 FMAs whatever this says.
"""

from __future__ import annotations

import math
import os

import torch

from otfast.reference import Potentials, prepare_grad, prepare_points
from otfast.schedule import Schedule

try:
    import triton

    from . import sinkhorn as K
except ImportError as exc:  # the package installs and runs without triton
    UNAVAILABLE: str | None = f"triton is not installed ({exc})"
else:
    UNAVAILABLE = None

RESIDENT_MAX = 64
DESCRIPTION = f"fused Triton kernels: register-resident tiles up to {RESIDENT_MAX} x {RESIDENT_MAX}, streaming beyond"
PRECISIONS = ("ieee", "tf32x3")
STREAM_BLOCK = 64
COST_BLOCK = (64, 64, 32)
GRAD_BLOCK = (64, 64, 32, 64)  # BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_DO
GRAD_WARPS = 8
STREAM_WARPS = 8
COST_WARPS = 4
# No software pipelining: prefetched tiles would stay live in registers and spill (checked with
# ``python -m benchmarks.kernel_resources``); the kernels are exp-bound, not load-latency bound.
NUM_STAGES = 1


def precision() -> str:
    value = os.environ.get("OTFAST_TRITON_PRECISION", "ieee")
    if value not in PRECISIONS:
        raise ValueError(f"OTFAST_TRITON_PRECISION must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def resident_config(n: int, m: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the resident kernel for an n x m problem: a square power-of-two tile."""
    block = max(16, triton.next_power_of_2(max(n, m)))
    return block, 8 if block >= 64 else 4


def configs() -> list[tuple[str, dict, int]]:
    """Every (kernel, constexprs, num_warps) the launchers can choose (all with ``NUM_STAGES``): what the
    sm_90 resource check compiles."""
    out = []
    for block in (16 << i for i in range(int(math.log2(RESIDENT_MAX // 16)) + 1)):
        warps = resident_config(block, block)[1]
        for from_points in (True, False):
            for symmetric in (False, True):
                for has_tol in (False, True):
                    out.append(("_sinkhorn_resident_kernel", dict(BLOCK_N=block, BLOCK_M=block,
                                FROM_POINTS=from_points, SYMMETRIC=symmetric, HAS_TOL=has_tol), warps))
    for symmetric in (False, True):
        for has_tol in (False, True):
            out.append(("_sinkhorn_streaming_kernel", dict(BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK,
                        SYMMETRIC=symmetric, HAS_TOL=has_tol), STREAM_WARPS))
    for prec in PRECISIONS:
        bn, bm, bk = COST_BLOCK
        out.append(("_cost_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, PRECISION=prec), COST_WARPS))
        bn, bm, bk, bdo = GRAD_BLOCK
        out.append(("_grad_kernel", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=prec),
                    GRAD_WARPS))
    return out


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; the tests replace it with a NaN-filled one so an unwritten element shows."""
    return torch.empty(shape, dtype=dtype, device=device)


def _schedule_args(schedule: Schedule, device: torch.device) -> tuple:
    anneal = torch.tensor(schedule.anneal or (0.0,), dtype=torch.float32, device=device)
    inv_rho = 0.0 if schedule.rho is None else 1.0 / schedule.rho
    return (anneal, len(schedule.anneal), schedule.eps_init, schedule.eps, schedule.n_iters,
            schedule.tol if schedule.tol is not None else 0.0, inv_rho)


def _check(alpha: torch.Tensor, beta: torch.Tensor, n: int, m: int, b: int) -> None:
    if alpha.shape != (b, n) or beta.shape != (b, m):
        raise ValueError(f"log-weights of shapes {tuple(alpha.shape)}, {tuple(beta.shape)} do not match a "
                         f"{b} x {n} x {m} problem")


def _outputs(b: int, n: int, m: int, device: torch.device) -> list[torch.Tensor]:
    f32 = torch.float32
    return [_empty((b, n), f32, device), _empty((b, m), f32, device), _empty((b, n), f32, device),
            _empty((b, m), f32, device), _empty((b,), torch.int32, device), _empty((b,), f32, device)]


def _finish(outs: list[torch.Tensor], dtype: torch.dtype) -> Potentials:
    f, g, f_prev, g_prev, iters, err = outs
    return Potentials(f.to(dtype), g.to(dtype), f_prev.to(dtype), g_prev.to(dtype), iters, err.to(dtype))


def _resident(x, y, cost, alpha, beta, schedule, symmetric, n, m, d):
    b = alpha.shape[0]
    outs = _outputs(b, n, m, alpha.device)
    block, warps = resident_config(n, m)
    from_points = cost is None
    if from_points:
        X, Y, COST, strides = x, y, x, (*x.stride(), *y.stride(), 0, 0, 0)
    else:
        X, Y, COST, strides = cost, cost, cost, (0, 0, 0, 0, 0, 0, *cost.stride())
    anneal, *tail = _schedule_args(schedule, alpha.device)
    K._sinkhorn_resident_kernel[(b,)](
        X, Y, COST, alpha.float().contiguous(), beta.float().contiguous(), anneal, *outs, n, m, d, *strides, *tail,
        BLOCK_N=block, BLOCK_M=block, FROM_POINTS=from_points, SYMMETRIC=symmetric,
        HAS_TOL=schedule.tol is not None, num_warps=warps, num_stages=NUM_STAGES)
    return outs


def _streaming(cost, alpha, beta, schedule, symmetric):
    b, n, m = cost.shape
    device = alpha.device
    f_prev = torch.zeros((b, n), dtype=torch.float32, device=device)
    g_prev = f_prev if symmetric else torch.zeros((b, m), dtype=torch.float32, device=device)
    f = _empty((b, n), torch.float32, device)
    g = f if symmetric else _empty((b, m), torch.float32, device)
    iters, err = _empty((b,), torch.int32, device), _empty((b,), torch.float32, device)
    anneal, *tail = _schedule_args(schedule, device)
    K._sinkhorn_streaming_kernel[(b,)](
        cost, alpha.float().contiguous(), beta.float().contiguous(), anneal, f_prev, g_prev, f, g, iters, err,
        n, m, *cost.stride(), *tail,
        BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK, SYMMETRIC=symmetric, HAS_TOL=schedule.tol is not None,
        num_warps=STREAM_WARPS, num_stages=NUM_STAGES)
    return [f, g, f_prev, g_prev, iters, err]


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, N, M]`` cost |x_i - y_j|^2 / 2 of centred points ``x [B, N, D]``, ``y [B, M, D]``."""
    (b, n, d), m = x.shape, y.shape[1]
    cost = _empty((b, n, m), torch.float32, x.device)
    bn, bm, bk = COST_BLOCK
    K._cost_kernel[(b, triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, y, cost, n, m, d, *x.stride(), *y.stride(),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, PRECISION=precision(), num_warps=COST_WARPS,
        num_stages=NUM_STAGES)
    return cost


def solve(C: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """The Sinkhorn loop on precomputed costs ``C [B, N, M]`` (see ``otfast.reference.solve``)."""
    b, n, m = C.shape
    _check(alpha, beta, n, m, b)
    cost = C.float()
    if max(n, m) <= RESIDENT_MAX:
        outs = _resident(None, None, cost, alpha, beta, schedule, symmetric, n, m, 1)
    else:
        outs = _streaming(cost.contiguous(), alpha, beta, schedule, symmetric)
    return _finish(outs, C.dtype)


def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """The Sinkhorn loop on the cost ``cost`` between the raw points ``x [B, N, D]``, ``y [B, M, D]``.

    The points are masked and centred or normalised by ``otfast.reference.prepare_points`` (elementwise
    torch ops). Up to ``RESIDENT_MAX`` tokens the cost never leaves the chip; beyond, it is written once
    in fp32.
    """
    (b, n, d), m = x.shape, y.shape[1]
    _check(alpha, beta, n, m, b)
    x, y = prepare_points(x, y, alpha, beta, cost)
    if max(n, m) <= RESIDENT_MAX:
        outs = _resident(x, y, None, alpha, beta, schedule, symmetric, n, m, d)
    else:
        outs = _streaming(cost_matrix(x, y), alpha, beta, schedule, symmetric)
    return _finish(outs, x.dtype)


def _grad(x, y, f, g_prev, alpha, beta, u, eps, damping):
    (b, n, d), m = x.shape, y.shape[1]
    out = _empty((b, n, d), torch.float32, x.device)
    bn, bm, bk, bdo = GRAD_BLOCK
    k = 1.0 / (eps * math.log(2.0))  # log2(e) / eps
    K._grad_kernel[(b, triton.cdiv(n, bn), triton.cdiv(d, bdo))](
        x, y, f.float().contiguous(), g_prev.float().contiguous(), alpha.float().contiguous(),
        beta.float().contiguous(), u.float().contiguous(), out, n, m, d, *x.stride(), *y.stride(), k, 1.0 / damping,
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=precision(), num_warps=GRAD_WARPS,
        num_stages=NUM_STAGES)
    return out.to(x.dtype)


def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, damping: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients with respect to the raw points (see ``otfast.reference.grad_points``), no [B, N, M]
    buffer."""
    xp, yp = prepare_points(x, y, alpha, beta, cost)
    dx = prepare_grad(x, xp, _grad(xp, yp, pots.f, pots.g_prev, alpha, beta, u, eps, damping), alpha, cost)
    if v is None:
        return dx, None
    return dx, prepare_grad(y, yp, _grad(yp, xp, pots.g, pots.f_prev, beta, alpha, v, eps, damping), beta, cost)
