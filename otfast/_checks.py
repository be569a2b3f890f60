"""Input validation shared by every public entry point.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the argument and the
problem, so that bad input never turns into a silent NaN deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a floating-point tensor otfast computes with."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_bool_mask(name: str, mask: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``mask`` is a bool tensor (what the kernels that read a mask's bytes take;
    ``as_mask`` converts the API's masks)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")


def check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be given")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) <= 0:  # float: a numpy float32 compared with a float casts it
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


_SQUARABLE = math.sqrt(torch.finfo(torch.float64).max)


def check_squarable(name: str, value: float | None) -> None:
    """Raise ``ValueError`` when a length (blur, reach, diameter) is too large for its square, which the loss
    takes, to be a float64 number."""
    if value is not None and float(value) >= _SQUARABLE:
        raise ValueError(f"{name} = {value:g} is too large: its square overflows float64")


def as_float(value: numbers.Real | None) -> float | None:
    """A checked number (``check_positive``: any real, numpy's scalars included) as a Python float, which the
    custom op's schema takes."""
    return None if value is None else float(value)


# The smallest temperature any backend accepts: 1 / eps and C / eps stay finite in float64 for costs up to
# 1e8 (below this, the loss was NaN). The Triton kernels' fp32 exponents need more (their launcher says so).
EPS_MIN = 1e-300


def check_temperature(what: str, eps: float) -> None:
    """Raise ``ValueError`` when a temperature is too small for the float64 the solvers compute in."""
    if float(eps) < EPS_MIN:
        raise ValueError(f"{what} = {eps:g} is below {EPS_MIN:g}, where 1 / eps and C / eps stop being finite "
                         "float64 numbers; use a larger one")


def check_iterations(n_iters: int | None, tol: float | None) -> None:
    if n_iters is not None and (isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral)
                                or n_iters < 0):
        raise ValueError(f"n_iters must be an integer >= 0, got {n_iters!r}")
    check_positive("tol", tol, allow_none=True)


def check_scaling(scaling: float | None) -> None:
    if scaling is None:
        return
    check_positive("scaling", scaling)
    if scaling >= 1:
        raise ValueError(f"scaling must lie in (0, 1), got {scaling}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], unbatched: bool, what: str = "") -> None:
    """Raise ``ValueError`` unless ``t`` has ``shape``; an unbatched call's tensors, lifted (``lift``), are named
    by the shapes the caller passed and expected, without the batch axis."""
    if tuple(t.shape) != tuple(shape):
        got, want = (tuple(t.shape)[1:], tuple(shape)[1:]) if unbatched else (tuple(t.shape), tuple(shape))
        raise ValueError(f"{name} has shape {got}, expected {want}{what}")


def as_mask(name: str, mask, shape: tuple[int, int], device: torch.device,
            unbatched: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Hugging Face style attention mask (1 = token, 0 = padding) as a bool tensor, and the values to check.

    Args:
        mask: ``[B, N]`` bool or integer tensor (or anything ``torch.as_tensor`` takes, such as nested lists),
            or None for "every token is valid".
        shape: the expected ``(B, N)``.
        unbatched: the mask is an unbatched call's, lifted (``lift``): its messages leave out the batch axis.

    Returns:
        ``(bool mask, raw)``: ``raw`` is the integer mask whose values ``input_checks`` must see (0 and 1 only),
        None when there is nothing to check. Shapes, devices and dtypes are checked here (no host read).
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device), None
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a tensor (or nested lists of 0 and 1), got {type(mask).__name__}: "
                            f"{exc}") from None
    _check_shape(name, mask, shape, unbatched, " (length)" if unbatched else " (batch, length)")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the data is on {device}")
    if mask.dtype == torch.bool:
        return mask, None
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
    return mask != 0, mask


def as_weights(name: str, w: torch.Tensor | None, mask: torch.Tensor, unbatched: bool = False) -> torch.Tensor:
    """Non-negative weights normalised in float64 to sum 1 over the unmasked entries, 0 on padding. Float64,
    whatever the data's dtype: weights rounded to float32 sum to 1 only within ~1e-8, and a balanced problem
    whose two sides' masses differ by that never gets its marginal error below it. A weight of 0 is no part of
    the total, so its gradient is 0, as a masked token's (the potential of a token with no mass is arbitrary).
    Shapes, devices and dtypes are checked here; the values (finite, non-negative, a positive total) by
    ``input_checks``.

    Args:
        w: ``[B, N]`` weights or None for uniform weights.
        mask: ``[B, N]`` bool.
        unbatched: as ``as_mask``'s.
    """
    if w is None:
        m = mask.double()
        return m / m.sum(dim=1, keepdim=True)
    check_float_tensor(name, w)
    _check_shape(name, w, mask.shape, unbatched)
    if w.device != mask.device:
        raise ValueError(f"{name} is on {w.device}, the data is on {mask.device}")
    zero = torch.zeros((), dtype=torch.float64, device=w.device)
    w = torch.where(mask, w.double(), zero)
    return w / torch.where(w > 0, w, zero).sum(dim=1, keepdim=True)


# What ``input_checks`` looks for, in order, with the roles of the inputs in braces (named by the caller:
# ``LOSS_NAMES``, or a cost matrix's); ``raise_input_errors`` raises the first that holds. {index} is the
# first batch index concerned.
INPUT_ERRORS = (
    "{mask_x} must hold only 0 and 1 (1 = token, 0 = padding)",
    "{mask_y} must hold only 0 and 1 (1 = token, 0 = padding)",
    "{mask_x}: pair at batch index {index} has no valid token",
    "{mask_y}: pair at batch index {index} has no valid token",
    "{x} contains NaN values",
    "{x} contains inf values",
    "{y} contains NaN values",
    "{y} contains inf values",
    "{x}: a valid token of the pair at batch index {index} is the zero vector, whose cosine is undefined",
    "{y}: a valid token of the pair at batch index {index} is the zero vector, whose cosine is undefined",
    "{weights_x} contains NaN values",
    "{weights_x} contains inf values",
    "{weights_x} has negative weights",
    "{weights_x}: pair at batch index {index} has zero total weight",
    "{weights_y} contains NaN values",
    "{weights_y} contains inf values",
    "{weights_y} has negative weights",
    "{weights_y}: pair at batch index {index} has zero total weight",
)
_PER_PAIR = tuple(k for k, message in enumerate(INPUT_ERRORS) if "{index}" in message)
LOSS_NAMES = dict(mask_x="mask_x", mask_y="mask_y", x="x", y="y", weights_x="weights_x", weights_y="weights_y")


def input_checks(x: torch.Tensor, y: torch.Tensor | None, mask_x: torch.Tensor, mask_y: torch.Tensor,
                 raw_x: torch.Tensor | None, raw_y: torch.Tensor | None, weights_x: torch.Tensor | None,
                 weights_y: torch.Tensor | None, cosine: bool = False) -> torch.Tensor:
    """int64 ``[len(INPUT_ERRORS)]`` on the data's device: for each error, the first batch index where it holds
    (0 for the errors of a whole tensor), -1 where it does not. Computed with device ops only: no host read
    (the loss's custom op reads it when it runs, ``raise_input_errors``).

    Args:
        x: ``[B, N, D]`` points (or a ``[B, N, M]`` matrix already masked to 0 off its valid entries);
            y: ``[B, M, D]`` or None; mask_x, mask_y: bool masks; raw_x, raw_y: the integer masks to check
            for values other than 0 and 1 (``as_mask``), or None; weights_x, weights_y: ``[B, N]``,
            ``[B, M]`` raw weights or None; cosine: whether the cost is "cosine", which a zero vector among
            the valid points x, y has no value of.
    """
    def mask_values(raw):
        return None if raw is None else ((raw != 0) & (raw != 1)).flatten()

    def peaks(t):  # each point's largest |entry| (amax, amin propagate NaN and cannot overflow), once per tensor
        if t is None:
            return None
        t = t.detach()
        # no |t| temporary of the points' size: allocated and freed in every call, it cost more than the reductions
        return torch.maximum(t.amax(dim=-1), -t.amin(dim=-1)) if t.dim() == 3 else t.abs()

    def rows(peak, mask):  # NaN / inf anywhere in a valid row
        if peak is None:
            return None, None
        return (torch.isnan(peak) & mask).flatten(), (torch.isinf(peak) & mask).flatten()

    def zero_vectors(peak, mask):  # a pair with a valid point of all zeros
        return ((peak == 0) & mask).any(dim=1) if cosine else None

    def weight_checks(w, mask):
        if w is None:
            return [None] * 4
        total = torch.where(mask, w.detach().double(), torch.zeros((), dtype=torch.float64, device=w.device)).sum(1)
        return [*rows(peaks(w), mask), ((w.detach() < 0) & mask).flatten(), total <= 0]

    peak_x, peak_y = peaks(x), peaks(y)
    flags = [mask_values(raw_x), mask_values(raw_y), ~mask_x.any(dim=1), ~mask_y.any(dim=1), *rows(peak_x, mask_x),
             *rows(peak_y, mask_y), zero_vectors(peak_x, mask_x), zero_vectors(peak_y, mask_y),
             *weight_checks(weights_x, mask_x), *weight_checks(weights_y, mask_y)]
    none = torch.full((), -1, dtype=torch.int64, device=x.device)
    out = []
    for k, bad in enumerate(flags):
        if bad is None:
            out.append(none)
        else:
            where = bad.to(torch.int8).argmax() if k in _PER_PAIR else torch.zeros_like(none)
            out.append(torch.where(bad.any(), where, none))
    return torch.stack(out)


def raise_input_errors(codes: torch.Tensor, names: dict[str, str] = LOSS_NAMES) -> None:
    """Raise ``ValueError`` with the first message of ``INPUT_ERRORS`` whose code is >= 0 (one host read)."""
    for code, message in zip(codes.tolist(), INPUT_ERRORS):
        if code >= 0:
            raise ValueError(message.format(index=code, **names))


def as_matrix_batch(name: str, t: torch.Tensor, mask_a: torch.Tensor | None, mask_b: torch.Tensor | None,
                    a: torch.Tensor | None = None, b: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Validate a ``[B, N, M]`` (or unbatched ``[N, M]``) matrix batch such as a cost or a plan, with masks and
    the values of the row and column weights ``a``, ``b`` when given (their shapes are ``as_weights``').

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
    ma, raw_a = as_mask("mask_a", lift(mask_a, unbatched), (B, N), t3.device, unbatched)
    mb, raw_b = as_mask("mask_b", lift(mask_b, unbatched), (B, M), t3.device, unbatched)
    valid = ma.unsqueeze(2) & mb.unsqueeze(1)
    entries = torch.where(valid, t3.detach(), torch.zeros((), dtype=t3.dtype, device=t3.device))
    for weight_name, w in (("a", a), ("b", b)):
        if w is not None:
            check_float_tensor(weight_name, w)
    a, b = (None if w is None or tuple(w.shape) != tuple(m.shape) else w
            for w, m in ((lift(a, unbatched), ma), (lift(b, unbatched), mb)))
    raise_input_errors(input_checks(entries, None, ma, mb, raw_a, raw_b, a, b),
                       dict(LOSS_NAMES, mask_x="mask_a", mask_y="mask_b", x=name, weights_x="a", weights_y="b"))
    return t3, ma, mb, unbatched


def lift(t, unbatched: bool):
    """Add the batch axis to an optional per-pair tensor (or nested lists, which ``as_mask`` converts on the
    data's device) of an unbatched call."""
    if not unbatched or t is None:
        return t
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else [t]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
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
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
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
