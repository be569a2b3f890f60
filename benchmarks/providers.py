"""Every implementation the benchmarks compare, as callables on the same inputs, and the value check.

A provider maps ``x [B, N, D]``, ``y [B, M, D]`` and a ``Setting`` to the per-pair loss values ``[B]``,
differentiable with respect to x and y. Before a provider is timed, its values (and, for
forward+backward, its gradients) are compared with the otfast torch reference (``otfast.sinkhorn_loss``
with ``backend="torch"``, float64 where that is cheap): a fast wrong answer is reported as wrong.

Settings (``SETTINGS``):

- ``fixed``: cosine cost 1 - cos(x, y), eps = 0.05, 100 updates at that eps, no debias: OT_eps(a, b).
- ``paper``: sqeuclidean cost |x - y|^2 / 2, blur 0.05 (eps = 0.0025), GeomLoss's eps-annealing with
  scaling 0.5 from the batch diameter, debiased: GeomLoss's ``SamplesLoss("sinkhorn")`` defaults, as
  Alqahtani et al. (2021) used them.

Providers (``providers()``), each named ``name[backend]``:

- ``otfast[<backend>]`` for every backend ``otfast.backends()`` reports available (triton only on CUDA
  tensors: the interpreter is a correctness tool, not a timing), ``otfast[triton-nosplit]``: the
  triton backend with ``OTFAST_TRITON_SPLIT=off`` (one program per long pair and problem, no row split), and
  ``otfast[triton-exact]``: the triton backend with every streamed exponent formed from the packed cost
  (``OTFAST_TRITON_STREAM=cost``: no absorbed cost stored or read, so the difference to ``otfast[triton]``
  is what the absorbed cost buys, side by side, where the row split, which never reads it, does not apply), and
  ``otfast[triton-tile32]``: the triton backend with ``OTFAST_TRITON_RESIDENT=32`` (pairs of 33 to 64 tokens
  streamed, as under triton 3.6, where otfast[triton] holds them in the 64 tile; run only at those lengths and
  where the installed triton ships the 64 tile: elsewhere it is otfast[triton] again).
- ``pot-solve_batch[torch]``: ``ot.solve_batch`` on POT's torch backend, ``method="log_sinkhorn"``,
  ``reg_type="kl"`` (so its value is OT_eps = <P, C> + eps KL(P || a x b)), on the detached cost, plus the
  envelope term <P, C - C.detach()>: POT's ``grad="envelope"``, bit for bit, without the autograd graph of every
  update that POT 0.9.7 keeps in that mode (before 2026-12-01 the benchmarks timed that mode as it is).
- ``pot-sinkhorn_log[loop]``: ``ot.bregman.sinkhorn_log`` pair by pair, autograd through its loop.
- ``geomloss[tensorized]`` / ``geomloss[online]`` (the latter needs pykeops): ``SamplesLoss`` for the
  paper setting; for the fixed setting, whose iteration count ``SamplesLoss`` cannot express, GeomLoss's
  own ``sinkhorn_loop`` on a constant temperature list.
- ``flash-sinkhorn[triton]``: ``flash_sinkhorn.SamplesLoss`` (CUDA tensors only), its default block
  configuration (``autotune=False``: autotuning tries every configuration at each new shape) and its default
  ``allow_tf32=True``, so it computes at TF32 where the others compute at fp32 (its gradient differed from the
  reference by 2.7e-3 on the H200, 2026-12-01, ``benchmarks/results/h200-2026-12-01.csv``, within the check's
  tolerance).
- ``torch-unrolled[autograd]``: the batched log-domain loop a user writes by hand (GeomLoss's symmetric
  update, Feydy 2020 Alg. 3.5), autograd through every iteration.

POT has no eps-annealing, so it cannot compute the paper setting's loss: its providers are skipped
there with that reason. (Plain Sinkhorn at eps = 0.0025 on these costs is far from converged after 5000
updates, and its value differs from the annealed loss by a few per cent.)

Gradients: otfast, GeomLoss, flash-sinkhorn and POT's solve_batch return the envelope
gradient; the unrolled providers return the exact derivative of their computed value. The two agree at
convergence (the fixed setting), not after an annealing schedule that runs one update per temperature:
there the gradients of the unrolled providers are reported but not checked.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

import otfast
from otfast.kernels.triton.configs import RESIDENT_MAX
from otfast.schedule import bounding_diameter, epsilon_schedule

# POT loads every array library it finds, and JAX takes 75% of the GPU's memory at its first array (on an H200
# with JAX installed, the benchmarks were left 9 GiB): the providers use POT's torch backend alone.
POT_BACKENDS_OFF = ("POT_BACKEND_DISABLE_JAX", "POT_BACKEND_DISABLE_CUPY", "POT_BACKEND_DISABLE_TENSORFLOW")
for _key in POT_BACKENDS_OFF:
    os.environ.setdefault(_key, "1")

Values = Callable[[torch.Tensor, torch.Tensor, "Setting"], torch.Tensor]


@dataclass(frozen=True)
class Setting:
    """One loss definition that every provider computes.

    Attributes:
        name: "fixed" or "paper".
        cost: "cosine" (1 - cos(x, y)) or "sqeuclidean" (|x - y|^2 / 2).
        eps: the final temperature.
        scaling: GeomLoss's eps-annealing factor, or None for a fixed eps.
        n_iters: updates at the final eps (after the annealing steps).
        debias: the Sinkhorn divergence S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 instead of OT(a, b).
    """

    name: str
    cost: str
    eps: float
    scaling: float | None
    n_iters: int
    debias: bool

    def otfast_kwargs(self) -> dict:
        """Keyword arguments of ``otfast.sinkhorn_loss`` for this setting."""
        return dict(cost=self.cost, eps=self.eps, scaling=self.scaling, n_iters=self.n_iters, debias=self.debias)

    def points(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The points whose sqeuclidean cost |x - y|^2 / 2 is this setting's cost (unit rows for cosine)."""
        if self.cost == "cosine":
            return F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        return x, y

    def eps_list(self, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Temperatures of the updates between GeomLoss's initialisation and its final extrapolation.

        Fixed: ``[eps] * n_iters``. Annealed: ``otfast.schedule.epsilon_schedule`` from the bounding-box
        diagonal of all points of the batch (GeomLoss's ``scaling_parameters``), then ``n_iters`` at eps.
        """
        if self.scaling is None:
            return [self.eps] * self.n_iters
        xs, ys = self.points(x.detach(), y.detach())
        ones_x = torch.ones(xs.shape[:2], dtype=torch.bool, device=xs.device)
        ones_y = torch.ones(ys.shape[:2], dtype=torch.bool, device=ys.device)
        blur = math.sqrt(self.eps)
        diameter = max(bounding_diameter(xs, ys, ones_x, ones_y), blur)
        return [*epsilon_schedule(diameter, blur, self.scaling, p=2.0), *([self.eps] * self.n_iters)]

    def exponentials(self, B: int, N: int, M: int, n_updates: int, backward: bool) -> int:
        """Exponentials the algorithm needs at least (the numerator of the throughput floor).

        Counting: one soft-min pass over an N x M cost is N M exponentials. Each update of OT(a, b) runs a
        row and a column pass (2 N M); each update of a symmetric problem OT(a, a) / OT(b, b) runs one
        pass (N^2, M^2). ``n_updates`` counts the initialisation, every update and the final
        extrapolation (``len(eps_list) + 2``). The envelope backward recomputes each plan once: 2 N M,
        plus N^2 + M^2 when debiased.
        """
        per_update = 2 * N * M + (N * N + M * M if self.debias else 0)
        total = n_updates * per_update
        if backward:
            total += per_update
        return B * total


SETTINGS = {
    "fixed": Setting("fixed", cost="cosine", eps=0.05, scaling=None, n_iters=100, debias=False),
    "paper": Setting("paper", cost="sqeuclidean", eps=0.05**2, scaling=0.5, n_iters=0, debias=True),
}


def make_inputs(B: int, N: int, M: int, D: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch shaped like contextual token embeddings of parallel sentences.

    Every token shares an offset of norm 10 (the anisotropy of BERT-like encoders); source tokens spread
    around it (half squared distances about 20, "costs in the tens" as with mBERT's last layer), and each
    target token is a noisy copy of a random source token, so the optimal plan has structure.

    Args:
        B, N, M, D: pairs, source tokens, target tokens, features.
        dtype, device: of the returned tensors (drawn in float64 on CPU, so every device sees the same data).
        seed: the random seed.

    Returns:
        ``x [B, N, D]``, ``y [B, M, D]``.
    """
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(D, generator=gen, dtype=torch.float64) * (10.0 / math.sqrt(D))
    words = torch.randn(B, N, D, generator=gen, dtype=torch.float64) * 0.16
    index = torch.randint(0, N, (B, M, 1), generator=gen).expand(B, M, D)
    noise = torch.randn(B, M, D, generator=gen, dtype=torch.float64) * 0.08
    x = offset + words
    y = offset + words.gather(1, index) + noise
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    Attributes:
        name: the library or approach ("otfast", "pot-solve_batch", ...).
        backend: which of its code paths ("torch", "tensorized", ...).
        values: ``(x [B, N, D], y [B, M, D], setting) -> [B]`` per-pair loss values.
        devices: device types it runs on.
        unavailable: why it cannot run here, or None.
        memory: ``(B, N, M, D, setting, element_size, backward) -> bytes``, a rough peak estimate used to
            skip points that would not fit.
        gradient: "envelope" or "unrolled" (autograd through the iterations).
        sizes: ``(N, M) -> why it does not run at those lengths``, or None where it runs at every length.
    """

    name: str
    backend: str
    values: Values
    devices: tuple[str, ...]
    unavailable: str | None
    memory: Callable[[int, int, int, int, Setting, int, bool], float]
    gradient: str = "envelope"
    sizes: Callable[[int, int], str | None] | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.backend}]"

    def skip_reason(self, device: str, setting: Setting) -> str | None:
        """Why this provider does not run on ``device`` for ``setting``, or None."""
        if self.unavailable:
            return self.unavailable
        if device not in self.devices:
            return f"runs on {'/'.join(self.devices)} only"
        if self.name.startswith("pot-") and setting.scaling is not None:
            return "POT has no eps-annealing: it cannot compute the annealed (paper) loss"
        if self.name == "geomloss" and self.backend == "online" and setting.scaling is None:
            return "a fixed iteration count needs GeomLoss's internal online loop; only SamplesLoss is wired"
        return None


def _pairs(B: int, N: int, M: int, setting: Setting) -> int:
    """Cost entries of one problem set: N M, plus N^2 + M^2 when debiased, times B."""
    return B * (N * M + (N * N + M * M if setting.debias else 0))


def _dense(factor: float) -> Callable[..., float]:
    """Memory of an implementation that keeps ``factor`` [B, N, M]-sized buffers alive."""
    return lambda B, N, M, D, s, elt, bwd: factor * _pairs(B, N, M, s) * elt + 4 * B * (N + M) * D * elt


def _unrolled(per_update: float, forward: float) -> Callable[..., float]:
    """Memory of autograd through every update: ``per_update`` saved [B, N, M] buffers per update
    (an annealing schedule on these inputs has under 20 temperatures); ``forward`` buffers without grad."""
    def estimate(B, N, M, D, s, elt, bwd):
        updates = s.n_iters + 2 + (20 if s.scaling is not None else 0)
        factor = per_update * updates if bwd else forward
        return factor * _pairs(B, N, M, s) * elt + 4 * B * (N + M) * D * elt
    return estimate


def _streaming(B, N, M, D, s, elt, bwd) -> float:
    return 6 * B * (N + M) * D * elt + 8 * B * (N + M) * 4


def _buffered(per_entry: int, resident: int = RESIDENT_MAX) -> Callable[..., float]:
    """Memory of the triton backend: ``_streaming`` and, beyond ``resident`` tokens, its fp32 cost buffers
    (``per_entry`` bytes per cost entry: 12 with the absorbed cost, as "auto" takes them where they fit)."""
    def estimate(B, N, M, D, s, elt, bwd):
        streamed = max(N, M) > resident
        return _streaming(B, N, M, D, s, elt, bwd) + (per_entry * _pairs(B, N, M, s) if streamed else 0)
    return estimate


# ---------------------------------------------------------------- otfast

def _otfast(backend: str) -> Values:
    def values(x, y, setting):
        return otfast.sinkhorn_loss(x, y, reduction="none", backend=backend, **setting.otfast_kwargs())
    return values


def _otfast_nosplit(x, y, setting):
    """``otfast[triton]`` with ``OTFAST_TRITON_SPLIT=off`` (README, Triton backend): one program per long pair
    and problem, as before the row split was the default."""
    with mock.patch.dict(os.environ, OTFAST_TRITON_SPLIT="off"):
        return _otfast("triton")(x, y, setting)


def _otfast_exact(x, y, setting):
    """``otfast[triton]`` without the absorbed cost (README, Triton backend): every fast pass of the streaming
    kernel forms its exponents from the packed cost tiles."""
    with mock.patch.dict(os.environ, OTFAST_TRITON_STREAM="cost"):
        return _otfast("triton")(x, y, setting)


def _otfast_tile32(x, y, setting):
    """``otfast[triton]`` with ``OTFAST_TRITON_RESIDENT=32`` (README, Triton backend): pairs of 33 to 64 tokens
    stream instead of taking the resident 64 tile."""
    with mock.patch.dict(os.environ, OTFAST_TRITON_RESIDENT="32"):
        return _otfast("triton")(x, y, setting)


def _tile32_sizes(N: int, M: int) -> str | None:
    if RESIDENT_MAX < 64:
        return "the installed triton ships no 64 tile (it needs triton >= 3.7): the same kernels as otfast[triton]"
    if not 32 < max(N, M) <= 64:
        return "the same kernels as otfast[triton] (only pairs of 33 to 64 tokens take the 64 tile)"
    return None


# ---------------------------------------------------------------- POT

def _pot_cost(x: torch.Tensor, y: torch.Tensor, setting: Setting) -> torch.Tensor:
    """The setting's cost as a POT user builds it: ``ot.dist`` / ``dist_batch`` halved, or 1 - cos."""
    import ot

    if setting.cost == "cosine":
        xn, yn = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        return 1 - xn @ yn.transpose(-1, -2)
    if x.dim() == 3:
        return ot.batch.dist_batch(x, y, metric="sqeuclidean") / 2
    return ot.dist(x, y, metric="sqeuclidean") / 2


def _pot_solve_batch(x, y, setting):
    import ot

    def ot_value(u, v):
        # exactly n_iters updates: tol=0 never stops early. POT's grad="envelope" keeps the autograd graph of every
        # update (its loop detaches the cost only for "detach" and "last_step") and then detaches the plan, so the
        # solve runs on the detached cost and the envelope term T * (C - C.detach()) carries the gradient: the
        # same value and gradient, bit for bit, without the graph
        cost = _pot_cost(u, v, setting)
        res = ot.solve_batch(cost.detach(), reg=setting.eps, max_iter=setting.n_iters, tol=0.0,
                             method="log_sinkhorn", reg_type="kl", grad="detach")
        return res.value + (res.plan * (cost - cost.detach())).sum((1, 2))

    value = ot_value(x, y)
    if setting.debias:
        value = value - 0.5 * ot_value(x, x) - 0.5 * ot_value(y, y)
    return value


def _pot_pair_value(x: torch.Tensor, y: torch.Tensor, setting: Setting) -> torch.Tensor:
    """OT_eps = <P, C> + eps KL(P || a x b) of one pair from ``ot.bregman.sinkhorn_log``.

    POT's plan is P_ij = exp(u_i + v_j - C_ij / eps) (log-scalings u, v), so the value is
    eps sum_ij P_ij (u_i + v_j - log a_i - log b_j), finite even where P underflows to 0.
    """
    import ot

    C = _pot_cost(x, y, setting)
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=C.dtype, device=C.device)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=C.dtype, device=C.device)
    P, log = ot.bregman.sinkhorn_log(a, b, C, setting.eps, numItermax=setting.n_iters, stopThr=0.0, warn=False,
                                     log=True)
    log_ratio = (log["log_u"] - torch.log(a))[:, None] + (log["log_v"] - torch.log(b))[None, :]
    return setting.eps * (P * log_ratio).sum()


def _pot_sinkhorn_log_loop(x, y, setting):
    out = []
    for xb, yb in zip(x, y):
        value = _pot_pair_value(xb, yb, setting)
        if setting.debias:
            value = value - 0.5 * _pot_pair_value(xb, xb, setting) - 0.5 * _pot_pair_value(yb, yb, setting)
        out.append(value)
    return torch.stack(out)


# ---------------------------------------------------------------- GeomLoss

def _geomloss_internals():
    """GeomLoss's loop and tensorized soft-min (``geomloss._legacy`` since 0.3.1, top level before)."""
    for prefix in ("geomloss._legacy", "geomloss"):
        try:
            samples = importlib.import_module(f"{prefix}.sinkhorn_samples")
            divergence = importlib.import_module(f"{prefix}.sinkhorn_divergence")
        except ImportError:
            continue
        return samples, divergence
    raise ImportError("cannot find geomloss's sinkhorn_samples / sinkhorn_divergence modules")


def _geomloss(backend: str) -> Values:
    def values(x, y, setting):
        from geomloss import SamplesLoss

        xs, ys = setting.points(x, y)
        if setting.scaling is not None:
            loss = SamplesLoss("sinkhorn", p=2, blur=math.sqrt(setting.eps), scaling=setting.scaling,
                               debias=setting.debias, backend=backend)
            return loss(xs, ys)
        samples, divergence = _geomloss_internals()
        B, N, M = xs.shape[0], xs.shape[1], ys.shape[1]
        a = torch.full((B, N), 1.0 / N, dtype=xs.dtype, device=xs.device)
        b = torch.full((B, M), 1.0 / M, dtype=ys.dtype, device=ys.device)
        cost = samples.cost_routines[2]
        C_xx = cost(xs, xs.detach()) if setting.debias else None
        C_yy = cost(ys, ys.detach()) if setting.debias else None
        f_aa, g_bb, g_ab, f_ba = divergence.sinkhorn_loop(
            samples.softmin_tensorized, divergence.log_weights(a), divergence.log_weights(b), C_xx, C_yy,
            cost(xs, ys.detach()), cost(ys, xs.detach()), setting.eps_list(x, y), None, debias=setting.debias)
        return divergence.sinkhorn_cost(setting.eps, None, a, b, f_aa, g_bb, g_ab, f_ba, batch=True,
                                        debias=setting.debias)
    return values


# ---------------------------------------------------------------- flash-sinkhorn

def _flash_sinkhorn(x, y, setting):
    from flash_sinkhorn import SamplesLoss as FlashSamplesLoss

    xs, ys = setting.points(x, y)
    # autotune off: its first call would try every block configuration at every shape, minutes of a GPU lease
    common = dict(p=2, blur=math.sqrt(setting.eps), debias=setting.debias, half_cost=True, autotune=False)
    if setting.scaling is None:
        loss = FlashSamplesLoss("sinkhorn", use_epsilon_scaling=False, eps=setting.eps, n_iters=setting.n_iters,
                                **common)
    else:
        # flash-sinkhorn anneals each pair from its own diameter; pass the batch's, as GeomLoss uses.
        diameter = math.sqrt(setting.eps_list(x, y)[0])
        loss = FlashSamplesLoss("sinkhorn", scaling=setting.scaling, diameter=diameter, **common)
    return loss(xs, ys)


# ---------------------------------------------------------------- plain PyTorch

def _torch_unrolled(x, y, setting):
    """GeomLoss's symmetric log-domain loop written by hand, batched, autograd through every update."""
    xs, ys = setting.points(x, y)
    eps_list = setting.eps_list(x, y)
    eps0, eps_last = (eps_list[0], eps_list[-1]) if eps_list else (setting.eps, setting.eps)

    def cost(u, v):
        return torch.cdist(u, v).square() / 2

    def softmin(C, log_w, h, eps):
        return -eps * torch.logsumexp(log_w + (h.unsqueeze(-2) - C) / eps, dim=-1)

    def loop(C, log_a, log_b):
        Ct = C.transpose(-1, -2)
        f = softmin(C, log_b, torch.zeros_like(C[..., 0, :]), eps0)
        g = softmin(Ct, log_a, torch.zeros_like(C[..., :, 0]), eps0)
        for eps in eps_list:
            f, g = (f + softmin(C, log_b, g, eps)) / 2, (g + softmin(Ct, log_a, f, eps)) / 2
        return softmin(C, log_b, g, eps_last), softmin(Ct, log_a, f, eps_last)

    N, M = xs.shape[1], ys.shape[1]
    log_a, log_b = -math.log(N), -math.log(M)
    f, g = loop(cost(xs, ys), log_a, log_b)
    value = f.mean(-1) + g.mean(-1)
    if setting.debias:
        value = value - loop(cost(xs, xs), log_a, log_a)[0].mean(-1) - loop(cost(ys, ys), log_b, log_b)[0].mean(-1)
    return value


# ---------------------------------------------------------------- registry

def import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # pykeops fails with RuntimeError/OSError when it cannot compile, not only ImportError
        return f"cannot import {module}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def providers() -> list[Provider]:
    """Every provider, available or not (``Provider.skip_reason`` says why one cannot run)."""
    out = []
    for backend, info in otfast.backends().items():
        devices = {"torch": ("cpu", "cuda"), "cpu": ("cpu",), "triton": ("cuda",)}[backend]
        memory = {"torch": _dense(6), "triton": _buffered(12)}.get(backend, _streaming)
        out.append(Provider("otfast", backend, _otfast(backend), devices,
                            None if info.available else info.detail, memory))
        if backend == "triton":
            for label, fn, memory, sizes in (("triton-nosplit", _otfast_nosplit, _buffered(12), None),
                                            ("triton-exact", _otfast_exact, _buffered(8), None),
                                            ("triton-tile32", _otfast_tile32, _buffered(12, 32), _tile32_sizes)):
                out.append(Provider("otfast", label, fn, devices, None if info.available else info.detail, memory,
                                    sizes=sizes))
    pot = import_reason("ot")
    out.append(Provider("pot-solve_batch", "torch", _pot_solve_batch, ("cpu", "cuda"), pot, _dense(8)))
    out.append(Provider("pot-sinkhorn_log", "loop", _pot_sinkhorn_log_loop, ("cpu", "cuda"), pot,
                        _unrolled(per_update=2, forward=3), gradient="unrolled"))
    geomloss = import_reason("geomloss")
    out.append(Provider("geomloss", "tensorized", _geomloss("tensorized"), ("cpu", "cuda"), geomloss, _dense(8)))
    out.append(Provider("geomloss", "online", _geomloss("online"), ("cpu", "cuda"),
                        geomloss or import_reason("pykeops"), _streaming))
    out.append(Provider("flash-sinkhorn", "triton", _flash_sinkhorn, ("cuda",), import_reason("flash_sinkhorn"),
                        _streaming))
    out.append(Provider("torch-unrolled", "autograd", _torch_unrolled, ("cpu", "cuda"), None,
                        _unrolled(per_update=6, forward=4), gradient="unrolled"))
    return out


# ---------------------------------------------------------------- the check

@dataclass(frozen=True)
class Reference:
    """The otfast torch reference on one batch.

    Attributes:
        values: ``[B]`` float64 per-pair values (on CPU).
        grad_x, grad_y: gradients of the summed values, float64 on CPU, or None when not computed.
        dtype: the dtype it was computed in ("float64" where cheap, else the inputs' dtype).
    """

    values: torch.Tensor
    grad_x: torch.Tensor | None
    grad_y: torch.Tensor | None
    dtype: str


def reference(x: torch.Tensor, y: torch.Tensor, setting: Setting, *, backward: bool,
              dtype: torch.dtype = torch.float64) -> Reference:
    """Run ``otfast.sinkhorn_loss(..., backend="torch")`` (the project's one reference) in ``dtype``."""
    xr = x.detach().to(dtype).requires_grad_(backward)
    yr = y.detach().to(dtype).requires_grad_(backward)
    values = otfast.sinkhorn_loss(xr, yr, reduction="none", backend="torch", **setting.otfast_kwargs())
    grads = (None, None)
    if backward:
        grads = torch.autograd.grad(values.sum(), (xr, yr))
        grads = tuple(g.detach().double().cpu() for g in grads)
    return Reference(values.detach().double().cpu(), grads[0], grads[1], str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Check:
    """How a provider's output compares with the reference.

    Attributes:
        ok: within tolerance on values (and gradients when checked), all finite.
        value_err: max |v - v_ref| / max |v_ref| over the batch.
        grad_err: |g - g_ref| / |g_ref| (Frobenius, x and y together), or None when not checked.
        detail: "ok" or what is wrong.
    """

    ok: bool
    value_err: float
    grad_err: float | None
    detail: str


# Relative errors a provider may have and still be timed. The largest of a correct provider so far: values 1.0e-5,
# checked gradients 2.7e-3 (flash-sinkhorn's TF32), 7.0e-4 (GeomLoss; both in benchmarks/results/h200-2026-12-01.csv).
# A provider that stops after one update of the fixed setting at 8 x 16 is off by 3.6e-4 / 5.0e-2, one that leaves out
# the debiased terms of the paper setting by 6.7e-4 in value (``tests/test_benchmarks_providers.py``). Where the
# problem has converged in fewer updates than the setting runs, no check of the answer can tell.
TOLERANCES = {"value": 1e-4, "grad": 1e-2}


def check(values: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None, ref: Reference, *,
          check_grad: bool = True, tolerances: dict[str, float] = TOLERANCES) -> Check:
    """Compare a provider's per-pair values ``[B]`` (and gradients) with the reference.

    Args:
        values: ``[B]`` the provider's values.
        grads: ``(dx [B, N, D], dy [B, M, D])`` of the summed values, or None.
        ref: the ``Reference`` on the same inputs.
        check_grad: fail on a gradient error above tolerance (else it is only reported).
        tolerances: {"value": relative value error, "grad": relative gradient error}.

    Returns:
        A ``Check``; ``ok`` is False on a shape mismatch, a non-finite output or an error above tolerance.
    """
    v = values.detach().double().cpu().reshape(-1)
    if v.shape != ref.values.shape:
        return Check(False, math.inf, None, f"wrong shape: {tuple(values.shape)} for {tuple(ref.values.shape)}")
    if not bool(torch.isfinite(v).all()):
        return Check(False, math.inf, None, "non-finite values")
    value_err = float((v - ref.values).abs().max() / ref.values.abs().max().clamp_min(1e-30))
    grad_err = None
    if grads is not None and ref.grad_x is not None:
        gx, gy = (g.detach().double().cpu() for g in grads)
        if check_grad and not (bool(torch.isfinite(gx).all()) and bool(torch.isfinite(gy).all())):
            return Check(False, value_err, math.inf, "non-finite gradients")
        diff = torch.cat([(gx - ref.grad_x).reshape(-1), (gy - ref.grad_y).reshape(-1)]).norm()
        norm = torch.cat([ref.grad_x.reshape(-1), ref.grad_y.reshape(-1)]).norm().clamp_min(1e-30)
        grad_err = float(diff / norm)
    problems = []
    if value_err > tolerances["value"]:
        problems.append(f"value rel. err {value_err:.1e} > {tolerances['value']:.0e}")
    if check_grad and grad_err is not None and grad_err > tolerances["grad"]:
        problems.append(f"grad rel. err {grad_err:.1e} > {tolerances['grad']:.0e}")
    return Check(not problems, value_err, grad_err, "; ".join(problems) or "ok")


def grads_checked(provider: Provider, setting: Setting) -> bool:
    """Whether ``provider``'s gradients must match the reference's (see the module docstring)."""
    return provider.gradient == "envelope" or setting.scaling is None
