"""Device launches per loss call: how many kernels one forward and one backward of ``sinkhorn_loss`` issue.

Usage::

    python -m benchmarks.launches [--device cpu|cuda] [--backend triton] [--shape B,N,M,D ...]

Each launch costs a few microseconds on a GPU however little it computes. The loss runs with the harness's
settings (sqeuclidean, blur 0.05, scaling 0.5, debiased, ``check_inputs=False``; the last padding tokens of
x masked), once to warm up and once under ``torch.profiler``:

- on CUDA: the profiler's CUDA kernel events (``benchmarks/gpu_suite.sh`` runs it; no GPU has yet);
- on a CPU it is what would be launched on a GPU: Triton launches (the kernels run under
  ``TRITON_INTERPRET=1``, which this script sets when no GPU is present) plus one per torch call that
  computes (top-level ``aten`` ops; views and allocations left out, conversions counted when they copy).

Nothing is written; the table goes to stdout. The default shapes take the resident regime (N, M <= 32; 40
and 44 too with triton >= 3.7, on the 64 tile, and with older tritons the streaming one) and the streaming one
(longer than 64).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

# Views, allocations and other ops that compute nothing on the device.
NO_LAUNCH = {"aten::" + name for name in (
    "empty empty_strided empty_like new_empty new_empty_strided view reshape _reshape_alias _unsafe_view as_strided "
    "alias detach detach_ unsqueeze squeeze expand t transpose permute select slice narrow unbind split chunk "
    "contiguous lift_fresh "
    "resolve_conj resolve_neg result_type is_nonzero broadcast_tensors size stride to _to_copy item "
    "_local_scalar_dense").split()}
TRITON = "triton launch"


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, n, m, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is B,N,M,D (four integers), got {text!r}") from None
    return b, n, m, d


def trace_interpreted_launches() -> None:
    """Route every interpreted Triton launch through a profiler range named ``TRITON`` and the kernel's name
    (once per process)."""
    import triton.runtime.interpreter as interp

    launch = interp.GridExecutor.__call__
    if getattr(launch, "traced", False):
        return

    def traced(self, *args, **kwargs):
        with torch.profiler.record_function(f"{TRITON} {self.fn.__name__}"):
            return launch(self, *args, **kwargs)

    traced.traced = True
    interp.GridExecutor.__call__ = traced


def profiled(fn, device: str) -> list:
    """The events of one call of ``fn()`` under ``torch.profiler`` (with its CUDA kernels on "cuda")."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda":
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof.events()


def launches(fn, device: str) -> collections.Counter:
    """Run ``fn()`` once under ``torch.profiler`` and count its launches on ``device`` ("cpu": Triton under
    the interpreter, with ``trace_interpreted_launches``, and torch calls that compute; "cuda": kernels)."""
    return collections.Counter("torch" if name == "torch" else "triton"
                               for name, _ in launch_events(profiled(fn, device), device))


def launch_events(events, device: str) -> list[tuple[str, float]]:
    """``(name, microseconds)`` of each launch among the profiler's ``events``: a Triton kernel by its name, any
    other as "torch". On "cuda" the kernels' device time; on "cpu" the host time of each interpreted Triton
    launch (``trace_interpreted_launches``) and of each top-level torch call that computes."""
    out = []
    if device == "cuda":
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                # otfast's Triton kernels are named _..._kernel; torch's carry a C++ signature
                triton = e.name.startswith("_") and e.name.endswith("_kernel") and " " not in e.name
                out.append((e.name if triton else "torch", e.time_range.elapsed_us()))
        return out
    for e in events:
        if e.name.startswith(TRITON):
            out.append((e.name[len(TRITON):].strip(), e.time_range.elapsed_us()))
        elif e.name.startswith("aten::") and not _nested(e) and (e.name not in NO_LAUNCH or _copies(e)):
            # one torch call, one kernel; a conversion or copy only when it copies
            out.append(("torch", e.time_range.elapsed_us()))
    return out


def _nested(e) -> bool:
    """Whether an event runs inside a Triton launch or another aten op (whose launch counts instead)."""
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith((TRITON, "aten::")):
            return True
        parent = parent.cpu_parent
    return False


def _copies(e) -> bool:
    return e.name == "aten::copy_" or any(_copies(c) for c in e.cpu_children)


def measure(shape: tuple[int, int, int, int], backend: str, device: str) -> dict:
    """``{"forward": Counter, "backward": Counter}`` of launches for one loss call at ``shape``."""
    import otfast

    b, n, m, d = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen).to(device).requires_grad_()
    y = torch.randn(b, m, d, generator=gen).to(device).requires_grad_()
    mask_x = torch.ones(b, n, dtype=torch.bool, device=device)
    mask_x[:, -max(1, n // 8):] = False
    mask_y = torch.ones(b, m, dtype=torch.bool, device=device)

    def forward():
        return otfast.sinkhorn_loss(x, y, mask_x, mask_y, blur=0.05, scaling=0.5, backend=backend,
                                    check_inputs=False)

    forward().backward()
    out = {"forward": launches(forward, device)}
    loss = forward()
    out["backward"] = launches(loss.backward, device)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="triton", help="an otfast backend (default triton)")
    parser.add_argument("--shape", type=_shape, action="append",
                        help="B,N,M,D (repeatable; default 8,24,28,64, 8,40,44,64 and 8,72,76,64)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        trace_interpreted_launches()
    shapes = args.shape or [(8, 24, 28, 64), (8, 40, 44, 64), (8, 72, 76, 64)]
    print(f"launches per sinkhorn_loss call, backend {args.backend}, device {args.device} "
          f"({'profiler CUDA kernels' if args.device == 'cuda' else 'Triton launches + torch calls that compute'})")
    print(f"{'B,N,M,D':>14} {'forward triton':>14} {'forward torch':>13} {'backward triton':>15} "
          f"{'backward torch':>14} {'total':>6}")
    for shape in shapes:
        c = measure(shape, args.backend, args.device)
        total = sum(c["forward"].values()) + sum(c["backward"].values())
        print(f"{','.join(map(str, shape)):>14} {c['forward']['triton']:>14} {c['forward']['torch']:>13} "
              f"{c['backward']['triton']:>15} {c['backward']['torch']:>14} {total:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
