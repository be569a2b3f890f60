"""The alignment harness end to end on a GPU: the tiny demo (``train/configs/tiny.yaml``) trained once per OT
backend, with bf16 autocast, checking that held-out retrieval lifts and timing the steps.

    python -m benchmarks.harness_gpu --out DIR [--backends triton,torch] [--mixed-precision bf16]

Each run writes its usual output folder under ``DIR/harness-<backend>``; this prints, per backend, retrieval
before and after, the steps and their rate from the first logged step on (``metrics.csv``: the steps before it
JIT-compile the kernels on a GPU, 10 s of the H200's first 30), and exits 1
when a run fails or lifts retrieval by less than ``MIN_LIFT``. GeomLoss is not a harness loss; its share of
the same step (``train.align.alignment_loss``) is what ``benchmarks.step`` measures. On a CPU,
``--backends torch --mixed-precision no`` runs the same check.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

MIN_LIFT = 0.5  # the demo goes from chance (~0.005) to ~0.98 on CPU
TINY = Path(__file__).resolve().parent.parent / "train" / "configs" / "tiny.yaml"


def steady_rate(folder: Path) -> float:
    """Steps per second of a run's ``metrics.csv`` between its first and last logged step (nan with fewer than two):
    the steps before the first, which include the JIT compiles, left out."""
    with (folder / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) < 2:
        return float("nan")
    first, last = rows[0], rows[-1]
    return (int(last["step"]) - int(first["step"])) / (float(last["elapsed"]) - float(first["elapsed"]))


def run(backend: str, out: Path, mixed_precision: str) -> dict:
    """One training run of the tiny demo with ``loss.backend = backend``; its ``metrics.json`` and its
    ``steady_rate``."""
    from train.align import train
    from train.config import load_config

    folder = out / f"harness-{backend}"
    cfg = load_config(TINY, ["--loss.backend", backend, "--train.mixed_precision", mixed_precision],
                      output_dir=str(folder))
    train(cfg)
    return dict(json.loads((folder / "metrics.json").read_text()), steady_rate=steady_rate(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs' outputs")
    parser.add_argument("--backends", default="triton,torch", help="comma-separated otfast backends")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"), help="autocast")
    args = parser.parse_args(argv)
    failed = 0
    for backend in args.backends.split(","):
        try:
            m = run(backend, args.out, args.mixed_precision)
        except Exception as exc:  # a backend failing is a result to report; the next one still runs
            print(f"{backend}: failed: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        lift = m["retrieval_after"] - m["retrieval_before"]
        ok = lift >= MIN_LIFT
        failed += not ok
        print(f"{backend}: retrieval {m['retrieval_before']:.3f} -> {m['retrieval_after']:.3f} (lift {lift:+.3f}, "
              f"{'ok' if ok else f'below {MIN_LIFT}'}), {m['steps']} steps, {m['steady_rate']:.1f} steps/s after the "
              "first logged step")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
