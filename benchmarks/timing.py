"""Wall-clock timing and the run's environment (device, versions, commit), shared by the report and step CLIs."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Percentiles of the measured calls, in milliseconds, and the peak extra memory.

    Attributes:
        p20, p50, p80: percentiles of the per-call wall time (CUDA-synchronised on GPU).
        repeats: measured calls (after warm-up).
        peak_mem_mb: on CUDA, ``torch.cuda.max_memory_allocated`` during one call minus what was allocated
            before it; None on CPU (torch's CPU allocator exposes no peak counter). What was allocated before
            includes the warm-up calls' leftovers, the inputs' ``.grad`` among them, so the gradients a
            fwd+bwd call writes are not counted (for every provider alike).
    """

    p20: float
    p50: float
    p80: float
    repeats: int
    peak_mem_mb: float | None


def synchronize(device: str) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, *, warmup: int = 1, repeats: int = 10, min_repeats: int = 3,
            budget_s: float = 5.0) -> Timing:
    """Time ``fn`` after ``warmup`` calls: ``repeats`` calls, fewer (at least ``min_repeats``) past ``budget_s``.

    Args:
        fn: the call to time (its result is dropped).
        device: "cpu" or "cuda".
        warmup, repeats, min_repeats: call counts.
        budget_s: stop adding calls once the measured calls took this long in total.

    Returns:
        ``Timing``.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    peak = None
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times: list[float] = []
    total = 0.0
    while len(times) < repeats and (len(times) < min_repeats or total < budget_s):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        total += times[-1]
    p20, p50, p80 = (float(np.percentile(times, q)) * 1e3 for q in (20, 50, 80))
    return Timing(p20, p50, p80, len(times), peak)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with its core count and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions() -> str:
    """``name=version`` of every library compared (or "-" where not installed), ``;``-separated."""
    out = [f"python={platform.python_version()}"]
    for dist in ("torch", "otfast", "pot", "geomloss", "flash-sinkhorn", "triton", "pykeops", "transformers"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=-")
    return ";".join(out)


def commit() -> str:
    """``OTFAST_COMMIT`` if set, else the repository's short HEAD (``+dirty`` with uncommitted changes)."""
    if os.environ.get("OTFAST_COMMIT"):
        return os.environ["OTFAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "otfast", "kernels", "benchmarks"],
                               cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def load_average() -> float | None:
    """The host's 1-minute load average (a noise indicator: other processes share the cores)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
