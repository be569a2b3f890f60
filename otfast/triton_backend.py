"""The triton backend: host launchers of the Triton Sinkhorn kernels (``otfast.kernels.triton``).

Implements ``otfast.backends.Backend`` (``solve``, ``solve_points``, ``grad_points``, the semantics of
``otfast.reference``): shape checks, the choice of regime and configuration (among
``otfast.kernels.triton.configs``), the preparation of the points and the output buffers. Two regimes
behind one entry:

- resident (max(N, M) <= 32, or 64 from the points with triton >= 3.7: ``configs.resident_tile``): one program
  per pair holds both cost tiles in registers; extra device memory: the potentials, O(B (N + M)).
- streaming (longer): the cost is written once as two fp32 tiles (8 B N M bytes), then streamed; iterations
  at a fixed temperature read the absorbed cost, a third fp32 tile (4 B N M bytes) their passes store. Where
  those buffers would not fit (``stream_source``: an eighth of the device's memory by default) every pass
  forms each tile again from the points, in O(B (N + M)) extra memory.

The backward is one tiled kernel for every length, one launch for dx and (roles swapped) dy, the debiased
loss's two symmetric terms included. ``solve_problems`` and ``grad_problems`` take the loss's problems
together, one launch per kernel.
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
from typing import NamedTuple

import torch

from ._checks import check_bool_mask
from .backends import triton_interpreted
from .kernels.triton import configs
from .kernels.triton.configs import (CENTRE_BLOCK, CENTRE_WARPS, COMPILE_OPTIONS, COST_BLOCK, COST_WARPS, GRAD_BLOCK,
                                     GRAD_PROGRAMS_PER_SM, GRAD_WARPS, PRECISIONS, RESIDENT_MAX, SPLIT_MIN_ROWS,
                                     SPLIT_MODES, STREAM_BLOCK, STREAM_BLOCK_K, STREAM_DRIFT, STREAM_MAXNREG,
                                     STREAM_MEMORY_SHARE, STREAM_SOURCES, STREAM_WARPS, resident_tile, split_maxnreg,
                                     split_warps)
from .reference import Potentials, prepare_grad, prepare_points
from .schedule import Annealing, Schedule

try:
    import triton

    from .kernels.triton import sinkhorn as K
except ImportError as exc:  # the package installs and runs without triton
    UNAVAILABLE: str | None = f"triton is not installed ({exc})"
    DESCRIPTION = "fused Triton kernels (triton not installed)"
else:
    UNAVAILABLE = None
    DEVICE_SCHEDULE = True  # derives an Annealing's temperatures on the device (otfast.ops reads this)
    DESCRIPTION = (f"fused Triton kernels: register-resident tiles up to {RESIDENT_MAX} x {RESIDENT_MAX}, "
                   "streaming beyond")


def _launcher(fn):
    """An entry point of the backend: it checks every ``OTFAST_TRITON_*`` setting first (a typo is an error at the
    first call, not when the first long pair streams or the first backward runs), and runs with its first
    tensor's CUDA device current: Triton launches on the current device and its stream, so a batch on cuda:1
    while cuda:0 is current would fail to launch or run unordered with torch's work on cuda:1 (a process that
    moves its model with ``.to("cuda:1")`` rather than ``torch.cuda.set_device``)."""
    @functools.wraps(fn)
    def launcher(first: torch.Tensor, *args, **kwargs):
        for setting in (precision, resident_side, _stream_setting, split_mode):
            setting()
        if first.device.type != "cuda":
            return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)

    return launcher


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


def resident_side() -> int:
    """``OTFAST_TRITON_RESIDENT``: the longest pair (tokens on its longer side) a resident tile may hold: "auto"
    (default) the largest tile this triton ships (``configs.RESIDENT_TILES``: 64 with triton >= 3.7, else 32), or
    one of their sides ("32": pairs of 33 to 64 tokens stream, as they do under triton 3.6)."""
    sides = [tile[0] for tile in configs.RESIDENT_TILES]
    value = os.environ.get("OTFAST_TRITON_RESIDENT", "auto")
    if value not in ("auto", *map(str, sides)):
        raise ValueError(f"OTFAST_TRITON_RESIDENT must be auto or one of {', '.join(map(str, sides))} (the resident "
                         f"tiles of the installed triton; the 64 tile needs triton >= 3.7), got {value!r}")
    return max(sides, default=0) if value == "auto" else int(value)


def chosen_tile(length: int, from_points: bool = True) -> tuple[int, int, int, bool] | None:
    """The resident tile the launchers take for a pair whose longer side has ``length`` tokens (``resident_tile``
    up to ``resident_side``), or None where it streams."""
    return resident_tile(length, from_points, resident_side())


def _stream_setting() -> str:
    value = os.environ.get("OTFAST_TRITON_STREAM", "auto")
    if value not in ("auto", *STREAM_SOURCES):
        raise ValueError(f"OTFAST_TRITON_STREAM must be one of auto, {', '.join(STREAM_SOURCES)}, got {value!r}")
    return value


def stream_source(b: int, shapes: list[tuple[int, int]], device: torch.device, from_points: bool = True) -> str:
    """Where the streaming solvers read the cost of b pairs of problems of ``shapes`` (rows, columns) from:
    ``OTFAST_TRITON_STREAM`` = "absorbed" (the packed cost, 8 bytes per entry, and the absorbed cost its fast
    passes store, 4 more), "cost" (the packed cost alone), "points" (each tile formed again from the points in
    every pass: no [B, N, M] buffer) or "auto" (default): the first of those whose buffers fit in
    ``STREAM_MEMORY_SHARE`` of the device's memory and whose problems the packed cost can index (rows x
    columns < 2^31 per pair, in int32), else "points". A precomputed cost (``from_points`` False) is read
    packed whatever is asked ("points" reads as "cost"); a packed cost the kernels cannot index is an error."""
    value = _stream_setting()
    entries = b * sum(rows * cols for rows, cols in shapes)
    indexable = all(rows * cols < 2**31 for rows, cols in shapes)
    if value == "auto":
        budget = STREAM_MEMORY_SHARE * _device_memory(device)
        value = next((name for name, size in (("absorbed", 12), ("cost", 8))
                      if indexable and size * entries <= budget), "points")
    if value == "points" and not from_points:
        value = "cost"
    if value != "points" and not indexable:
        rows, cols = next((r, c) for r, c in shapes if r * c >= 2**31)
        raise ValueError(f"a {rows} x {cols} problem has {rows * cols} >= 2^31 cost entries per pair, more than "
                         "the Triton kernels index in a packed cost; solve it from the points (OTFAST_TRITON_STREAM="
                         "points or auto), split the pair, or use the torch backend")
    return value


@functools.lru_cache(maxsize=16)
def _device_memory(device: torch.device) -> int:
    """Bytes of memory on the device: the GPU's, or the host's for a CPU (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64).contiguous()


# The loss's problems (``sinkhorn._problem``): OT(x, y), OT(x, x), OT(y, y); a launch solves ``count`` of
# them from ``first`` on, one program per pair and problem.
XY, XX, YY = 0, 1, 2


def _shape(p: int, n: int, m: int) -> tuple[int, int]:
    """``(rows, columns)`` of problem p between N = n and M = m points (``sinkhorn._problem``)."""
    return m if p == YY else n, n if p == XX else m


class _Outputs(NamedTuple):
    """The solvers' outputs for the problems first, ..., first + count - 1 (``sinkhorn._problem``): f and
    f_prev per problem, g and g_prev (problem XY only; a symmetric problem's are its f, f_prev), iterations
    and residuals ``[count, B]``."""

    first: int
    f: list[torch.Tensor]
    f_prev: list[torch.Tensor]
    g: torch.Tensor
    g_prev: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor

    @classmethod
    def alloc(cls, first: int, count: int, b: int, n: int, m: int, device: torch.device,
              zeros: bool) -> "_Outputs":
        """``zeros``: f_prev, g_prev start at 0 (the streaming kernel's current potentials). Each problem's
        outputs are allocations of their own (a symmetric problem's g is its f): the loss's custom op may
        not return tensors that alias each other."""
        f64 = torch.float64
        rows = [_shape(p, n, m)[0] for p in range(first, first + count)]
        f = [_empty((b, r), f64, device) for r in rows]
        f_prev = [torch.zeros((b, r), dtype=f64, device=device) if zeros else _empty((b, r), f64, device)
                  for r in rows + ([m] if first == XY else [])]
        g, g_prev = (_empty((b, m), f64, device), f_prev.pop()) if first == XY else (f[0], f_prev[0])
        return cls(first, f, f_prev, g, g_prev, _empty((count, b), torch.int32, device),
                   _empty((count, b), f64, device))

    def args(self) -> list[torch.Tensor]:
        """F0, F1, F2, FP0, FP1, FP2, G, G_PREV, ITERS, ERR of the solvers (a problem not launched gets a
        tensor it never writes)."""
        def by_problem(ts):
            return [ts[p - self.first] if 0 <= p - self.first < len(ts) else ts[0] for p in (XY, XX, YY)]
        return [*by_problem(self.f), *by_problem(self.f_prev), self.g, self.g_prev, self.iters, self.err]

    def potentials(self) -> list[Potentials]:
        out = []
        for q, (f, f_prev) in enumerate(zip(self.f, self.f_prev)):
            g, g_prev = (self.g, self.g_prev) if self.first + q == XY else (f, f_prev)
            out.append(Potentials(f, g, f_prev, g_prev, self.iters[q], self.err[q]))
        return out


class _Points(NamedTuple):
    """Points as the kernels read them (``_points``): x, y and the centres mu ``[3, B, D]`` float64 (one per
    problem, ``_centre``), with their strides."""

    x: torch.Tensor
    y: torch.Tensor
    mu: torch.Tensor
    mu_strides: tuple[int, int, int]


def _points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, cost: str) -> _Points:
    """For "sqeuclidean", the raw x, y (fp32 or float64, any strides) and each pair's centre, which the kernels
    subtract as they load, zeroing padding rows (``sinkhorn._centred``); "cosine": the normalised points
    (``prepare_points``) and a zero centre (strides 0)."""
    if cost == "sqeuclidean":
        x, y = _readable(x), _readable(y)
        mu = _centre(x, y, alpha, beta)
        return _Points(x, y, mu, mu.stride())
    xp, yp = prepare_points(x.double(), y.double(), alpha, beta, cost)
    return _Points(xp, yp, _constants((0.0,), x.device), (0, 0, 0))


def _readable(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype the kernels load: fp32 and float64 as they are (any strides), fp16 / bf16 as fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _centre(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``[3, B, D]`` float64: the mean of each pair's valid points of each problem (x and y together, x, y;
    one launch)."""
    mu = _empty((3, x.shape[0], x.shape[2]), torch.float64, x.device)
    _over_pairs(K._centre_kernel, x, y, alpha, beta, mu)
    return mu


def _over_pairs(kernel, x: torch.Tensor, y: torch.Tensor, of_x: torch.Tensor, of_y: torch.Tensor,
                out: torch.Tensor) -> None:
    """Launch a kernel that reads each pair's valid points once (``_centre_kernel``, ``_bounds_kernel``: grid
    pair x ``CENTRE_BLOCK`` feature block), with the per-token tensors of x and y that say which are valid."""
    (b, n, dim), m = x.shape, y.shape[1]
    br, bd = CENTRE_BLOCK
    kernel[(b, triton.cdiv(dim, bd))](x, y, of_x, of_y, out, n, m, dim, *x.stride(), *y.stride(), BLOCK_R=br,
                                      BLOCK_D=bd, num_warps=CENTRE_WARPS, **COMPILE_OPTIONS)


@_launcher
def bounding_diameter(x: torch.Tensor, y: torch.Tensor, mask_x: torch.Tensor, mask_y: torch.Tensor) -> torch.Tensor:
    """``otfast.schedule.bounding_diameter`` bit for bit, in one launch (``_bounds_kernel``: each pair's box) and
    three reductions over the batch (and, for fp32 points, a conversion), where the reference takes 17 torch
    launches. The sides hi - lo are the sums hi + (-lo) in the points' dtype (the reference's differences), then
    the diagonal in float64 as it is taken. A NaN among the valid points (which ``check_inputs`` rejects) is
    passed over here, where the reference's diameter is NaN; the loss is NaN either way.

    Raises:
        TypeError: a mask that is not bool (the kernel reads its bytes).
    """
    check_bool_mask("mask_x", mask_x)
    check_bool_mask("mask_y", mask_y)
    x, y = _readable(x), _readable(y)
    bounds = _empty((x.shape[0], 2, x.shape[2]), x.dtype, x.device)
    _over_pairs(K._bounds_kernel, x, y, *(t.contiguous().view(torch.uint8) for t in (mask_x, mask_y)), bounds)
    return bounds.amax(0).sum(0).double().norm()


def _resident(points, cost, tile, alpha, beta, schedule, first, count, n, m, dim):
    b = alpha.shape[0]
    outs = _Outputs.alloc(first, count, b, n, m, alpha.device, zeros=False)
    from_points = cost is None
    if from_points:
        X, Y, MU, COST = points.x, points.y, points.mu, points.x
        strides = (*X.stride(), *Y.stride(), *points.mu_strides, 0, 0, 0)
    else:
        X, Y, MU, COST, strides = cost, cost, cost, cost, (0,) * 9 + cost.stride()
    side, warps, groups, anchor = tile
    K._sinkhorn_resident_kernel[(b, count)](
        X, Y, MU, COST, alpha, beta, _schedule(schedule, alpha.device), *outs.args(), n, m, dim, first, *strides,
        *_loop_args(schedule), BLOCK_N=side, BLOCK_M=side, GROUPS=groups, FROM_POINTS=from_points, ANCHOR=anchor,
        SYMMETRIC=None if from_points else first == XX, HAS_TOL=schedule.tol is not None, num_warps=warps,
        **COMPILE_OPTIONS)
    return outs.potentials()


class _Stream(NamedTuple):
    """Where the streaming solvers read a cost from (``stream_source``; ``sinkhorn._stream_source``): their
    arguments X, Y, MU, COST_HI, COST_LO, D and the points' and centres' strides, and the constexprs ABSORB
    and FROM_POINTS. What a source does not read is a one-element placeholder of the type the resource check
    compiles for (``_unused``)."""

    tensors: tuple
    dim: int
    strides: tuple
    absorb: bool
    from_points: bool

    @classmethod
    def packed(cls, cost_hi: torch.Tensor, cost_lo: torch.Tensor, absorb: bool) -> "_Stream":
        """The packed costs of ``cost_matrix``; ``absorb``: its fast passes store and read the absorbed cost."""
        f64 = _unused(torch.float64, cost_hi.device)
        return cls((f64, f64, f64, cost_hi, cost_lo), 0, (0,) * 9, absorb, False)

    @classmethod
    def points(cls, points: _Points) -> "_Stream":
        """Every tile formed again from the prepared points in every pass: no [B, N, M] buffer."""
        x, y, f32 = points.x, points.y, _unused(torch.float32, points.x.device)
        return cls((x, y, points.mu, f32, f32), x.shape[2], (*x.stride(), *y.stride(), *points.mu_strides), False,
                   True)


@functools.lru_cache(maxsize=16)
def _unused(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element placeholder for a pointer argument the kernel does not read."""
    return torch.zeros((1,), dtype=dtype, device=device)


def _streaming(stream, alpha, beta, schedule, first, count, n, m):
    """The streaming solver on ``stream`` (``_Stream``; problems first, ..., first + count - 1): one program per
    pair and problem, or ``split_count`` of them (``_split``)."""
    b, device = alpha.shape[0], alpha.device
    n_split = split_count(b, count, n, m, device)
    if n_split > 1:
        return _split(stream, alpha, beta, schedule, first, count, n, m, n_split, _split_run() == "persistent")
    outs = _Outputs.alloc(first, count, b, n, m, device, zeros=True)
    if stream.absorb:
        absorbed = _empty(stream.tensors[3].shape, torch.float32, device)
        anchors = _empty((count, b, 3, max(n, m)), torch.float32, device)
    else:
        absorbed = anchors = _unused(torch.float32, device)
    K._sinkhorn_streaming_kernel[(b, count)](
        *stream.tensors, absorbed, anchors, alpha, beta, _schedule(schedule, device), *outs.args(), n, m, stream.dim,
        first, *stream.strides, *_loop_args(schedule), STREAM_DRIFT, BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK,
        BLOCK_K=STREAM_BLOCK_K, HAS_TOL=schedule.tol is not None, ABSORB=stream.absorb,
        FROM_POINTS=stream.from_points, num_warps=STREAM_WARPS, maxnreg=STREAM_MAXNREG, **COMPILE_OPTIONS)
    return outs.potentials()


def split_mode() -> str:
    """``OTFAST_TRITON_SPLIT``: "auto" (default: "persistent" on a GPU, "off" under the interpreter), "off" (one
    program per streamed pair and problem), "persistent" (rows split among programs that sync on the device,
    one launch; under the interpreter it runs as "phases") or "phases" (the same split, one launch per half
    step and a host read of the stop flags per step, which a CUDA graph cannot capture: the interpreter's
    way)."""
    value = os.environ.get("OTFAST_TRITON_SPLIT", "auto")
    if value not in SPLIT_MODES:
        raise ValueError(f"OTFAST_TRITON_SPLIT must be one of {', '.join(SPLIT_MODES)}, got {value!r}")
    return value


def _split_run() -> str:
    """How ``split_mode`` runs here: "off", "persistent" or "phases" ("auto" is "off" under the interpreter and
    "persistent" on a GPU; "persistent" runs as "phases" under the interpreter, whose programs run one after
    the other, so persistent ones would wait forever for those that run after them)."""
    mode, interpreted = split_mode(), triton_interpreted()
    if mode == "auto":
        return "off" if interpreted else "persistent"
    return "phases" if mode == "persistent" and interpreted else mode


def split_count(b: int, count: int, n: int, m: int, device: torch.device) -> int:
    """Programs per streamed pair and problem: 1 where the split is off here (``_split_run``) or the b x count
    pairs and problems fill the SMs; otherwise as many as fill them (one program each at
    most, so that a persistent grid fits on the GPU at once and its programs can wait for each other; the
    launch is cooperative, so a GPU that cannot hold it refuses it) and no more than give the longer side
    ``SPLIT_MIN_ROWS`` rows per program. Rows and columns are dealt out in whole blocks (``_chunk``), so the
    last programs of a problem may get fewer, and those of a shorter problem (OT(x, x) beside a long y)
    none: they only meet the others at the barriers."""
    if _split_run() == "off":
        return 1
    return max(1, min(_sm_count(device) // max(b * count, 1), max(n, m) // SPLIT_MIN_ROWS))


def _split(stream, alpha, beta, schedule, first, count, n, m, n_split, persistent):
    """The streaming solver with each pair and problem's rows and columns split among n_split programs
    (``_sinkhorn_split_kernel``; ``stream`` as ``_streaming`` takes it, whose absorbed cost it does not use):
    the whole schedule in one launch when ``persistent``; else two launches per step, until the kernels have
    flagged every pair and problem done."""
    b, device = alpha.shape[0], alpha.device
    outs = _Outputs.alloc(first, count, b, n, m, device, zeros=True)
    sync = torch.zeros((count, b), dtype=torch.int32, device=device)
    args = (*stream.tensors, alpha, beta, _schedule(schedule, device), *outs.args(),
            _empty((count, b, 2, n_split), torch.float64, device), sync, n, m, stream.dim, first, *stream.strides,
            *_loop_args(schedule), n_split)
    kw = dict(BLOCK_N=STREAM_BLOCK, BLOCK_M=STREAM_BLOCK, BLOCK_K=STREAM_BLOCK_K, HAS_TOL=schedule.tol is not None,
              PERSISTENT=persistent, FROM_POINTS=stream.from_points,
              num_warps=split_warps(stream.from_points), maxnreg=split_maxnreg(persistent), **COMPILE_OPTIONS,
              launch_cooperative_grid=persistent)
    launch = K._sinkhorn_split_kernel[(b, count, n_split)]
    if persistent:
        launch(*args, 0, **kw)
        return outs.potentials()
    phase = 0
    while True:
        launch(*args, phase, **kw)
        launch(*args, phase + 1, **kw)
        phase += 2
        if bool(sync.all()):
            return outs.potentials()


def cost_matrix(points: _Points, alpha: torch.Tensor, beta: torch.Tensor, first: int = XY,
                count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``, fp32 each: the costs |x_i - y_j|^2 / 2 of the prepared points of the problems first, ...,
    first + count - 1, accumulated in float64 and split as hi + lo, packed one after the other (problem XY:
    ``[B, N, M]``; XX: ``[B, N, N]``; YY: ``[B, M, M]``), in one launch; alpha, beta: the float64
    log-weights (-inf marks padding)."""
    x, y = points.x, points.y
    (b, n, dim), m = x.shape, y.shape[1]
    shapes = [_shape(p, n, m) for p in range(first, first + count)]
    size = b * sum(r * c for r, c in shapes)
    hi, lo = _empty((size,), torch.float32, x.device), _empty((size,), torch.float32, x.device)
    bn, bm, bk = COST_BLOCK
    tiles_n = triton.cdiv(max(r for r, _ in shapes), bn)
    K._cost_kernel[(b, count * tiles_n, triton.cdiv(max(c for _, c in shapes), bm))](
        x, y, points.mu, alpha, beta, hi, lo, n, m, dim, first, *x.stride(), *y.stride(), *points.mu_strides,
        tiles_n, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=COST_WARPS, **COMPILE_OPTIONS)
    return hi, lo


@_launcher
def solve(cost_matrix: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
          symmetric: bool = False) -> Potentials:
    """The Sinkhorn loop on precomputed costs ``cost_matrix [B, N, M]`` (see ``otfast.reference.solve``)."""
    b, n, m = cost_matrix.shape
    _check(alpha, beta, n, m, b)
    first = XX if symmetric else XY
    tile = chosen_tile(max(n, m), from_points=False)
    if tile:
        return _resident(None, _f64(cost_matrix), tile, _f64(alpha), _f64(beta), schedule, first, 1, n, m, 1)[0]
    source = stream_source(b, [(n, m)], cost_matrix.device, from_points=False)
    cost, alpha, beta = _f64(cost_matrix), _f64(alpha), _f64(beta)
    hi = cost.float()
    stream = _Stream.packed(hi, (cost - hi.double()).float(), source == "absorbed")
    return _streaming(stream, alpha, beta, schedule, first, 1, n, m)[0]


@_launcher
def solve_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                 schedule: Schedule, symmetric: bool = False, cost: str = "sqeuclidean") -> Potentials:
    """The Sinkhorn loop on the cost ``cost`` between the raw points ``x [B, N, D]``, ``y [B, M, D]``.

    The kernels mask and centre the points as they load them ("sqeuclidean": one more launch finds each
    pair's centre, ``_Points``); "cosine" normalises them first (``otfast.reference.prepare_points``). Up
    to ``RESIDENT_MAX`` tokens the cost never leaves the chip; beyond, it is written once as two fp32 tiles,
    or formed again from the points in every pass where ``stream_source`` says so.
    ``symmetric`` solves OT(x, x) and reads neither y nor beta (the ``Backend`` contract: y is x).
    """
    return _solve_points(x, y, alpha, beta, schedule, XX if symmetric else XY, 1, cost)[0]


@_launcher
def solve_problems(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, schedule: Schedule,
                   debias: bool, cost: str = "sqeuclidean") -> list[Potentials]:
    """The loss's problems: ``[OT(x, y)]``, or with ``debias`` ``[OT(x, y), OT(x, x), OT(y, y)]``, as
    ``solve_points`` solves them, the three in one launch of each kernel (their 3 B programs run side by
    side, where three launches of B programs would run one after the other)."""
    return _solve_points(x, y, alpha, beta, schedule, XY, 3 if debias else 1, cost)


def _solve_points(x, y, alpha, beta, schedule, first, count, cost):
    (b, n, dim), m = x.shape, y.shape[1]
    _check(alpha, beta, n, m, b)
    tile = chosen_tile(max(n, m))
    source = stream_source(b, [_shape(p, n, m) for p in range(first, first + count)], x.device) if not tile else None
    alpha, beta = _f64(alpha), _f64(beta)
    points = _points(x, y, alpha, beta, cost)
    if tile:
        return _resident(points, None, tile, alpha, beta, schedule, first, count, n, m, dim)
    if source == "points":
        stream = _Stream.points(points)
    else:
        stream = _Stream.packed(*cost_matrix(points, alpha, beta, first, count), source == "absorbed")
    return _streaming(stream, alpha, beta, schedule, first, count, n, m)


def _grad(points, pots, alpha, beta, weights, eps):
    """``[dx]`` (weights ``[u]``) or ``[dx, dy]`` in the points' dtype: one launch of ``_grad_kernel`` over
    the problems ``pots`` (``[OT(x, y)]`` or the debiased loss's three) with upstream weights ``weights``
    (u, v of OT(x, y), then u of OT(x, x) and of OT(y, y)). The kernel reads u and writes dx in the points'
    dtype, converting nothing for fp32 or float64 embeddings."""
    x, y = points.x, points.y
    (b, n, dim), m = x.shape, y.shape[1]
    sides = 1 if len(weights) == 1 else 2
    xy, *sym = pots
    xx, yy = sym or (xy, xy)
    u = [w.to(x.dtype).contiguous() for w in weights]
    u += [u[0]] * (4 - len(u))
    outs = [_empty((b, r, dim), x.dtype, x.device) for r in (n, m)[:sides]]
    bn, bm, bk, bdo = GRAD_BLOCK
    row_blocks = triton.cdiv(max(n, m) if sides == 2 else n, bn)
    groups, per_group = feature_groups(b * row_blocks * sides, dim, _sm_count(x.device))
    K._grad_kernel[(b, row_blocks, sides * groups)](
        x, y, points.mu, *(_f64(t) for t in (xy.f, xy.g, xy.f_prev, xy.g_prev, xx.f, xx.f_prev, yy.f, yy.f_prev)),
        alpha, beta, _constants((eps,), x.device), *u, outs[0], outs[-1], n, m, dim,
        2 if sym else 1, groups, per_group, *x.stride(), *y.stride(), *points.mu_strides, BLOCK_N=bn, BLOCK_M=bm,
        BLOCK_K=bk, BLOCK_DO=bdo, PRECISION=precision(), num_warps=GRAD_WARPS, **COMPILE_OPTIONS)
    return outs


def feature_groups(programs: int, dim: int, sms: int) -> tuple[int, int]:
    """``(groups, features per group)``: how the backward splits the D output features among programs, on a
    GPU of ``sms`` SMs (0: the interpreter).

    Each group forms every cost tile of its row block again (2 D float64 flops per entry), so one group
    (all of D per program) does the least work; more groups only fill a GPU that ``programs`` (pairs x row
    blocks x sides) leave partly idle: as many as bring the grid to ``GRAD_PROGRAMS_PER_SM`` programs per
    SM, each a whole number of ``GRAD_BLOCK``'s BLOCK_DO-wide slices."""
    bdo = GRAD_BLOCK[3]
    slices = max(triton.cdiv(dim, bdo), 1)
    groups = max(1, min(slices, triton.cdiv(GRAD_PROGRAMS_PER_SM * sms, max(programs, 1))))
    per_group = triton.cdiv(slices, groups) * bdo
    return triton.cdiv(dim, per_group), per_group


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    """The device's SM count, 0 for a CPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


@_launcher
def grad_points(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, pots: Potentials,
                eps: float, u: torch.Tensor, v: torch.Tensor | None, cost: str = "sqeuclidean"
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Envelope gradients with respect to the raw points (see ``otfast.reference.grad_points``), no [B, N, M]
    buffer; in x's dtype."""
    grads = grad_problems(x, y, alpha, beta, [pots], eps, [u] if v is None else [u, v], cost)
    return grads[0], grads[1] if v is not None else None


@_launcher
def grad_problems(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                  pots: list[Potentials], eps: float, weights: list[torch.Tensor], cost: str = "sqeuclidean"
                  ) -> list[torch.Tensor]:
    """The gradients of the loss's problems ``pots`` (as ``solve_problems`` returns them) with respect to the
    raw points, in x's dtype, in one launch: ``[dx]`` or ``[dx, dy]`` of OT(x, y) for upstream weights
    ``weights = [u]`` or ``[u, v]``; debiased (three problems, ``weights = [u, v, u_xx, u_yy]``) dx of
    OT(x, y) - OT(x, x) and dy of OT(x, y) - OT(y, y)."""
    if (len(pots), len(weights)) not in ((1, 1), (1, 2), (3, 4)):
        raise ValueError(f"grad_problems takes 1 or 3 problems with 1, 2 or 4 upstream weights (u, v, u_xx, u_yy), "
                         f"got {len(pots)} problems and {len(weights)} weights")
    alpha, beta = _f64(alpha), _f64(beta)
    points = _points(x, y, alpha, beta, cost)
    grads = _grad(points, pots, alpha, beta, weights, eps)
    return [_map_grad(t, p, d, w, cost) for t, p, d, w in zip((x, y), (points.x, points.y), grads, (alpha, beta))]


def _map_grad(x: torch.Tensor, xp: torch.Tensor, dxp: torch.Tensor, alpha: torch.Tensor, cost: str) -> torch.Tensor:
    """``prepare_grad`` in x's dtype. For "sqeuclidean" it is the identity on what ``_grad_kernel`` writes
    (centring passes the gradient unchanged, and a padding row's is already 0: its prepared point is 0, its
    weight u_i is 0 and its plan row is empty), so no launch is spent on it."""
    if cost == "sqeuclidean":
        return dxp.to(x.dtype)
    return prepare_grad(x.to(dxp.dtype), xp, dxp, alpha, cost).to(x.dtype)
