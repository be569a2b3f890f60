"""sm_90 resource check of every Triton kernel configuration the launchers can choose, without a GPU.

Each configuration from ``otfast.kernels.triton.configs.configs()`` is compiled ahead of time for
``GPUTarget("cuda", 90, 32)``; ``cuobjdump --dump-resource-usage`` (shipped with triton) reads registers,
shared memory and stack frame from the cubin, and ``ptxas -v`` on the PTX reads the spill stores and loads.
Prints one table row per configuration and exits 1 if any configuration spills.

    python -m otfast.kernels.triton.resources [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

_INTS = ("N", "M", "D")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton ({path})")
    return path


def _signature(fn, constexprs: dict, float64_pointers: frozenset) -> dict:
    """Triton type strings from the kernels' naming convention: UPPER = pointer (float64 when listed in
    ``float64_pointers``, int32 for ITERS, else fp32), s*/n_*/N/M/D = i32, other scalars fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INTS or name.startswith(("s", "n_")):
            sig[name] = "i32"
        elif name[0].isupper():
            sig[name] = "*i32" if name == "ITERS" else "*fp64" if name in float64_pointers else "*fp32"
        else:
            sig[name] = "fp32"
    return sig


def check(config: tuple[str, dict, int]) -> dict:
    """Compile one configuration for sm_90 and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    from otfast.kernels.triton import sinkhorn as K
    from otfast.kernels.triton.configs import FP_FUSION, NUM_STAGES

    name, constexprs, warps = config
    fn = getattr(K, name)
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, constexprs, K.FLOAT64_POINTERS),
                                    constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": NUM_STAGES, "enable_fp_fusion": FP_FUSION})
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        with open(ptx, "w") as fh:
            fh.write(compiled.asm["ptx"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        ptxas = subprocess.run([_tool("ptxas-blackwell"), "-v", "-arch=sm_90a", ptx, "-o",
                                os.path.join(tmp, "o.cubin")], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas.stdout + ptxas.stderr)
    if not fields or not spills:
        raise RuntimeError(f"could not read the resource usage of {name}:\n{usage}\n{ptxas.stderr}")
    return dict(kernel=name, constexprs=constexprs, warps=warps, regs=int(fields["REG"]),
                shared=int(fields["SHARED"]), stack=int(fields["STACK"]), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    args = parser.parse_args(argv)
    from otfast.kernels.triton.configs import configs

    todo = configs()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(check, todo))
    print(f"{'kernel':28} {'constexprs':72} {'warps':>5} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}")
    bad = 0
    for r in rows:
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        spilled = r["spill_stores"] or r["spill_loads"]
        bad += bool(spilled)
        print(f"{r['kernel']:28} {consts:72} {r['warps']:>5} {r['regs']:>4} {r['shared']:>6} {r['stack']:>5} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5}{'  SPILLS' if spilled else ''}")
    print(f"{len(rows)} configurations compiled for sm_90, {bad} spilling")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
