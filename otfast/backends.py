"""Backend dispatch: which implementation of the solver runs for a given tensor.

A backend is a module with three functions of the same signatures as ``otfast.reference``:
``solve(C, alpha, beta, schedule, symmetric)``, ``solve_points(x, y, alpha, beta, schedule, symmetric)``
and ``grad_points(x, y, alpha, beta, pots, eps, damping, u, v)``.

- ``torch``: ``otfast.reference``, always there.
- ``triton``: fused kernels (``otfast.kernels.triton``) for CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``.
- ``cpu``: the C++ extension (``otfast.kernels.cpu``) for CPU tensors, when it was built.
- ``auto``: triton for CUDA tensors, else cpu if built, else torch.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple

import torch

from . import reference

NAMES = ("auto", "torch", "triton", "cpu")


class BackendInfo(NamedTuple):
    """Whether a backend can run here, and why not when it cannot."""

    available: bool
    detail: str


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> tuple[ModuleType | None, str]:
    if name == "torch":
        return reference, "the float64-capable reference (always available)"
    module = {"triton": "otfast.kernels.triton.launch", "cpu": "otfast.kernels.cpu.launch"}[name]
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
        if name == "triton" and mod is not None and not torch.cuda.is_available() and not _triton_interpreted():
            detail = "triton is installed but there is no CUDA device (set TRITON_INTERPRET=1 to run it on CPU)"
            out[name] = BackendInfo(False, detail)
        else:
            out[name] = BackendInfo(mod is not None, detail)
    return out


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module that runs for tensors on ``device``.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` here.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
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
    if name == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device.type} tensors")
    return mod
