"""Input validation shared by every public entry point.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the argument and the
problem, so that bad input never turns into a silent NaN deep inside a kernel.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a floating-point tensor otfast computes with."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_finite(name: str, t: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or inf where ``mask`` (broadcast on the left) is set."""
    if bool(torch.isfinite(t.sum())):  # one pass: a NaN or inf anywhere makes the sum NaN or inf
        return
    bad = ~torch.isfinite(t)
    if mask is not None:
        bad = bad & mask.reshape(mask.shape + (1,) * (t.dim() - mask.dim()))
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(t).logical_and(bad).any()) else "inf"
        raise ValueError(f"{name} contains {kind} values")


def check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be given")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_iterations(n_iters: int | None, tol: float | None) -> None:
    if n_iters is not None and (isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0):
        raise ValueError(f"n_iters must be an integer >= 0, got {n_iters!r}")
    check_positive("tol", tol, allow_none=True)


def check_scaling(scaling: float | None) -> None:
    if scaling is None:
        return
    check_positive("scaling", scaling)
    if scaling >= 1:
        raise ValueError(f"scaling must lie in (0, 1), got {scaling}")


def as_mask(name: str, mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Turn a Hugging Face style attention mask (1 = token, 0 = padding) into a bool tensor.

    Args:
        mask: ``[B, N]`` bool or integer tensor, or None for "every token is valid".
        shape: the expected ``(B, N)``.

    Raises:
        ValueError: wrong shape, values other than 0/1, or a pair without any valid token.
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} (batch, length)")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the data is on {device}")
    if mask.dtype == torch.bool:
        out = mask
    elif mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
    else:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1 (1 = token, 0 = padding)")
        out = mask.bool()
    empty = (~out.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name}: pair at batch index {int(empty[0])} has no valid token")
    return out


def as_weights(name: str, w: torch.Tensor | None, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative weights normalised to sum 1 over the unmasked entries, 0 on padding.

    Args:
        w: ``[B, N]`` weights or None for uniform weights.
        mask: ``[B, N]`` bool.
    """
    m = mask.to(dtype)
    if w is None:
        return m / m.sum(dim=1, keepdim=True)
    check_float_tensor(name, w)
    if tuple(w.shape) != tuple(mask.shape):
        raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {tuple(mask.shape)}")
    if w.device != mask.device:
        raise ValueError(f"{name} is on {w.device}, the data is on {mask.device}")
    check_finite(name, w, mask)
    if bool(((w < 0) & mask).any()):
        raise ValueError(f"{name} has negative weights")
    w = torch.where(mask, w.to(dtype), torch.zeros((), dtype=dtype, device=w.device))
    total = w.sum(dim=1, keepdim=True)
    zero = (total.squeeze(1) <= 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(f"{name}: pair at batch index {int(zero[0])} has zero total weight")
    return w / total


def as_matrix_batch(name: str, t: torch.Tensor, mask_a: torch.Tensor | None, mask_b: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Validate a ``[B, N, M]`` (or unbatched ``[N, M]``) matrix batch such as a cost or a plan, with masks.

    Args:
        name: the argument's name, for the messages.
        t: the matrices; mask_a: ``[B, N]`` (``[N]`` when unbatched) or None; mask_b: ``[B, M]`` likewise.

    Returns:
        ``(t3 [B, N, M], mask_a [B, N] bool, mask_b [B, M] bool, unbatched)``; ``t3`` is finite on every
        entry whose row and column are both valid.
    """
    check_float_tensor(name, t)
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D [N, M] or 3-D [B, N, M], got {t.dim()}-D {tuple(t.shape)}")
    unbatched = t.dim() == 2
    t3 = t.unsqueeze(0) if unbatched else t
    if 0 in t3.shape:
        raise ValueError(f"{name} has an empty dimension: {tuple(t.shape)}")
    check_same_device(**{name: t}, mask_a=mask_a, mask_b=mask_b)
    B, N, M = t3.shape
    ma = as_mask("mask_a", lift(mask_a, unbatched), (B, N), t3.device)
    mb = as_mask("mask_b", lift(mask_b, unbatched), (B, M), t3.device)
    check_finite(name, t3, ma.unsqueeze(2) & mb.unsqueeze(1))
    return t3, ma, mb, unbatched


def lift(t: torch.Tensor | None, unbatched: bool) -> torch.Tensor | None:
    """Add the batch axis to an optional per-pair tensor of an unbatched call."""
    return t.unsqueeze(0) if unbatched and t is not None else t


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"inputs are on different devices: {devices}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype otfast computes in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_points(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None, mask_y: torch.Tensor | None) -> None:
    """Raise unless x and y are float point clouds ``[B, N, D]``, ``[B, M, D]`` (or unbatched ``[N, D]``,
    ``[M, D]``) on one device with their masks."""
    check_float_tensor("x", x)
    check_float_tensor("y", y)
    if x.dim() != y.dim() or x.dim() not in (2, 3):
        raise ValueError(f"x and y must both be [B, N, D] / [B, M, D] (or unbatched [N, D] / [M, D]), got "
                         f"shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: x has {x.shape[0]} pairs, y has {y.shape[0]}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"feature sizes differ: x has D={x.shape[-1]}, y has D={y.shape[-1]}")
    if 0 in x.shape or 0 in y.shape:
        raise ValueError(f"empty input: x {tuple(x.shape)}, y {tuple(y.shape)}")
    check_same_device(x=x, y=y, mask_x=mask_x, mask_y=mask_y)
