"""Where a goal point's time goes: device time per kernel, time per update, and growth with the batch.

Usage::

    python -m benchmarks.breakdown [--device cuda|cpu] [--backend triton] [--point SETTING,MODE,B,N,M ...]
                                   [--dim D] [--repeats R] [--json FILE]

``benchmarks.report --goals`` says how far each goal point is from its goal; this says why, so that the next
kernel change goes where the time is. For each point (the five goal points of ``benchmarks.report`` by
default; fp32, D = 768, ``providers.make_inputs``), with ``otfast.sinkhorn_loss``:

- **kernels**: one forward, and for a fwd+bwd point one backward, under ``torch.profiler``: time per kernel,
  otfast's Triton kernels by name and every other kernel together as "torch" (``launches.launch_events``:
  device time on CUDA; on a CPU the host time of the interpreter's launches and of torch's top-level calls,
  which shows the names, not the speed);
- **updates**: the forward's p50 at the setting's updates and, for the fixed setting, again with a quarter of
  its iterations: the slope is the time of one update (both passes of every problem) and the intercept what
  does not repeat (centring, cost, launches, the last extrapolation). The annealed setting's count depends on
  the data: its row gives the p50 over its updates, an upper bound of one update's time;
- **batch**: the forward's p50 at B / 4 (where B >= 4) and 4 B pairs of the same lengths, over B's. A ratio
  near 1 at 4 B means each program's latency sets the time and the GPU has room; near 4, the GPU is full.

Nothing is written but the table (stdout) and ``--json``'s file. ``benchmarks/gpu_suite.sh`` runs it after
the goal points.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from .launches import launch_events, profiled, trace_interpreted_launches
from .providers import SETTINGS, make_inputs
from .report import D_MODEL, GOAL_POINTS
from .timing import measure

UPDATES_FRACTION = 4  # the fixed setting's second forward runs n_iters / UPDATES_FRACTION iterations
BATCH_FACTOR = 4


def _point(text: str) -> tuple[str, str, int, int, int]:
    parts = text.split(",")
    if len(parts) != 5 or parts[0] not in SETTINGS or parts[1] not in ("forward", "fwd+bwd"):
        raise argparse.ArgumentTypeError(f"a point is SETTING,MODE,B,N,M with SETTING in {', '.join(SETTINGS)} and "
                                         f"MODE forward or fwd+bwd, got {text!r}")
    try:
        b, n, m = (int(v) for v in parts[2:])
    except ValueError:
        raise argparse.ArgumentTypeError(f"B, N and M of a point are integers, got {text!r}") from None
    if min(b, n, m) < 1:
        raise argparse.ArgumentTypeError(f"B, N and M of a point are at least 1, got {text!r}")
    return parts[0], parts[1], b, n, m


def per_update(t_full: float, n_full: int, t_part: float, n_part: int) -> tuple[float, float]:
    """``(time of one update, time that does not repeat)`` of the line through two (updates, time) points."""
    if n_full == n_part:
        raise ValueError(f"two different update counts are needed, got {n_full} twice")
    slope = (t_full - t_part) / (n_full - n_part)
    return slope, t_full - slope * n_full


def kernel_times(fn, device: str) -> dict[str, float]:
    """Milliseconds per kernel name (``launch_events``) of one call of ``fn()``, the largest first."""
    total = collections.Counter()
    for name, us in launch_events(profiled(fn, device), device):
        total[name] += us / 1e3
    return dict(total.most_common())


def _call(backend, setting, x, y):
    import otfast

    return otfast.sinkhorn_loss(x, y, reduction="none", backend=backend, **setting.otfast_kwargs())


def _forward_ms(backend: str, setting, x, y, device: str, repeats: int) -> float:
    def call():
        with torch.no_grad():
            _call(backend, setting, x, y)
    return measure(call, device, warmup=1, repeats=repeats, min_repeats=min(3, repeats), budget_s=2.0).p50


def measure_point(point: tuple, *, backend: str, device: str, dim: int, repeats: int) -> dict:
    """The three measurements above for one ``(setting, mode, B, N, M)`` point, as one JSON-ready dict."""
    setting_name, mode, B, N, M = point
    setting = SETTINGS[setting_name]
    x, y = make_inputs(B, N, M, dim, device=device)
    row = dict(setting=setting_name, mode=mode, B=B, N=N, M=M, D=dim, backend=backend, device=device)

    if mode == "fwd+bwd":  # the first call compiles (on a GPU) and is left out
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        _call(backend, setting, xg, yg).sum().backward()
        holder = {}
        row["forward_kernels_ms"] = kernel_times(lambda: holder.update(loss=_call(backend, setting, xg, yg).sum()),
                                                 device)
        row["backward_kernels_ms"] = kernel_times(holder["loss"].backward, device)
    else:
        with torch.no_grad():
            _call(backend, setting, x, y)
            row["forward_kernels_ms"] = kernel_times(lambda: _call(backend, setting, x, y), device)

    updates = len(setting.eps_list(x, y)) + 2
    full = _forward_ms(backend, setting, x, y, device, repeats)
    row.update(updates=updates, forward_ms=full)
    if setting.scaling is None and setting.n_iters >= UPDATES_FRACTION:
        fewer = dataclasses.replace(setting, n_iters=setting.n_iters // UPDATES_FRACTION)
        part = _forward_ms(backend, fewer, x, y, device, repeats)
        slope, intercept = per_update(full, updates, part, fewer.n_iters + 2)
        row.update(forward_ms_fewer=part, updates_fewer=fewer.n_iters + 2, update_us=slope * 1e3,
                   once_ms=intercept)
    else:
        row["update_us_at_most"] = full / updates * 1e3

    ratios = {}
    for b in (B // BATCH_FACTOR, B * BATCH_FACTOR):
        if b >= 1 and b != B:
            xb, yb = make_inputs(b, N, M, dim, device=device)
            ratios[str(b)] = _forward_ms(backend, setting, xb, yb, device, repeats) / full
    row["batch_ratio"] = ratios
    return row


def _format(row: dict) -> str:
    kernels = " ".join(f"{name} {ms:.3g}" for name, ms in row["forward_kernels_ms"].items())
    text = [f"{row['setting']} {row['mode']} B={row['B']} N={row['N']} M={row['M']} D={row['D']}",
            f"  forward kernels (ms): {kernels}"]
    if "backward_kernels_ms" in row:
        kernels = " ".join(f"{name} {ms:.3g}" for name, ms in row["backward_kernels_ms"].items())
        text.append(f"  backward kernels (ms): {kernels}")
    if "update_us" in row:
        text.append(f"  forward {row['forward_ms']:.3g} ms over {row['updates']} updates, "
                    f"{row['forward_ms_fewer']:.3g} ms over {row['updates_fewer']}: {row['update_us']:.3g} us per "
                    f"update, {row['once_ms']:.3g} ms once")
    else:
        text.append(f"  forward {row['forward_ms']:.3g} ms over {row['updates']} updates: at most "
                    f"{row['update_us_at_most']:.3g} us per update")
    ratios = ", ".join(f"B={b}: {r:.2f}" for b, r in row["batch_ratio"].items())
    text.append(f"  forward time over B={row['B']}'s: {ratios}")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="triton", help="an otfast backend (default triton)")
    parser.add_argument("--point", type=_point, action="append",
                        help="SETTING,MODE,B,N,M (repeatable; default the five goal points)")
    parser.add_argument("--dim", type=int, default=D_MODEL, help=f"features D (default {D_MODEL})")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per forward p50 (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.dim < 1 or args.repeats < 1:
        parser.error("--dim and --repeats are at least 1")
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        trace_interpreted_launches()
    rows = []
    for point in args.point or GOAL_POINTS:
        rows.append(measure_point(point, backend=args.backend, device=args.device, dim=args.dim,
                                  repeats=args.repeats))
        print(_format(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
