"""Shared helpers for the otfast test suite.

Everything here is plain data and small builders, reusable by every test file (core, CPU backend,
Triton, training, benchmarks):

- ``DTYPE_NAMES`` / ``case_id``: readable parametrize ids such as ``B3-N7-M9-D5-fp64``.
- ``TOL``: the per-dtype tolerance table (relative to the largest reference entry, see ``assert_close``).
- ``make_points``: a seeded batch of point clouds ``x [B, N, D]``, ``y [B, M, D]`` with ragged
  lengths, Hugging Face style masks, optional non-uniform weights and junk (large values or NaN) in
  the padding, plus ``PointBatch.pair(i)`` to get pair i alone, unpadded.
- ``make_costs``: the same for precomputed cost matrices ``[B, N, M]``.
- ``assert_close``: a max-norm relative comparison that prints where the largest error is.

Builders are deterministic: the same arguments always give the same tensors, whatever ran before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. The switch is read when a kernel module is
# imported, so it is set here, before any test module can import one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_language_once_per_launch() -> None:
    """Make the Triton interpreter patch each language module once per launch instead of once per call.

    The interpreter (triton 3.6-3.9) swaps the builtins of the ``triton.language`` modules a function can
    see (``tl``, ``tl.core``) for interpreted ones when a kernel launches (``_patch_lang``, undone when it
    ends), and again at every ``@triton.jit`` helper the kernel calls. The repeats change nothing once the
    modules a helper sees are swapped, but cost about 2 ms each in ``inspect.getmembers``: 17 of 41 s of a
    37 x 33 split solve in phases (cProfile). Inside a launch, a helper whose modules are all swapped now gets an empty
    patch scope; any other is patched as before. Where the interpreter's internals are not as expected,
    nothing is changed."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter
        original, empty = interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(original, "once_per_launch", False):
        return
    swapped: list = []  # the modules swapped in the running launch (empty between launches)

    def langs(fn):
        return [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]

    def patch_lang(fn):
        seen = langs(fn)
        if swapped and all(any(v is s for s in swapped) for v in seen):
            return empty()
        scope = original(fn)
        if not swapped:  # a launch: its scope is restored when the launch ends
            restore = scope.restore

            def restore_and_end():
                swapped.clear()
                restore()

            scope.restore = restore_and_end
        swapped.extend(seen)
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Tol:
    """``|actual - expected|_max <= rtol * |expected|_max + atol``."""

    rtol: float
    atol: float


# Agreement with an independent reference (GeomLoss, POT, a float64 run) per input dtype. float64 and
# float32 are the GeomLoss targets; float16/bfloat16 inputs are compared with the float32 result
# on the unrounded inputs, so their bounds mostly measure the rounding of the inputs themselves.
TOL = {
    torch.float64: Tol(rtol=1e-4, atol=1e-10),
    torch.float32: Tol(rtol=2e-3, atol=1e-6),
    torch.float16: Tol(rtol=2e-2, atol=1e-3),
    torch.bfloat16: Tol(rtol=8e-2, atol=1e-2),
}

# Plans against POT, both solvers run to tight convergence in float64 (the bound).
PLAN_RTOL_FP64 = 1e-6


def case_id(B: int | None = None, N: int | None = None, M: int | None = None, D: int | None = None,
            dtype: torch.dtype | None = None, **extra) -> str:
    """A readable test id: ``case_id(3, 7, 9, 5, torch.float64) == "B3-N7-M9-D5-fp64"``.

    Args:
        B, N, M, D: sizes; None leaves a field out.
        dtype: appended as ``fp64``/``fp32``/``fp16``/``bf16``.
        extra: further ``key=value`` fields, appended as ``key<value>`` in order (e.g. ``pad=True``).
    """
    parts = [f"{k}{v}" for k, v in (("B", B), ("N", N), ("M", M), ("D", D)) if v is not None]
    parts += [f"{k}{v}" for k, v in extra.items()]
    if dtype is not None:
        parts.append(DTYPE_NAMES[dtype])
    return "-".join(parts)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float | None = None,
                 atol: float | None = None, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Assert ``max|actual - expected| <= rtol * max|expected| + atol``, compared in float64.

    The bound is relative to the largest reference entry (a max-norm relative error), which is what
    "1e-4 relative" means for a vector of values, a plan or a gradient: tiny entries of a gradient are
    not held to a relative bound of their own.

    Args:
        actual, expected: tensors (or array-likes) of the same shape.
        rtol, atol: explicit bounds; default to ``TOL[dtype]`` (``dtype`` defaults to actual's dtype).
        what: a label for the failure message.
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    shapes = tuple(actual.shape), tuple(expected.shape)
    assert shapes[0] == shapes[1], f"{what}: shape {shapes[0]} != {shapes[1]}"
    tol = TOL[dtype or (actual.dtype if actual.dtype in TOL else torch.float64)]
    rtol = tol.rtol if rtol is None else rtol
    atol = tol.atol if atol is None else atol
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite entries in actual"
    err = (a - e).abs()
    scale = e.abs().max().item() if e.numel() else 0.0
    bound = rtol * scale + atol
    worst = err.max().item() if err.numel() else 0.0
    if worst > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        pytest.fail(f"{what}: max abs error {worst:.3e} > {bound:.3e} (rtol={rtol:g} x max|expected|={scale:.3e} + "
                    f"atol={atol:g}); worst at {idx}: actual {a[idx].item():.12g}, expected {e[idx].item():.12g}")


def _lengths(gen: torch.Generator, B: int, L: int, ragged: bool) -> list[int]:
    """Valid lengths per pair: the first pair full (so the padded shape is used), the others random in [1, L]."""
    if not ragged:
        return [L] * B
    rest = torch.randint(1, L + 1, (B,), generator=gen).tolist()
    return [L] + rest[1:]


def _mask(lengths: list[int], L: int) -> torch.Tensor:
    """Int64 ``[B, L]`` attention mask, 1 on the first ``lengths[b]`` entries."""
    return (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).long()


def _fill_padding(t: torch.Tensor, mask: torch.Tensor, junk: float | None, gen: torch.Generator) -> torch.Tensor:
    """Replace padded entries of ``t`` (leading dims ``mask.shape``) with junk: ``junk * N(0, 1)`` or NaN."""
    if junk is None:
        return t
    m = mask.bool().reshape(mask.shape + (1,) * (t.dim() - mask.dim())).expand_as(t)
    if junk != junk:  # NaN
        noise = torch.full_like(t, float("nan"))
    else:
        noise = junk * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
    return torch.where(m, t, noise)


def _weights(gen: torch.Generator, B: int, L: int, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-uniform positive weights in [0.2, 1.2] (not normalised), 5.0 on padding (ignored by otfast)."""
    w = 0.2 + torch.rand(B, L, generator=gen, dtype=torch.float64)
    return torch.where(mask.bool(), w, torch.full_like(w, 5.0)).to(dtype)


@dataclass
class PointBatch:
    """A padded batch of point clouds and its per-pair views.

    Attributes:
        x: ``[B, N, D]``; y: ``[B, M, D]`` (junk on padding unless ``junk=None``).
        mask_x: ``[B, N]`` int64 attention mask (1 = token); mask_y: ``[B, M]``.
        weights_x: ``[B, N]`` positive weights, or None (uniform); weights_y: ``[B, M]``.
        len_x, len_y: valid lengths per pair.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask_x: torch.Tensor
    mask_y: torch.Tensor
    weights_x: torch.Tensor | None
    weights_y: torch.Tensor | None
    len_x: list[int]
    len_y: list[int]

    @property
    def B(self) -> int:
        return self.x.shape[0]

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Pair i alone, unpadded: ``(x [n, D], y [m, D], weights_x [n] or None, weights_y [m] or None)``.

        Weights are returned as stored (not normalised); otfast normalises them itself.

        The tensors are fresh leaves (detached copies), so gradients of a per-pair call do not mix
        with those of the batched call.
        """
        n, m = self.len_x[i], self.len_y[i]
        def cut(t, k):
            return None if t is None else t[i, :k].detach().clone()

        return cut(self.x, n), cut(self.y, m), cut(self.weights_x, n), cut(self.weights_y, m)

    def kwargs(self) -> dict:
        """``mask_x``, ``mask_y``, ``weights_x``, ``weights_y`` as keyword arguments of ``sinkhorn_loss``."""
        return dict(mask_x=self.mask_x, mask_y=self.mask_y, weights_x=self.weights_x, weights_y=self.weights_y)


def make_points(B: int, N: int, M: int, D: int, *, dtype: torch.dtype = torch.float64, seed: int = 0,
                ragged: bool = True, weights: bool = False, junk: float | None = 1e3, shift: float = 0.5,
                scale: float = 1.0) -> PointBatch:
    """A seeded batch of point clouds with masks.

    Args:
        B, N, M, D: batch size, padded lengths and feature size.
        dtype: of x, y and the weights.
        seed: the generator seed (nothing global is touched).
        ragged: random valid lengths in [1, N] / [1, M] (pair 0 always full); else every token valid.
        weights: non-uniform random weights (else None = uniform).
        junk: padding filled with ``junk * N(0, 1)``; ``float("nan")`` fills NaN; None keeps the data.
        shift: y is drawn around ``shift`` in every coordinate, x around 0.
        scale: standard deviation of the clouds.

    Returns:
        ``PointBatch``; x and y are leaves without ``requires_grad`` (call ``requires_grad_()``).
    """
    gen = torch.Generator().manual_seed(seed)
    len_x, len_y = _lengths(gen, B, N, ragged), _lengths(gen, B, M, ragged)
    mask_x, mask_y = _mask(len_x, N), _mask(len_y, M)
    x = scale * torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    y = shift + scale * torch.randn(B, M, D, generator=gen, dtype=torch.float64)
    x = _fill_padding(x, mask_x, junk, gen).to(dtype)
    y = _fill_padding(y, mask_y, junk, gen).to(dtype)
    wx = _weights(gen, B, N, mask_x, dtype) if weights else None
    wy = _weights(gen, B, M, mask_y, dtype) if weights else None
    return PointBatch(x, y, mask_x, mask_y, wx, wy, len_x, len_y)


@dataclass
class CostBatch:
    """A padded batch of cost matrices and its per-pair views.

    Attributes:
        cost: ``[B, N, M]`` (junk outside the valid block unless ``junk=None``).
        mask_a: ``[B, N]`` int64; mask_b: ``[B, M]``.
        a: ``[B, N]`` positive weights or None (uniform); b: ``[B, M]``.
        len_a, len_b: valid lengths per pair.
    """

    cost: torch.Tensor
    mask_a: torch.Tensor
    mask_b: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    len_a: list[int]
    len_b: list[int]

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pair i alone, unpadded, with weights normalised to 1 (as otfast normalises them).

        Returns:
            ``(cost [n, m], a [n], b [m])``, float64 copies.
        """
        n, m = self.len_a[i], self.len_b[i]
        a = torch.ones(n, dtype=torch.float64) if self.a is None else self.a[i, :n].double()
        b = torch.ones(m, dtype=torch.float64) if self.b is None else self.b[i, :m].double()
        return self.cost[i, :n, :m].detach().double().clone(), a / a.sum(), b / b.sum()


def make_costs(B: int, N: int, M: int, *, dtype: torch.dtype = torch.float64, seed: int = 0, ragged: bool = True,
               weights: bool = False, junk: float | None = 1e3, scale: float = 1.0) -> CostBatch:
    """A seeded batch of cost matrices ``scale * U[0, 1)`` with masks on rows and columns.

    Args: as ``make_points`` (``junk`` fills every entry outside the valid ``[n, m]`` block).

    Returns:
        ``CostBatch``.
    """
    gen = torch.Generator().manual_seed(seed)
    len_a, len_b = _lengths(gen, B, N, ragged), _lengths(gen, B, M, ragged)
    mask_a, mask_b = _mask(len_a, N), _mask(len_b, M)
    cost = scale * torch.rand(B, N, M, generator=gen, dtype=torch.float64)
    cost = _fill_padding(cost, mask_a.unsqueeze(2) & mask_b.unsqueeze(1), junk, gen).to(dtype)
    a = _weights(gen, B, N, mask_a, dtype) if weights else None
    b = _weights(gen, B, M, mask_b, dtype) if weights else None
    return CostBatch(cost, mask_a, mask_b, a, b, len_a, len_b)


def assert_finite_at_extreme_eps(run, backend: str) -> None:
    """eps = 1e-4 with costs near 1e2 in float32 (C / eps ~ 1e6): values and gradients stay finite.

    Args:
        run: ``(batch, backend, **loss_kwargs) -> (value, dx, dy, ...)``, the calling test file's runner.
    """
    batch = make_points(2, 9, 13, 8, dtype=torch.float32, seed=4, scale=4.0)
    for t in run(batch, backend, eps=1e-4, scaling=0.5, debias=True)[:3]:
        assert torch.isfinite(t).all()
