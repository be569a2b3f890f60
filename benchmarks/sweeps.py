"""How many of the Triton kernels' fast passes sum their exponents in one sweep, and how many of the streaming
kernel's read the absorbed cost, at the goal points.

Usage::

    python -m benchmarks.sweeps [--point SETTING,B,N,M,D ...]

A fast pass forms its exponents relative to the row's previous update and sums them at once when every
valid row of the tile (resident kernel: the pair; streaming: a block of ``STREAM_BLOCK`` rows) has its max
within ``NEAR`` binary orders of that reference; otherwise it sweeps the tile again (``sinkhorn._near``).
No GPU counter says which path ran, so this replays the loss (the torch backend, float64, the points of
``benchmarks.providers.make_inputs``) and takes each soft-min's exponents relative to the reference the
kernels use: a float64 prediction of the kernels' fp32 decision, exact but for maxima within rounding of
``NEAR`` (``tests/test_triton_interpreter.py`` checks it against the interpreted kernels' own decisions).
The same replay follows the streaming kernel's anchors: a fast pass reads the absorbed cost when a pass
stored it before and every reference and summed potential lies within ``STREAM_DRIFT`` binary orders of the
anchors that pass left (``sinkhorn._stream_anchored``), else, at the previous step's temperature (not in an
annealing step after the first), it stores them anew.
Nothing is written; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from unittest import mock

import torch

import otfast
from benchmarks.providers import SETTINGS, make_inputs
from otfast import reference
from otfast.kernels.triton.configs import STREAM_BLOCK, STREAM_DRIFT
from otfast.triton_backend import chosen_tile

POINTS = (("fixed", 64, 64, 64, 768), ("paper", 24, 48, 48, 768), ("fixed", 64, 128, 128, 768),
          ("fixed", 4, 512, 512, 768), ("paper", 1, 2048, 2048, 768))


class Decisions:
    """The fast passes' decisions (one per pair and pass on resident tiles, one per row block when streaming:
    ``resident`` when a resident tile holds the pair, ``triton_backend.chosen_tile``), filled by ``record``; eps
    the final temperature.

    ``sequences[(k, b)]``: whether each decision of pair b in the k-th solve of the block took one sweep, in
    the kernels' order (passes in turn, row pass before column pass, row blocks in order). ``absorbed[(k,
    b)]`` (streaming only): whether each fast pass of that pair read the absorbed cost. No ``tol``: the
    torch backend's loop updates every pair until all have stopped, the kernels stop each on its own."""

    def __init__(self, eps: float, resident: bool) -> None:
        from otfast.kernels.triton.sinkhorn import NEAR, PRECISE_RATIO

        self.near, self.threshold, self.resident = NEAR.value, eps * PRECISE_RATIO.value, resident
        self.sequences: dict[tuple[int, int], list[bool]] = {}
        self.absorbed: dict[tuple[int, int], list[bool]] = {}
        self._solves = 0

    @property
    def one_sweep(self) -> int:
        return sum(sum(seq) for seq in self.sequences.values())

    @property
    def total(self) -> int:
        return sum(len(seq) for seq in self.sequences.values())

    @property
    def absorbed_passes(self) -> int:
        return sum(sum(seq) for seq in self.absorbed.values())

    @property
    def fast_passes(self) -> int:
        return sum(len(seq) for seq in self.absorbed.values())

    @contextmanager
    def record(self):
        """Within this block every torch-backend solve records its fast passes' decisions."""
        solve, softmin = reference.solve, reference.softmin
        previous, anchors = {}, {}

        def solve_fresh(cost_matrix, alpha, beta, *args, **kwargs):
            previous.clear()  # each solve starts from its own zero potentials
            anchors.clear()
            anchors["weights"] = alpha.double(), beta.double()
            self._solves += 1
            return solve(cost_matrix, alpha, beta, *args, **kwargs)

        def softmin_counted(C, h, eps, damping, mask):
            out = softmin(C, h, eps, damping, mask)
            site = id(C)  # the row pass reads C, the column pass its transpose: two objects alive in the solve
            prev, prev_damping, prev_eps = previous.get(site, (torch.zeros_like(out), 1.0, eps))
            ref = prev / prev_damping  # the previous update, undamped at its own temperature
            previous[site] = out, damping, eps
            if eps <= self.threshold:
                self._record(C, h, eps, mask, ref)
                if not self.resident:
                    self._anchor(anchors, site, h, eps, mask, ref, store=eps == prev_eps)
            return out

        with mock.patch.object(reference, "solve", solve_fresh), \
                mock.patch.object(reference, "softmin", softmin_counted):
            yield self

    def _anchor(self, anchors, site, h, eps, mask, ref, store):
        """The streaming kernel's choice for this pass (``_stream_softmin``): read the absorbed cost, or (``store``:
        at the previous step's temperature) store it anchored on the rounded reference (its rows) and summed
        potential (its columns)."""
        row = anchors.setdefault("row site", site) == site  # the row pass runs first; the column pass reads C^T
        alpha, beta = anchors["weights"]
        w_cols = beta if row else alpha
        q = torch.where(w_cols > -math.inf, (h - w_cols) * eps, torch.zeros_like(h))
        keys = ("rows", "columns") if row else ("columns", "rows")
        a, b = (anchors.setdefault(key, torch.full_like(v, math.nan)) for key, v in zip(keys, (ref, q)))
        gap = torch.maximum(torch.where(mask, (ref - a).abs(), 0.0).amax(1),
                            torch.where(w_cols > -math.inf, (q - b).abs(), 0.0).amax(1))
        absorbed = anchors.get("anchored", False) & (gap / eps / math.log(2) < STREAM_DRIFT)
        if store:
            a[~absorbed], b[~absorbed] = ref[~absorbed].float().double(), q[~absorbed].float().double()
            anchors["anchored"] = True
        for k, value in enumerate(absorbed.tolist()):
            self.absorbed.setdefault((self._solves - 1, k), []).append(value)

    def _record(self, C, h, eps, mask, ref):
        m = ((h.unsqueeze(1) + (ref.unsqueeze(2) - C) / eps).amax(2) / math.log(2)).abs()
        m = torch.where(mask, m, torch.zeros_like(m))
        rows = C.shape[1]
        block = rows if self.resident else STREAM_BLOCK
        worst = torch.nn.functional.pad(m, (0, -rows % block)).unflatten(1, (-1, block)).amax(2)
        for b, blocks in enumerate((worst < self.near).tolist()):
            self.sequences.setdefault((self._solves - 1, b), []).extend(blocks)


def measure(setting: str, B: int, N: int, M: int, D: int) -> Decisions:
    """The decisions of one forward of the loss at a benchmark point (``benchmarks.providers``)."""
    s = SETTINGS[setting]
    x, y = make_inputs(B, N, M, D, dtype=torch.float64)
    decisions = Decisions(s.eps, chosen_tile(max(N, M)) is not None)
    with decisions.record():
        otfast.sinkhorn_loss(x, y, backend="torch", **s.otfast_kwargs())
    return decisions


def _point(text: str) -> tuple[str, int, int, int, int]:
    try:
        name, *dims = text.split(",")
        b, n, m, d = (int(v) for v in dims)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is SETTING,B,N,M,D, got {text!r}") from None
    if name not in SETTINGS:
        raise argparse.ArgumentTypeError(f"unknown setting {name!r} (one of {', '.join(SETTINGS)})")
    return name, b, n, m, d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", type=_point, action="append", help="SETTING,B,N,M,D (default: the goal points)")
    args = parser.parse_args(argv)
    print(f"{'point':30} {'fast decisions':>14} {'one sweep':>10} {'fast passes':>11} {'absorbed':>9}")
    for point in args.point or POINTS:
        d = measure(*point)
        absorbed = f"{d.absorbed_passes / d.fast_passes:.1%}" if d.fast_passes else "-"
        print(f"{','.join(map(str, point)):30} {d.total:>14} {d.one_sweep / max(d.total, 1):>10.1%} "
              f"{d.fast_passes or '-':>11} {absorbed:>9}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
