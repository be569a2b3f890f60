"""The loss as ``torch.library`` custom ops: ``otfast::sinkhorn_loss`` and its backward.

``sinkhorn_loss`` calls these (with weights a, b float64, normalised: ``otfast._checks.as_weights``), so that
``torch.compile(fullgraph=True)`` sees one opaque op (with fake implementations for shapes, and the envelope-theorem
backward registered as its autograd formula) instead of the backends' Python, and a CUDA graph can capture it (the
Triton path neither reads a device value on the host nor allocates host data once warmed up). The ops take only
tensors and plain values:

- ``sinkhorn_loss(x, y, a, b, mask_x, mask_y, diameter, input_checks, eps, blur, scaling, n_iters, tol, rho,
  debias, cost, backend)`` -> ``(value [B], flags [P, B], start, alpha [B, N], beta [B, M], f_xy [B, N],
  g_xy [B, M], f_prev_xy, g_prev_xy, f_xx [B, N], f_prev_xx, f_yy [B, M], f_prev_yy)``: the log-weights and
  potentials float64, the OT(x, x) / OT(y, y) potentials empty unless ``debias``; ``flags`` the pairs that did
  not reach ``tol`` in each of the P problems; ``start`` the annealing start the op found (0-d float64,
  ``annealing_start``), empty unless it found one. The log-weights are outputs so that the backward reads them
  instead of forming them again.
- ``sinkhorn_loss_backward(grad_value, x, y, a, b, alpha, beta, the eight potentials, eps, rho, debias, cost,
  backend, weight_grads)`` -> ``(dx, dy, da, db)``; ``da``, ``db`` empty unless ``weight_grads`` (the
  uniform weights of masks need none: 12 launches fewer per backward).

With ``scaling`` (and ``blur``), ``diameter`` (0-d float64) is the annealing start, or None for the bounding
diameter of the valid points (``mask_x``, ``mask_y``; found inside the op, where the Triton backend takes it
in one launch); no ``scaling`` is a fixed eps. ``input_checks`` (``otfast._checks.input_checks``) is what the
implementation reads to raise on bad input values, or None to skip that (the one host read such a check needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as chk
from .backends import resolve
from .reference import Potentials
from .schedule import Annealing, Schedule, bounding_diameter, phi, phi_prime, unconverged

_EMPTY = 0  # the shape of the OT(x, x) / OT(y, y) outputs when not debiased


def schedule_of(eps: float, diameter: Tensor | None, blur: float, scaling: float | None, n_iters: int,
                tol: float | None, rho: float | None) -> Schedule:
    """The ``Schedule`` the ops' arguments describe."""
    anneal = () if scaling is None else Annealing(diameter, blur, scaling)
    return Schedule(eps=eps, anneal=anneal, n_iters=n_iters, tol=tol, rho=rho)


def annealing_start(mod, x: Tensor, y: Tensor, mask_x: Tensor, mask_y: Tensor, cost: str, blur: float) -> Tensor:
    """The default annealing start (0-d float64): the bounding-box diagonal of the batch's valid points (unit
    vectors for "cosine"), at least ``blur``; from the backend's ``bounding_diameter`` where it has one (the
    Triton backend: one kernel and a few reductions, where the reference takes 17 torch launches)."""
    if cost == "cosine":
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return getattr(mod, "bounding_diameter", bounding_diameter)(x, y, mask_x, mask_y).clamp_min(blur)


def dual_value(w: Tensor, f: Tensor, eps: float, rho: float | None, f_self: Tensor | None = None) -> Tensor:
    """``[B]`` sum_i w_i phi(f_i), in float64 (the potentials' precision); with ``f_self``, sum_i w_i (phi(f_i) -
    phi(f_self_i)): a debiased loss's terms on one side, in one sum."""
    terms = phi(f.double(), eps, rho)
    if f_self is not None:
        terms = terms - phi(f_self.double(), eps, rho)
    return (w.double() * terms).sum(1)


@torch.library.custom_op("otfast::sinkhorn_loss", mutates_args=())
def sinkhorn_loss_op(x: Tensor, y: Tensor, a: Tensor, b: Tensor, mask_x: Tensor, mask_y: Tensor,
                     diameter: Tensor | None, input_checks: Tensor | None, eps: float, blur: float,
                     scaling: float | None, n_iters: int, tol: float | None, rho: float | None, debias: bool,
                     cost: str, backend: str
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                Tensor, Tensor]:
    if input_checks is not None:
        chk.raise_input_errors(input_checks)
    mod = resolve(backend, x.device)
    found = scaling is not None and diameter is None
    start = annealing_start(mod, x, y, mask_x, mask_y, cost, blur) if found else diameter
    schedule = schedule_of(eps, start, blur, scaling, n_iters, tol, rho)
    if not _runs_on_device(mod):
        schedule = schedule.on_host()
    alpha, beta = torch.log(a), torch.log(b)  # -inf on padding; the backward reads them (outputs)
    problems = _solve(mod, x, y, alpha, beta, schedule, debias, cost)
    xy = problems[0]
    if debias:
        xx, yy = problems[1:]
        value = dual_value(a, xy.f, eps, rho, xx.f) + dual_value(b, xy.g, eps, rho, yy.f)
        sym = [xx.f, xx.f_prev, yy.f, yy.f_prev]
    else:  # four distinct empty tensors: a custom op's outputs must not alias each other
        value = dual_value(a, xy.f, eps, rho) + dual_value(b, xy.g, eps, rho)
        sym = [x.new_empty(_EMPTY, dtype=torch.float64) for _ in range(4)]
    if schedule.tol is None:  # nothing can fail to converge: one fill instead of one per problem and a stack
        flags = torch.zeros((len(problems), x.shape[0]), dtype=torch.bool, device=x.device)
    else:
        flags = torch.stack([unconverged(p.n_iters, p.error, schedule) for p in problems])
    start = start if found else x.new_empty(_EMPTY, dtype=torch.float64)
    # contiguous, as the fake says: log-weights take the strides of the weights, and the masks' may be any
    return (value.to(x.dtype), flags, start, *(t.double().contiguous() for t in (alpha, beta, *xy[:4], *sym)))


def _solve(mod, x: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, schedule: Schedule, debias: bool,
           cost: str) -> list[Potentials]:
    """``[OT(x, y)]``, and OT(x, x), OT(y, y) when ``debias``: in one call where the backend solves the
    problems together (``solve_problems``, the Triton backend: one launch), else one ``solve_points`` each."""
    if hasattr(mod, "solve_problems"):
        return mod.solve_problems(x, y, alpha, beta, schedule, debias, cost)
    problems = [mod.solve_points(x, y, alpha, beta, schedule, False, cost)]
    if debias:
        problems += [mod.solve_points(x, x, alpha, alpha, schedule, True, cost),
                     mod.solve_points(y, y, beta, beta, schedule, True, cost)]
    return problems


def _grad(mod, x: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, pots: list[Potentials], eps: float,
          weights: list[Tensor], cost: str) -> list[Tensor]:
    """``[dx, dy]`` of the problems ``pots`` (as ``_solve`` returns them) for upstream weights u, v of
    OT(x, y), then u of OT(x, x) and of OT(y, y) when debiased: in one call where the backend has
    ``grad_problems``, else one ``grad_points`` per problem."""
    if hasattr(mod, "grad_problems"):
        return mod.grad_problems(x, y, alpha, beta, pots, eps, weights, cost)
    (xy, *sym), (u, v, *u_sym) = pots, weights
    dx, dy = mod.grad_points(x, y, alpha, beta, xy, eps, u, v, cost)
    if sym:
        dx = dx - mod.grad_points(x, x, alpha, alpha, sym[0], eps, u_sym[0], None, cost)[0]
        dy = dy - mod.grad_points(y, y, beta, beta, sym[1], eps, u_sym[1], None, cost)[0]
    return [dx, dy]


def _runs_on_device(mod) -> bool:
    """Whether a backend derives the annealing list on the device (``Annealing``); the others need floats."""
    return getattr(mod, "DEVICE_SCHEDULE", False)


@sinkhorn_loss_op.register_fake
def _(x, y, a, b, mask_x, mask_y, diameter, input_checks, eps, blur, scaling, n_iters, tol, rho, debias, cost,
      backend):
    (B, N, _), M = x.shape, y.shape[1]
    f64 = dict(dtype=torch.float64, device=x.device)
    problems = 3 if debias else 1
    sym = [(B, N), (B, N), (B, M), (B, M)] if debias else [(_EMPTY,)] * 4
    start = () if scaling is not None and diameter is None else (_EMPTY,)
    return (x.new_empty(B), torch.empty(problems, B, dtype=torch.bool, device=x.device), torch.empty(start, **f64),
            *(torch.empty(s, **f64) for s in ((B, N), (B, M), (B, N), (B, M), (B, N), (B, M))),
            *(torch.empty(s, **f64) for s in sym))


@torch.library.custom_op("otfast::sinkhorn_loss_backward", mutates_args=())
def sinkhorn_loss_backward_op(grad_value: Tensor, x: Tensor, y: Tensor, a: Tensor, b: Tensor, alpha: Tensor,
                              beta: Tensor, f_xy: Tensor, g_xy: Tensor, f_prev_xy: Tensor, g_prev_xy: Tensor,
                              f_xx: Tensor, f_prev_xx: Tensor, f_yy: Tensor, f_prev_yy: Tensor, eps: float,
                              rho: float | None, debias: bool, cost: str, backend: str, weight_grads: bool
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Envelope gradients through the final step (``otfast.reference`` states the formulas)."""
    mod = resolve(backend, x.device)
    gv = grad_value.unsqueeze(1)
    damping = Schedule(eps=eps, rho=rho).damping(eps)
    scale = gv if damping == 1.0 else gv * damping

    def upstream(w, f):  # dL/df * damping for the potential f of a problem, in the compute dtype
        u = w * scale
        return (u if rho is None else u * phi_prime(f, eps, rho)).to(x.dtype)

    pots = [Potentials(f_xy, g_xy, f_prev_xy, g_prev_xy, None, None)]
    weights = [upstream(a, f_xy), upstream(b, g_xy)]
    if debias:
        pots += [Potentials(f_xx, f_xx, f_prev_xx, f_prev_xx, None, None),
                 Potentials(f_yy, f_yy, f_prev_yy, f_prev_yy, None, None)]
        # balanced, the symmetric problems' upstream weights are OT(x, y)'s: the same tensors, not new ones
        weights += weights if rho is None else [upstream(a, f_xx), upstream(b, f_yy)]
    dx, dy = _grad(mod, x, y, alpha, beta, pots, eps, weights, cost)
    if not weight_grads:
        return dx, dy, a.new_empty(_EMPTY), b.new_empty(_EMPTY)
    grad_a, grad_b = phi(f_xy, eps, rho, grad=True), phi(g_xy, eps, rho, grad=True)
    if debias:
        grad_a = grad_a - phi(f_xx, eps, rho, grad=True)
        grad_b = grad_b - phi(f_yy, eps, rho, grad=True)
    grad_a = torch.where(a > 0, gv * grad_a.to(a.dtype), torch.zeros_like(a))
    grad_b = torch.where(b > 0, gv * grad_b.to(b.dtype), torch.zeros_like(b))
    return dx, dy, grad_a, grad_b


@sinkhorn_loss_backward_op.register_fake
def _(grad_value, x, y, a, b, alpha, beta, f_xy, g_xy, f_prev_xy, g_prev_xy, f_xx, f_prev_xx, f_yy, f_prev_yy, eps,
      rho, debias, cost, backend, weight_grads):
    if not weight_grads:
        return torch.empty_like(x), torch.empty_like(y), a.new_empty(_EMPTY), b.new_empty(_EMPTY)
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    x, y, a, b, _mx, _my, _diameter, _checks, eps, _blur, _scaling, _n_iters, _tol, rho, debias, cost, backend = inputs
    ctx.save_for_backward(x, y, a, b, *output[3:])
    ctx.options = (eps, rho, debias, cost, backend)
    # The potentials and flags are outputs nothing differentiates: their gradients stay None instead of
    # nine zero-filled tensors (launches) per backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_value, *_grad_others):
    grads = (None,) * 4  # only the potentials were differentiated, which the loss holds fixed
    if grad_value is not None:
        x, y, a, b, *saved = ctx.saved_tensors
        weight_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dx, dy, da, db = sinkhorn_loss_backward_op(grad_value, x, y, a, b, *saved, *ctx.options, weight_grads)
        grads = (dx, dy, da, db) if weight_grads else (dx, dy, None, None)
    return (*grads, *(None,) * 13)  # none for the masks, the diameter, the checks and the options


torch.library.register_autograd("otfast::sinkhorn_loss", _backward, setup_context=_setup_context)
