"""Accuracy matrix: loss values and gradients of every backend against the float64 torch backend.

    python -m benchmarks.accuracy [--backend torch,cpu,triton] [--device cpu|cuda] [--quick] [--json OUT]
    python -m benchmarks.accuracy --sweep 400 [--backend ...]      # random cases, as a new user would try

Each cell is a batch of point clouds (feature size D, scale, masks, input dtype) and a loss setting; the
oracle is the torch backend in float64 on the same points (half-precision inputs are rounded first, so
the cell measures the computation, not the input rounding). A backend passes a cell when its relative
value error (max |err| / max |oracle|) is at most ``VALUE_BOUND`` and its relative gradient error at
most the cell's bound: ``GRAD_BOUND``, or, in the cells that are this ill-conditioned, the conditioning
``kappa_u``: how far the float64 answer moves when the cost is perturbed by one fp32 rounding (each
entry times 1 + 2^-24 r, r uniform in [-1, 1]; the median of three draws). No fp32 computation of the
cost can do better than that. GeomLoss's ``SamplesLoss`` in fp32 runs beside them where it can express
the cell (annealed losses; the cosine cost as the squared distance of normalised points), and a backend
must not be less exact than it there.

``--sweep N`` draws N random cases instead (D 16 or 768, scale 0.1 to 100, eps 1e-4 to 0.1, fixed,
annealed, debiased or unbalanced, random lengths 1 to 24, no padding) and counts, per backend, non-finite
values or gradients and gradients more than 1% off the float64 answer; exit status 1 when there is any.

On a CPU, ``--backend triton`` needs ``TRITON_INTERPRET=1`` and runs only the cells the interpreter can
afford (``--quick`` restricts every backend to those). Exit status 1 when any cell fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from unittest import mock

import torch

import otfast
import otfast.reference

VALUE_BOUND = 2e-6
GRAD_BOUND = 1e-4
B, N, M = 4, 24, 20
LONGER = (48, 40)  # the paper goal point's lengths

SETTINGS = {
    "fixed-eps0.05": dict(cost="sqeuclidean", eps=0.05, scaling=None, n_iters=200, debias=False),
    "fixed-eps0.0025": dict(cost="sqeuclidean", eps=0.0025, scaling=None, n_iters=300, debias=False),
    "fixed-eps1e-4": dict(cost="sqeuclidean", eps=1e-4, scaling=None, n_iters=300, debias=False),
    "anneal": dict(cost="sqeuclidean", blur=0.05, scaling=0.5, debias=False),
    "debias-fixed": dict(cost="sqeuclidean", eps=0.05, scaling=None, n_iters=200, debias=True),
    "paper": dict(cost="sqeuclidean", blur=0.05, scaling=0.5, debias=True),
    "paper-blur0.01": dict(cost="sqeuclidean", blur=0.01, scaling=0.5, debias=True),
    "paper-cosine": dict(cost="cosine", blur=0.05, scaling=0.5, debias=True),
    "unbalanced-fixed": dict(cost="sqeuclidean", eps=0.05, scaling=None, n_iters=200, debias=False, reach="auto"),
    "unbalanced-paper": dict(cost="sqeuclidean", blur=0.05, scaling=0.5, debias=True, reach="auto"),
}
POINTS = [(16, 0.1), (16, 1.0), (16, 10.0), (768, 0.1), (768, 0.5), (768, 1.0)]
# The Triton interpreter runs each kernel op in numpy: D = 16 and the annealed settings only (a fixed-eps cell
# of 200 updates takes 20 s there; tests/test_triton_interpreter.py runs shorter fixed-eps loops).
INTERPRETER_SETTINGS = ("anneal", "paper", "paper-blur0.01", "paper-cosine", "unbalanced-paper")


@dataclass(frozen=True)
class Cell:
    D: int
    scale: float
    setting: str
    masked: bool = False
    dtype: str = "float32"
    lengths: tuple[int, int] = (N, M)

    @property
    def name(self) -> str:
        extra = ("-masked" if self.masked else "") + ("" if self.dtype == "float32" else f"-{self.dtype}")
        extra += "" if self.lengths == (N, M) else "-{}x{}".format(*self.lengths)
        return f"D{self.D}-scale{self.scale:g}-{self.setting}{extra}"

    def kwargs(self) -> dict:
        kw = dict(SETTINGS[self.setting])
        if kw.get("reach") == "auto":  # a reach on the scale of the distances, so mass is not all destroyed
            kw["reach"] = 0.5 * self.scale * math.sqrt(2 * self.D)
        return kw

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(x, y, mask_x, mask_y) in the cell's input dtype; the seed depends on D and the scale only."""
        n, m = self.lengths
        gen = torch.Generator().manual_seed(1000 * self.D + int(10 * self.scale))
        x = torch.randn(B, n, self.D, generator=gen) * self.scale
        y = torch.randn(B, m, self.D, generator=gen) * self.scale + 0.1 * self.scale
        dtype = getattr(torch, self.dtype)
        if not self.masked:
            return x.to(dtype), y.to(dtype), None, None
        len_x = torch.randint(n // 2, n + 1, (B,), generator=gen)
        len_y = torch.randint(m // 2, m + 1, (B,), generator=gen)
        mask_x = (torch.arange(n) < len_x[:, None]).long()
        mask_y = (torch.arange(m) < len_y[:, None]).long()
        junk = torch.full((), 1e4)  # padding rows hold junk; the masks must keep it out
        x = torch.where(mask_x[..., None].bool(), x, junk)
        y = torch.where(mask_y[..., None].bool(), y, junk)
        return x.to(dtype), y.to(dtype), mask_x, mask_y


def cells(quick: bool = False) -> list[Cell]:
    """The matrix: every setting at every point, masks at every point, half precision at two, all at 24 x 20
    tokens; and the paper's length class (48 x 40: the Triton backend's resident 64 tile with triton >= 3.7,
    streamed before) at D = 768, annealed, plain, masked and in bfloat16."""
    if quick:
        return [Cell(D, s, name) for D, s in POINTS if D == 16 and s >= 1 for name in INTERPRETER_SETTINGS]
    out = [Cell(D, s, name) for D, s in POINTS for name in SETTINGS]
    out += [Cell(D, s, name, masked=True) for D, s in POINTS for name in ("paper", "unbalanced-fixed")]
    out += [Cell(D, s, "paper", dtype=dt) for D, s in ((16, 1.0), (768, 0.5)) for dt in ("float16", "bfloat16")]
    out += [Cell(768, s, name, lengths=LONGER) for s in (0.1, 0.5, 1.0) for name in ("anneal", "paper")]
    out += [Cell(768, 0.5, "paper", masked=True, lengths=LONGER),
            Cell(768, 0.5, "paper", dtype="bfloat16", lengths=LONGER)]
    return out


def interpreter_can_run(cell: Cell) -> bool:
    return cell.D == 16 and cell.setting in INTERPRETER_SETTINGS and not cell.masked and cell.lengths == (N, M)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def _run(fn, x, y):
    """(value [B], dx, dy) of ``fn(x, y)`` (summed for the gradients), in float64."""
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged fixed-eps pairs: the oracle has them too
        value = fn(xs, ys)
    value.sum().backward()
    return value.detach().double(), xs.grad.double(), ys.grad.double()


def _grad_error(got, want) -> float:
    return max(_rel(got[1], want[1]), _rel(got[2], want[2]))


def _loss(cell: Cell, backend: str, mask_x, mask_y):
    return lambda a, b: otfast.sinkhorn_loss(a, b, mask_x, mask_y, backend=backend, reduction="none", **cell.kwargs())


def _perturbed_cost(seed: int):
    """``otfast.reference.sqeuclidean_cost`` times 1 + 2^-24 r, r uniform in [-1, 1] from ``seed`` (the same
    draw for every call with the same shape: forward and backward see one perturbed cost)."""
    exact = otfast.reference.sqeuclidean_cost

    def cost(x, y):
        C = exact(x, y)
        r = torch.rand(C.shape, generator=torch.Generator().manual_seed(seed), dtype=C.dtype).to(C.device)
        return C * (1 + 2.0**-24 * (2 * r - 1))
    return cost


UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


class Oracle:
    """The float64 answer of a cell, GeomLoss's fp32 error where it applies, and (measured on first use)
    the cell's conditioning ``kappa_u``."""

    def __init__(self, cell: Cell, device: torch.device):
        self.cell, self.device = cell, device
        x, y, self.mask_x, self.mask_y = (None if t is None else t.to(device) for t in cell.batch())
        self.x64, self.y64 = x.double(), y.double()
        self.answer = _run(_loss(cell, "torch", self.mask_x, self.mask_y), self.x64, self.y64)
        gl = geomloss_loss(cell)
        self.geomloss_grad = (None if gl is None or self.mask_x is not None or cell.dtype != "float32"
                              else _grad_error(_run(gl, x.float(), y.float()), self.answer))
        self._kappa_u = None

    @property
    def kappa_u(self) -> float:
        if self._kappa_u is None:
            moved = []
            for seed in range(3):
                with mock.patch.object(otfast.reference, "sqeuclidean_cost", _perturbed_cost(seed)):
                    got = _run(_loss(self.cell, "torch", self.mask_x, self.mask_y), self.x64, self.y64)
                moved.append(_grad_error(got, self.answer))
            self._kappa_u = sorted(moved)[1]
        return self._kappa_u

    def grad_bound(self, grad_error: float) -> float:
        """The bound a gradient error is held to (``kappa_u`` is measured only when the plain bound fails)."""
        bound = max(GRAD_BOUND, UNIT_ROUNDOFF[self.cell.dtype])
        return bound if grad_error <= bound else max(bound, self.kappa_u)

    @property
    def kappa_u_if_measured(self) -> float | None:
        return self._kappa_u


def geomloss_loss(cell: Cell):
    """GeomLoss ``SamplesLoss`` for the annealed cells (None elsewhere), with its documented (rho + eps)
    unbalanced backward scale patched in: GeomLoss never applies it (an ``nn.Module``'s ``backward`` is not
    called), and otfast does (``otfast.schedule.phi``)."""
    kw = cell.kwargs()
    if kw.get("scaling") is None:
        return None
    try:
        from geomloss import SamplesLoss
        try:
            from geomloss._legacy.sinkhorn_divergence import UnbalancedWeight
        except ImportError:
            from geomloss.sinkhorn_divergence import UnbalancedWeight
    except ImportError:
        return None
    loss = SamplesLoss("sinkhorn", p=2, blur=kw["blur"], scaling=kw["scaling"], debias=kw["debias"],
                       reach=kw.get("reach"), backend="tensorized")

    def fn(a, b):
        if kw["cost"] == "cosine":
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        with mock.patch.object(UnbalancedWeight, "forward", lambda self, t: (self.rho + self.eps) * t):
            return loss(a, b)
    return fn


@dataclass
class Row:
    cell: str
    backend: str
    value: float
    grad: float
    bound: float
    kappa_u: float | None
    geomloss_grad: float | None
    ok: bool


def measure(cell: Cell, backend: str, device: torch.device, ref: Oracle) -> Row:
    """One backend on one cell against its oracle."""
    x, y, mx, my = (None if t is None else t.to(device) for t in cell.batch())
    got = _run(_loss(cell, backend, mx, my), x, y)
    value, grad = _rel(got[0], ref.answer[0]), _grad_error(got, ref.answer)
    bound = ref.grad_bound(grad)
    ok = value <= VALUE_BOUND and grad <= bound
    if ref.geomloss_grad is not None:
        ok = ok and grad <= max(ref.geomloss_grad, 1e-6)
    return Row(cell.name, backend, value, grad, bound, ref.kappa_u_if_measured, ref.geomloss_grad, ok)


def sweep_cases(n: int, seed: int = 0, max_D: int = 768) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """``n`` random (loss kwargs, x, y) cases in float32, log-uniform scales and temperatures."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    out = []
    for _ in range(n):
        D = 16 if max_D < 768 or uniform(0, 1) < 0.5 else 768
        scale, eps = 10 ** uniform(-1, 2), 10 ** uniform(-4, -1)
        n_x, n_y = (int(torch.randint(1, 25, (), generator=gen)) for _ in range(2))
        x = torch.randn(2, n_x, D, generator=gen) * scale
        y = torch.randn(2, n_y, D, generator=gen) * scale
        kind = ("fixed", "anneal", "paper", "unbalanced")[int(torch.randint(0, 4, (), generator=gen))]
        kw = {"fixed": dict(eps=eps, scaling=None, n_iters=100, debias=False),
              "anneal": dict(blur=math.sqrt(eps), debias=False),
              "paper": dict(blur=math.sqrt(eps), debias=True),
              "unbalanced": dict(blur=math.sqrt(eps), reach=scale * math.sqrt(D), debias=True)}[kind]
        out.append((kw, x, y))
    return out


def sweep(n: int, names: list[str], device: torch.device, seed: int = 0, max_D: int = 768) -> dict[str, dict]:
    """Per backend: how many of ``n`` random cases gave non-finite results, and gradients > 1% off."""
    counts = {name: dict(cases=0, non_finite=0, off_by_1pct=0, worst=0.0) for name in names}
    for kw, x, y in sweep_cases(n, seed, max_D):
        x, y = x.to(device), y.to(device)
        want = _run(lambda a, b: otfast.sinkhorn_loss(a, b, backend="torch", reduction="none", **kw), x.double(),
                    y.double())
        for name in names:
            got = _run(lambda a, b: otfast.sinkhorn_loss(a, b, backend=name, reduction="none", **kw), x, y)
            c = counts[name]
            c["cases"] += 1
            if not all(bool(torch.isfinite(t).all()) for t in got):
                c["non_finite"] += 1
                continue
            err = _grad_error(got, want)
            c["worst"] = max(c["worst"], err)
            c["off_by_1pct"] += err > 1e-2
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backend", default=None,
                        help="comma-separated backends (default: every backend available here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the cells the Triton interpreter can afford")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--sweep", type=int, default=0, metavar="N", help="run N random cases instead of the matrix")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = args.backend.split(",") if args.backend else [n for n, i in otfast.backends().items()
                                                          if i.available and not (n == "cpu" and device.type != "cpu")]
    interpreted = device.type == "cpu"
    if args.sweep:
        counts = sweep(args.sweep, names, device, max_D=16 if interpreted and "triton" in names else 768)
        for name, c in counts.items():
            print(f"{name:7} {c['cases']} cases: {c['non_finite']} non-finite, {c['off_by_1pct']} gradients more "
                  f"than 1% off, worst relative gradient error {c['worst']:.1e}")
        return 1 if any(c["non_finite"] or c["off_by_1pct"] for c in counts.values()) else 0
    print(f"{'cell':44} {'backend':7} {'value':>8} {'grad':>8} {'bound':>8} {'GeomLoss':>8}  verdict", flush=True)
    rows = []
    for cell in cells(args.quick):
        todo = [n for n in names if n != "triton" or not interpreted or interpreter_can_run(cell)]
        if not todo:
            continue
        ref = Oracle(cell, device)
        for name in todo:
            row = measure(cell, name, device, ref)
            rows.append(row)
            gl = "-" if row.geomloss_grad is None else f"{row.geomloss_grad:.1e}"
            print(f"{row.cell:44} {name:7} {row.value:8.1e} {row.grad:8.1e} {row.bound:8.1e} {gl:>8}  "
                  f"{'ok' if row.ok else 'FAIL'}", flush=True)
    failed = sum(not r.ok for r in rows)
    print(f"{len(rows) - failed} ok, {failed} failing of {len(rows)} cells ({', '.join(names)} on {device})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
