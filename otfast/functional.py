"""The public functional API: ``sinkhorn`` on cost matrices and ``sinkhorn_loss`` on embeddings."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from . import _checks as chk
from .backends import check_name as check_backend_name
from .backends import resolve
from .reference import COSTS
from .ops import dual_value, schedule_of, sinkhorn_loss_op
from .schedule import Schedule, epsilon_schedule, unconverged
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class SinkhornResult:
    """The solution of a batch of entropic OT problems (``otfast.sinkhorn``).

    Attributes:
        f: ``[B, N]`` dual potential on the rows (0 on padding), in the cost's dtype (float32 for
            float16/bfloat16 costs). The solver keeps them in float64; ``plan()`` uses those.
        g: ``[B, M]`` dual potential on the columns (0 on padding), likewise.
        value: ``[B]`` entropic OT value OT_eps = <P, C> + eps KL(P || a x b) (plus the marginal
            penalties when unbalanced), from the duals. Differentiable with respect to the cost
            (gradient: the plan, envelope theorem).
        n_iters: ``[B]`` updates run per pair.
        marginal_error: ``[B]`` L1 marginal error (rows plus columns) of the last iterate; a
            fixed-point residual when unbalanced.
        cost_matrix: ``[B, N, M]`` the cost (0 on padding), detached; log_a ``[B, N]``, log_b ``[B, M]``:
            the log-weights in float64 (-inf on padding); eps: the temperature.

    Unbatched calls (a ``[N, M]`` cost) drop the leading batch axis everywhere.
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iters: torch.Tensor
    marginal_error: torch.Tensor
    cost_matrix: torch.Tensor
    log_a: torch.Tensor
    log_b: torch.Tensor
    eps: float
    f64: torch.Tensor = field(repr=False)
    g64: torch.Tensor = field(repr=False)

    def plan(self) -> torch.Tensor:
        """The transport plan P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), ``[B, N, M]``, 0 on padding.

        Example:
            >>> res = otfast.sinkhorn(torch.rand(5, 7), eps=0.1)
            >>> res.plan().sum()  # ~1
        """
        f, g = self.f64.unsqueeze(-1), self.g64.unsqueeze(-2)
        logp = self.log_a.unsqueeze(-1) + self.log_b.unsqueeze(-2) + (f + g - self.cost_matrix) / self.eps
        return torch.exp(logp).to(self.cost_matrix.dtype)

    @property
    def cost(self) -> torch.Tensor:
        """Deprecated name of ``cost_matrix``."""
        warnings.warn("SinkhornResult.cost is deprecated; use SinkhornResult.cost_matrix", FutureWarning,
                      stacklevel=2)
        return self.cost_matrix


def _renamed(old: str, old_value, new: str, new_value):
    """The value of a renamed argument: the new one, or the old one with a FutureWarning."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"give {new} only ({old} is its deprecated name)")
    warnings.warn(f"the argument {old}= is deprecated; use {new}=", FutureWarning, stacklevel=3)
    return old_value


def _warn_unconverged(flags: torch.Tensor, schedule: Schedule, what: str) -> None:
    """One RuntimeWarning naming how many pairs ran every update without reaching ``tol``, and how many
    updates that was."""
    n_bad = int(flags.sum())
    if n_bad:
        steps = len(schedule.anneal)
        ran = f"{steps} annealing steps + n_iters={schedule.n_iters}" if steps else f"n_iters={schedule.n_iters}"
        warnings.warn(f"{what}: {n_bad} of {flags.numel()} pairs did not reach tol={schedule.tol} within "
                      f"{steps + schedule.n_iters} updates ({ran}); raise n_iters or tol", RuntimeWarning,
                      stacklevel=3)


def sinkhorn(cost_matrix: torch.Tensor | None = None, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
             *, mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None, eps: float,
             n_iters: int = 100, tol: float | None = None, rho: float | None = None,
             scaling: float | None = None, backend: str = "auto", cost: torch.Tensor | None = None
             ) -> SinkhornResult:
    """Solve a batch of entropic OT problems on precomputed costs, in the log domain.

    Args:
        cost_matrix: ``[B, N, M]`` (or ``[N, M]``) cost matrices.
        a: ``[B, N]`` non-negative row weights, normalised over the unmasked entries (default uniform).
        b: ``[B, M]`` column weights, likewise.
        mask_a: ``[B, N]`` bool or int, 1 = token, 0 = padding (a Hugging Face ``attention_mask``).
        mask_b: ``[B, M]``, likewise.
        eps: entropic temperature (> 0).
        n_iters: Sinkhorn updates at the final eps (after the annealing steps when ``scaling`` is set).
        tol: stop a pair once its marginal error is <= tol; pairs that never get there are reported
            with a ``RuntimeWarning``.
        rho: KL penalty on the marginals (unbalanced OT, POT's ``reg_m``); None = balanced.
        scaling: eps-annealing factor in (0, 1): temperatures go from the largest cost down to eps,
            multiplied by ``scaling`` at each step; None = fixed eps.
        backend: "auto", "torch", "triton" or "cpu" (see ``otfast.backends()``).
        cost: deprecated name of ``cost_matrix`` (``cost`` names the cost function in ``sinkhorn_loss``).

    Returns:
        ``SinkhornResult`` with potentials, values, iteration counts, errors and ``plan()``.

    Example:
        >>> C = torch.rand(4, 7, 9)
        >>> res = otfast.sinkhorn(C, eps=0.05, tol=1e-6)
        >>> res.plan().shape
        torch.Size([4, 7, 9])
    """
    cost_matrix = _renamed("cost", cost, "cost_matrix", cost_matrix)
    if cost_matrix is None:
        raise TypeError("sinkhorn() needs the cost_matrix")
    chk.check_same_device(cost_matrix=cost_matrix, a=a, b=b)
    C, ma, mb, unbatched = chk.as_matrix_batch("cost_matrix", cost_matrix, mask_a, mask_b, a, b)
    chk.check_positive("eps", eps)
    chk.check_temperature("eps", eps)
    chk.check_positive("rho", rho, allow_none=True)
    if n_iters is None:
        raise ValueError("n_iters must be an integer >= 0, got None")
    chk.check_iterations(n_iters, tol)
    chk.check_scaling(scaling)
    eps, rho, tol, scaling = (chk.as_float(v) for v in (eps, rho, tol, scaling))
    n_iters = int(n_iters)
    valid = ma.unsqueeze(2) & mb.unsqueeze(1)
    dtype = chk.compute_dtype(C.dtype)
    wa = chk.as_weights("a", chk.lift(a, unbatched), ma, unbatched).detach()
    wb = chk.as_weights("b", chk.lift(b, unbatched), mb, unbatched).detach()
    Cm = torch.where(valid, C.to(dtype), torch.zeros((), dtype=dtype, device=C.device))
    Cw = Cm.detach()

    anneal: tuple[float, ...] = ()
    if scaling is not None:
        start = max(float(Cw[valid].max()), eps)
        anneal = epsilon_schedule(start, eps, scaling, p=1.0)
    schedule = Schedule(eps=eps, anneal=anneal, n_iters=n_iters, tol=tol, rho=rho)

    log_a, log_b = torch.log(wa), torch.log(wb)
    pots = resolve(backend, C.device).solve(Cw, log_a, log_b, schedule)
    _warn_unconverged(unconverged(pots.n_iters, pots.error, schedule), schedule, "sinkhorn")
    value = dual_value(wa, pots.f, eps, rho) + dual_value(wb, pots.g, eps, rho)
    exact = [pots.f.double(), pots.g.double()]
    fields = [pots.f.to(dtype), pots.g.to(dtype), value.to(dtype), pots.n_iters, pots.error.to(dtype), Cw, log_a,
              log_b]
    if cost_matrix.requires_grad:
        plan = SinkhornResult(*fields, eps, *exact).plan()
        fields[2] = fields[2] + (plan * (Cm - Cw)).sum((1, 2))
    if unbatched:
        fields, exact = [t[0] for t in fields], [t[0] for t in exact]
    return SinkhornResult(*fields, eps, *exact)


def check_loss_options(*, cost: str, blur: float, eps: float | None, scaling: float | None, n_iters: int | None,
                       tol: float | None, reach: float | None, diameter: float | None, reduction: str,
                       backend: str) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the first bad option of ``sinkhorn_loss`` (``SinkhornLoss``
    checks its options with it when it is built)."""
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose one of {', '.join(COSTS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    check_backend_name(backend)
    chk.check_positive("blur", blur)
    chk.check_positive("eps", eps, allow_none=True)
    chk.check_positive("reach", reach, allow_none=True)
    chk.check_positive("diameter", diameter, allow_none=True)
    for name, length in (("blur", blur), ("reach", reach), ("diameter", diameter)):
        chk.check_squarable(name, length)
    chk.check_temperature("eps" if eps is not None else "eps = blur^2", eps if eps is not None else float(blur) ** 2)
    chk.check_iterations(n_iters, tol)
    chk.check_scaling(scaling)


def sinkhorn_loss(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor | None = None,
                  mask_y: torch.Tensor | None = None, *, cost: str = "sqeuclidean", blur: float = 0.05,
                  eps: float | None = None, scaling: float | None = 0.5, n_iters: int | None = None,
                  tol: float | None = None, debias: bool = True, reach: float | None = None,
                  diameter: float | None = None, weights_x: torch.Tensor | None = None,
                  weights_y: torch.Tensor | None = None, reduction: str = "mean",
                  backend: str = "auto", check_inputs: bool = True) -> torch.Tensor:
    """Sinkhorn loss between batches of token embeddings, with GeomLoss's semantics.

    With the defaults this is GeomLoss's ``SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5)``, the
    loss of Alqahtani et al. (2021): the debiased Sinkhorn divergence
    S = OT(a, b) - 1/2 OT(a, a) - 1/2 OT(b, b), OT_eps(a, b) = min_P <P, C> + eps KL(P || a x b).

    Args:
        x: ``[B, N, D]`` (or ``[N, D]``) source embeddings; y: ``[B, M, D]`` target embeddings.
        mask_x: ``[B, N]`` bool or int, 1 = token (a Hugging Face ``attention_mask``); mask_y: ``[B, M]``.
        cost: "sqeuclidean" (C = |x - y|^2 / 2) or "cosine" (C = 1 - cos(x, y)).
        blur: eps = blur^2 unless ``eps`` is given.
        eps: the final temperature, overriding ``blur``.
        scaling: eps-annealing factor (GeomLoss's schedule from diameter^2 down to eps, one update per
            temperature); None = fixed eps for ``n_iters`` updates.
        n_iters: updates at the final eps (default 0 with ``scaling``, 100 without).
        tol: per-pair stop on the marginal error during those updates.
        debias: the Sinkhorn divergence (True) or the raw OT_eps (False).
        reach: unbalanced OT with rho = reach^2 (None: balanced).
        diameter: the annealing start (default: the bounding box diagonal of the batch's valid points).
        weights_x, weights_y: ``[B, N]`` / ``[B, M]`` non-negative weights (default uniform over tokens).
        reduction: "mean" or "sum" over pairs, or "none" for a ``[B]`` tensor.
        backend: "auto", "torch", "triton" or "cpu" (see ``otfast.backends()``).
        check_inputs: check the values of the inputs (masks of 0 and 1, no empty pair, no NaN/inf, weights
            that are non-negative with a positive total) and raise ``ValueError`` naming the problem. The
            check is computed on the device and read once when the loss runs; False skips it, for a step
            that must not wait for the device (CUDA graphs; ``torch.cuda.set_sync_debug_mode``). Shapes,
            dtypes and devices are always checked.

    Returns:
        The loss: a scalar, or ``[B]`` with ``reduction="none"``.

    Gradients flow to x, y and the weights by the envelope theorem: exact at convergence, no
    unrolling, memory independent of the iteration count, no double backward. The work runs in the custom
    op ``otfast::sinkhorn_loss`` (``otfast.ops``), so that ``torch.compile`` and CUDA graphs see one op.

    Example:
        >>> x, y = torch.randn(8, 12, 768, requires_grad=True), torch.randn(8, 15, 768)
        >>> loss = otfast.sinkhorn_loss(x, y, mask_x, mask_y)
        >>> loss.backward()
    """
    chk.check_points(x, y, mask_x, mask_y)
    check_loss_options(cost=cost, blur=blur, eps=eps, scaling=scaling, n_iters=n_iters, tol=tol, reach=reach,
                       diameter=diameter, reduction=reduction, backend=backend)
    blur, eps, scaling, tol, reach, diameter = (chk.as_float(v) for v in (blur, eps, scaling, tol, reach, diameter))
    n_iters = None if n_iters is None else int(n_iters)
    unbatched = x.dim() == 2
    if unbatched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        mask_x, mask_y, weights_x, weights_y = (chk.lift(t, True) for t in (mask_x, mask_y, weights_x, weights_y))
    (B, N, _), M = x.shape, y.shape[1]
    mx, raw_x = chk.as_mask("mask_x", mask_x, (B, N), x.device, unbatched)
    my, raw_y = chk.as_mask("mask_y", mask_y, (B, M), y.device, unbatched)
    dtype = chk.compute_dtype(x.dtype)
    a = chk.as_weights("weights_x", weights_x, mx, unbatched)
    b = chk.as_weights("weights_y", weights_y, my, unbatched)
    checks = (chk.input_checks(x, y, mx, my, raw_x, raw_y, weights_x, weights_y, cosine=cost == "cosine")
              if check_inputs else None)
    x, y = x.to(dtype), y.to(dtype)

    eps_final = blur**2 if eps is None else eps
    blur_final = math.sqrt(eps_final)
    start = None  # with scaling and no diameter, the op finds the bounding diameter (``ops.annealing_start``)
    if scaling is not None and diameter is not None:
        start = torch.full((), max(diameter, blur_final), dtype=torch.float64, device=x.device)
    if n_iters is None:
        n_iters = 0 if scaling is not None else 100
    rho = None if reach is None else reach**2

    value, flags, found, *_ = sinkhorn_loss_op(x, y, a, b, mx, my, start, checks, eps_final, blur_final, scaling,
                                               n_iters, tol, rho, debias, cost, backend)
    if tol is not None and not torch.compiler.is_compiling() and x.device.type != "meta":
        start = found.detach() if start is None else start
        schedule = schedule_of(eps_final, start, blur_final, scaling, n_iters, tol, rho).on_host()
        for problem_flags, what in zip(flags, ("OT(x, y)", "OT(x, x)", "OT(y, y)")):
            _warn_unconverged(problem_flags, schedule, f"sinkhorn_loss {what}")
    if unbatched:
        return value[0]
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    return value
