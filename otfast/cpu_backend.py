"""The cpu backend: host launcher of the fused C++ CPU Sinkhorn kernel (``otfast.kernels.cpu._sinkhorn``).

Implements ``otfast.backends.Backend`` (``solve``, ``solve_points``, ``grad_points``, the semantics of
``otfast.reference``, and ``bounding_diameter``, the annealing start's). Tensors go to the extension as float64
numpy views of contiguous CPU buffers (fp32 ones too for ``bounding_diameter``; no torch headers at build time);
the kernel runs every iteration of the whole batch in one call with the GIL released, on
``torch.get_num_threads()`` OpenMP threads, in double precision whatever the input dtype (the potentials come
back in float64, the gradients in the input dtype). See ``kernels/cpu/sinkhorn.cpp`` for the update rule, the
precision, the memory traffic and the threading; results do not depend on the thread count.

``UNAVAILABLE`` is None when the extension imported, else the reason it did not.
"""

from __future__ import annotations

import torch

from ._checks import check_bool_mask
from .reference import Potentials
from .schedule import Schedule
from .schedule import bounding_diameter as reference_diameter

try:
    from .kernels.cpu import _sinkhorn
except ImportError as exc:
    _sinkhorn = None
    UNAVAILABLE: str | None = (f"the C++ extension otfast.kernels.cpu._sinkhorn is not built ({exc}); it needs a "
                               "C++17 compiler at install time (pip install -e . prints why it was skipped)")
    DESCRIPTION = "fused C++ CPU kernel (not built)"
else:
    UNAVAILABLE = None
    DESCRIPTION = ("fused C++ CPU kernel, " + ("OpenMP over pairs" if _sinkhorn.openmp else "built without OpenMP: "
                                              "one thread"))


def _np(t: torch.Tensor):
    return t.detach().to(torch.float64).contiguous().numpy()


def _schedule_args(schedule: Schedule, symmetric: bool) -> dict:
    return dict(anneal=[float(e) for e in schedule.anneal], eps=float(schedule.eps), n_iters=int(schedule.n_iters),
                tol=None if schedule.tol is None else float(schedule.tol),
                rho=None if schedule.rho is None else float(schedule.rho), symmetric=bool(symmetric),
                threads=torch.get_num_threads())


def _potentials(out) -> Potentials:
    return Potentials(*(torch.from_numpy(a) for a in out))


def solve(cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """``otfast.reference.solve`` (same arguments and result) on the C++ kernel.

    Args:
        cost_matrix: ``[B, N, M]`` cost; alpha ``[B, N]``, beta ``[B, M]`` log-weights (-inf on padding);
            schedule and symmetric as in the reference.

    Returns:
        ``Potentials`` (float64), n_iters int32.
    """
    return _potentials(_sinkhorn.solve_cost(_np(cost_matrix), _np(alpha), _np(beta),
                                            **_schedule_args(schedule, symmetric)))


def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """``solve`` on the cost ``cost`` between the raw points ``x [B, N, D]``, ``y [B, M, D]``.

    The kernel masks, centres or normalises each pair (``otfast.reference.prepare_points``) and forms
    its cost tile once; neither leaves the cache.
    """
    return _potentials(_sinkhorn.solve_points(_np(x), _np(y), _np(alpha), _np(beta), cosine=cost == "cosine",
                                              **_schedule_args(schedule, symmetric)))


def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients through the final step, as ``otfast.reference.grad_points``.

    Args:
        x, y: the raw points ``[B, N, D]``, ``[B, M, D]`` the solve ran on, and its ``cost``.
        pots: the ``Potentials`` of that solve (only f_prev and g_prev are read).
        u: ``[B, N]`` = dL/df * damping; v: ``[B, M]`` = dL/dg * damping, or None to skip dy.

    Returns:
        ``(dx [B, N, D], dy [B, M, D] or None)`` in x's dtype, 0 on padding rows.
    """
    (b, n, dim), m = x.shape, y.shape[1]
    dx = torch.empty(b, n, dim, dtype=torch.float64)
    dy = None if v is None else torch.empty(b, m, dim, dtype=torch.float64)
    _sinkhorn.grad_points(_np(x), _np(y), _np(alpha), _np(beta), _np(pots.f_prev), _np(pots.g_prev), float(eps),
                          _np(u), None if v is None else _np(v), cost == "cosine", dx.numpy(),
                          None if dy is None else dy.numpy(), torch.get_num_threads())
    return dx.to(x.dtype), None if dy is None else dy.to(x.dtype)


def bounding_diameter(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> torch.Tensor:
    """``otfast.schedule.bounding_diameter`` bit for bit, in one pass over float32 or float64 points (the C++
    ``bounding_sides``: the box's sides hi - lo in the points' dtype, then the diagonal in float64 as the
    reference takes it), where the reference's masked amax/amin write four ``[B, N, D]`` temporaries. Other
    dtypes go to the reference.

    Raises:
        TypeError: a mask that is not bool.
    """
    check_bool_mask("mask_x", mask_x)
    check_bool_mask("mask_y", mask_y)
    if x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype:
        return reference_diameter(x, y, mask_x, mask_y)
    arrays = (t.detach().contiguous().numpy() for t in (x, y, mask_x, mask_y))
    return torch.from_numpy(_sinkhorn.bounding_sides(*arrays, torch.get_num_threads())).double().norm()
