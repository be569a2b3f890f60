"""How many of the Triton kernels' fast passes sum their exponents in one sweep, at the goal points.

Usage::

    python -m benchmarks.sweeps [--point SETTING,B,N,M,D ...]

A fast pass forms its exponents relative to the row's previous update and sums them at once when every
valid row of the tile (resident kernel: the pair; streaming: a block of ``STREAM_BLOCK`` rows) has its max
within ``NEAR`` binary orders of that reference; otherwise it sweeps the tile again (``sinkhorn._near``).
No GPU counter says which path ran, so this replays the loss (the torch backend, float64, the points of
``benchmarks.providers.make_inputs``) and takes each soft-min's exponents relative to the reference the
kernels use: a float64 prediction of the kernels' fp32 decision, exact but for maxima within rounding of
``NEAR`` (``tests/test_triton_interpreter.py`` checks it against the interpreted kernels' own decisions).
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
from otfast.kernels.triton.configs import RESIDENT_MAX, STREAM_BLOCK

POINTS = (("fixed", 64, 64, 64, 768), ("paper", 24, 48, 48, 768), ("fixed", 64, 128, 128, 768),
          ("fixed", 4, 512, 512, 768), ("paper", 1, 2048, 2048, 768))


class Decisions:
    """The fast passes' decisions (one per pair and pass on resident tiles, one per row block when streaming:
    ``resident`` when max(N, M) <= ``RESIDENT_MAX``), filled by ``record``; eps the final temperature.

    ``sequences[(k, b)]``: whether each decision of pair b in the k-th solve of the block took one sweep, in
    the kernels' order (passes in turn, row pass before column pass, row blocks in order). No ``tol``: the
    torch backend's loop updates every pair until all have stopped, the kernels stop each on its own."""

    def __init__(self, eps: float, resident: bool) -> None:
        from otfast.kernels.triton.sinkhorn import NEAR, PRECISE_RATIO

        self.near, self.threshold, self.resident = NEAR.value, eps * PRECISE_RATIO.value, resident
        self.sequences: dict[tuple[int, int], list[bool]] = {}
        self._solves = 0

    @property
    def one_sweep(self) -> int:
        return sum(sum(seq) for seq in self.sequences.values())

    @property
    def total(self) -> int:
        return sum(len(seq) for seq in self.sequences.values())

    @contextmanager
    def record(self):
        """Within this block every torch-backend solve records its fast passes' decisions."""
        solve, softmin = reference.solve, reference.softmin
        previous = {}

        def solve_fresh(*args, **kwargs):
            previous.clear()  # each solve starts from its own zero potentials
            self._solves += 1
            return solve(*args, **kwargs)

        def softmin_counted(C, h, eps, damping, mask):
            out = softmin(C, h, eps, damping, mask)
            site = id(C)  # the row pass reads C, the column pass its transpose: two objects alive in the solve
            prev, prev_damping = previous.get(site, (torch.zeros_like(out), 1.0))
            ref = prev / prev_damping  # the previous update, undamped at its own temperature
            previous[site] = out, damping
            if eps <= self.threshold:
                self._record(C, h, eps, mask, ref)
            return out

        with mock.patch.object(reference, "solve", solve_fresh), \
                mock.patch.object(reference, "softmin", softmin_counted):
            yield self

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
    decisions = Decisions(s.eps, max(N, M) <= RESIDENT_MAX)
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
    print(f"{'point':30} {'fast decisions':>14} {'one sweep':>10}")
    for point in args.point or POINTS:
        d = measure(*point)
        print(f"{','.join(map(str, point)):30} {d.total:>14} {d.one_sweep / max(d.total, 1):>10.1%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
