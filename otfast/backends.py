"""Backend dispatch: which implementation of the solver runs for a given tensor.

A backend is a module implementing ``Backend`` (the three functions of ``otfast.reference``):

- ``torch``: ``otfast.reference``, always there.
- ``triton``: ``otfast.triton_backend``, the launchers of the fused kernels (``otfast.kernels.triton``) for
  CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``.
- ``cpu``: ``otfast.cpu_backend``, the launcher of the C++ extension (``otfast.kernels.cpu``) for CPU
  tensors, when it was built.
- ``auto``: triton for CUDA tensors, else cpu if built, else torch.

The fused backends are imported on first use, by name, because their dependencies (triton, a built
extension) are optional; a module that cannot be imported says why (``backends()``). A backend that sets
``DEVICE_SCHEDULE = True`` takes a ``Schedule`` whose annealing is an ``otfast.schedule.Annealing`` (the list
derived on the device from a device diameter); the others get the list as floats.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from . import reference
from .reference import Potentials
from .schedule import Schedule

NAMES = ("auto", "torch", "triton", "cpu")


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (modules implement it; ``otfast.reference`` is the specification).

    Tensors: points ``x [B, N, D]``, ``y [B, M, D]`` (raw: the backend masks, centres or normalises them as
    ``otfast.reference.prepare_points`` does), log-weights ``alpha [B, N]``, ``beta [B, M]`` (-inf on
    padding; the loss passes them in float64), a cost name from ``otfast.reference.COSTS``.

    A backend may also solve the loss's problems together (the Triton backend does, in one launch per
    kernel): ``solve_problems(x, y, alpha, beta, schedule, debias, cost)`` -> ``[OT(x, y)]`` or
    ``[OT(x, y), OT(x, x), OT(y, y)]``, and ``grad_problems(x, y, alpha, beta, pots, eps, weights, cost)``
    -> ``[dx]`` or ``[dx, dy]`` (debiased: dx of OT(x, y) - OT(x, x), dy of OT(x, y) - OT(y, y)); without
    them the loss calls the three functions below once per problem (``otfast.ops``). It may also have its own
    ``bounding_diameter(x, y, mask_x, mask_y)``, equal to ``otfast.schedule.bounding_diameter``'s (the Triton
    backend's takes one launch), which the loss takes its annealing start from.
    """

    def solve(self, cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
              symmetric: bool = False) -> Potentials:
        """The Sinkhorn loop of ``otfast.schedule`` on precomputed costs ``[B, N, M]``."""

    def solve_points(self, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                     schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
        """The same loop on the cost ``cost`` between the points; ``symmetric`` for OT(x, x) (y is x)."""

    def grad_points(self, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                    pots: Potentials, eps: float, u: torch.Tensor, v: torch.Tensor | None,
                    cost: str = "sqeuclidean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Envelope gradients with respect to the raw points, given upstream weights u = dL/df * damping and
        v = dL/dg * damping (None: no dy)."""


class BackendInfo(NamedTuple):
    """Whether a backend can run here, and why not when it cannot."""

    available: bool
    detail: str


def triton_interpreted() -> bool:
    """Whether Triton kernels run under its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> tuple[Backend | None, str]:
    if name == "torch":
        return reference, "the float64-capable reference (always available)"
    module = {"triton": "otfast.triton_backend", "cpu": "otfast.cpu_backend"}[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, f"cannot import {module}: {exc}"
    reason = getattr(mod, "UNAVAILABLE", None)
    if reason:
        return None, reason
    return mod, getattr(mod, "DESCRIPTION", name)


def backends() -> dict[str, BackendInfo]:
    """Which backends are available here, and why not where one is not.

    Returns:
        ``{"torch": BackendInfo(True, ...), "triton": BackendInfo(False, "reason"), ...}``.

    Example:
        >>> otfast.backends()["torch"].available
        True
    """
    out = {}
    for name in NAMES[1:]:
        mod, detail = _load(name)
        if name == "triton" and mod is not None and not torch.cuda.is_available() and not triton_interpreted():
            detail = "triton is installed but there is no CUDA device (set TRITON_INTERPRET=1 to run it on CPU)"
            out[name] = BackendInfo(False, detail)
        else:
            out[name] = BackendInfo(mod is not None, detail)
    return out


def check_name(name: str) -> None:
    """Raises ValueError naming the choices when ``name`` is not a backend name."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def resolve(name: str, device: torch.device) -> Backend:
    """The backend module that runs for tensors on ``device``.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` here.
    """
    check_name(name)
    if name == "auto":
        if device.type == "cuda":
            mod, _ = _load("triton")
            if mod is not None:
                return mod
        elif device.type == "cpu":
            mod, _ = _load("cpu")
            if mod is not None:
                return mod
        return reference
    mod, detail = _load(name)
    if mod is None:
        raise ValueError(f"backend {name!r} is not available: {detail}")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device.type} tensors")
    return mod
