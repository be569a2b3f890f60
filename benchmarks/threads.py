"""The OpenMP wait policy on a busy machine: the CPU kernel's loss + gradient with 1 thread, and with 2 threads
whose waiting threads spin (OpenMP's default) or sleep (``OMP_WAIT_POLICY=PASSIVE``, what ``./dev``, ``train`` and
``benchmarks`` set), each in a fresh process (libgomp reads the policy once, when torch is imported), settings
interleaved over rounds, optionally beside busy processes of our own that keep cores taken.

    python -m benchmarks.threads [--rounds 3] [--busy 1] [--shape 32,40,40,768] [--steps 6]

Prints, per setting, the range over rounds of the median step time (ms) and the spin count libgomp reports
(``GOMP_SPINCOUNT``: 0 when waiting threads sleep).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys

# (name, threads, OMP_WAIT_POLICY or None for OpenMP's default)
SETTINGS = (("1 thread", 1, "PASSIVE"), ("2 threads, spinning (OpenMP's default)", 2, None),
            ("2 threads, passive", 2, "PASSIVE"))

# One process's measurement: torch first, so that its OpenMP runtime takes the policy of the environment
# (``benchmarks`` would set PASSIVE where none is set), then the median of STEPS loss + gradient calls.
WORKER = """
import statistics, sys, time
import torch
torch.set_num_threads({threads})
import otfast
from benchmarks.providers import SETTINGS, make_inputs
x, y = make_inputs({B}, {N}, {M}, {D})
kw = dict(SETTINGS["fixed"].otfast_kwargs(), backend="cpu")
times = []
for step in range({steps} + 2):
    u = x.clone().requires_grad_()
    start = time.perf_counter()
    otfast.sinkhorn_loss(u, y, **kw).backward()
    times.append(time.perf_counter() - start)
print(statistics.median(times[2:]) * 1e3)
"""


def measure(threads: int, policy: str | None, shape: tuple[int, ...], steps: int) -> tuple[float, int | None]:
    """``(median ms, GOMP_SPINCOUNT or None where the runtime is not libgomp)`` of one fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **({"OMP_WAIT_POLICY": policy} if policy else {}))
    B, N, M, D = shape
    proc = subprocess.run([sys.executable, "-c", WORKER.format(threads=threads, B=B, N=N, M=M, D=D, steps=steps)],
                          capture_output=True, text=True, env=env, check=True)
    spins = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    return float(proc.stdout.split()[-1]), int(spins.group(1)) if spins else None


def _busy() -> None:
    while True:
        pass


def run(rounds: int, busy: int, shape: tuple[int, ...], steps: int) -> dict[str, list[tuple[float, int | None]]]:
    """Every setting once per round (interleaved), beside ``busy`` busy processes."""
    loops = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(busy)]
    for loop in loops:
        loop.start()
    try:
        out: dict[str, list[tuple[float, int | None]]] = {name: [] for name, _, _ in SETTINGS}
        for _ in range(rounds):
            for name, threads, policy in SETTINGS:
                out[name].append(measure(threads, policy, shape, steps))
        return out
    finally:
        for loop in loops:
            loop.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="busy processes of our own beside the measurement")
    parser.add_argument("--shape", default="32,40,40,768", help="B,N,M,D")
    parser.add_argument("--steps", type=int, default=6, help="timed calls per process (after 2)")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"CPU kernel fwd+bwd, fixed setting, B,N,M,D = {args.shape}, {args.busy} busy process(es), "
          f"{args.rounds} rounds, median of {args.steps} calls")
    for name, results in run(args.rounds, args.busy, shape, args.steps).items():
        times = [ms for ms, _ in results]
        print(f"{name:40} {min(times):8.1f}-{max(times):8.1f} ms   GOMP_SPINCOUNT {results[0][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
