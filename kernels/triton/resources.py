"""sm_90 resource check of every Triton kernel configuration the launchers can choose, without a GPU.

Each configuration from ``otfast.kernels.triton.configs.configs()`` is compiled ahead of time for
``GPUTarget("cuda", 90, 32)``; ``cuobjdump --dump-resource-usage`` (shipped with triton) reads registers,
shared memory and stack frame from the cubin, and the log of triton's own ``ptxas -v`` (with triton's
flags; ``TRITON_DUMP_PTXAS_LOG``, compiled afresh: ``TRITON_ALWAYS_COMPILE``) the spill stores and loads.
Prints one table row per configuration (shared memory: what triton's launch asks for, and the cubin's static part,
in which cuobjdump counts the 1 KB the system reserves per program), with how many of its programs an sm_90 SM
holds at once (``programs_per_sm``), and exits 1 if any configuration spills or does not fit an SM.

``--sass`` prints instead, for the solvers' and the backward's configurations (fp32 points, no tol), the
static instruction counts of every loop of the compiled SASS (``cuobjdump -sass``; a loop is the range of
a backward branch): exponentials (MUFU.EX2), logarithms, barriers, shared-memory loads and stores, warp
shuffles, fp32 and fp64 arithmetic, fp32/fp64 conversions, tensor-core instructions (DMMA, HMMA, HGMMA),
global loads and stores, and of those loads the async copies to shared memory of a software-pipelined loop
(LDGSTS), per thread and per trip of the loop. The iteration loop of the resident kernel
is the one with 2 N M / threads exponentials (16 at 32 x 32 and 4 warps); the counts show what one
Sinkhorn iteration costs beside its exponentials, without a GPU. A loop's count holds every branch in it;
``--common-path`` counts the fast passes' common path: it compiles a copy of the kernels in which the
branch that sweeps again (``if not _near(...)``, taken only far from the reference) does one fp32 add.

    python -m otfast.kernels.triton.resources [--jobs 2] [--sass [--common-path]]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

_INTS = ("N", "M", "D", "FIRST", "TERMS", "phase")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton ({path})")
    return path


def _signature(fn, constexprs: dict, float64_pointers: frozenset, points: str | None) -> dict:
    """Triton type strings from the kernels' naming convention: UPPER = pointer (the points X, Y and the
    backward's U_*, OUT_* in ``points``, float64 when None; float64 when listed in ``float64_pointers``,
    int32 for ITERS and SYNC, uint8 for the bool masks MASK_*, else fp32), s*/n_*/N/M/D/FIRST/TERMS/phase = i32,
    other scalars fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INTS or name.startswith(("s", "n_")):
            sig[name] = "i32"
        elif name in ("X", "Y") or name.startswith(("U_", "OUT_")):
            sig[name] = f"*{points or 'fp64'}"
        elif name[0].isupper():
            sig[name] = ("*i32" if name in ("ITERS", "SYNC") else "*u8" if name.startswith("MASK_")
                         else "*fp64" if name in float64_pointers else "*fp32")
        else:
            sig[name] = "fp32"
    return sig


def _compile(config, kernels=None):
    """Compile one configuration for sm_90 from ``kernels`` (a module; default ``otfast.kernels.triton.sinkhorn``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from otfast.kernels.triton import sinkhorn
    from otfast.kernels.triton.configs import COMPILE_OPTIONS

    K = kernels or sinkhorn
    fn = getattr(K, config.kernel)
    sig = _signature(fn, config.constexprs, K.FLOAT64_POINTERS, config.points)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=config.constexprs)
    options = dict(COMPILE_OPTIONS, num_warps=config.warps, maxnreg=config.maxnreg)  # None: ptxas's choice
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def check(config) -> dict:
    """Compile one configuration (``configs.Config``) for sm_90 and read its resource usage."""
    log = io.StringIO()
    with _environ(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
        compiled = _compile(config)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if not fields or not spills:
        raise RuntimeError(f"could not read the resource usage of {config.kernel}:\n{usage}\n{log.getvalue()}")
    # shared memory: what triton's launch asks for (dynamic) and the cubin's static part, where cuobjdump counts the
    # 1 KB the system reserves per program
    return dict(kernel=config.kernel, constexprs=config.constexprs, warps=config.warps, points=config.points,
                regs=int(fields["REG"]), shared=compiled.metadata.shared + int(fields["SHARED"]),
                stack=int(fields["STACK"]), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


@contextlib.contextmanager
def _environ(**values: str):
    """Environment variables set for the block (triton reads its knobs from them as it compiles)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


# An sm_90 SM (CUDA's occupancy rules for compute capability 9.0): its register file, allocated per warp in units
# of 256 registers; its warps and resident programs (thread blocks); its shared memory, 227 KiB of it for one
# program at most.
SM90 = dict(registers=65536, register_unit=256, warps=64, programs=32, shared=233472, shared_per_program=232448)


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """How many programs of one configuration an sm_90 SM holds at once (``SM90``): the least that its registers
    (``regs`` per thread), warps and shared memory (``shared`` bytes per program, the 1 KB the system reserves
    included) allow."""
    if shared > SM90["shared_per_program"]:
        return 0
    unit = SM90["register_unit"]
    per_warp = -(-regs * 32 // unit) * unit
    return min(SM90["registers"] // per_warp // warps, SM90["warps"] // warps, SM90["programs"],
               SM90["shared"] // shared)


# SASS opcodes counted by ``--sass``, in groups.
SASS_GROUPS = {
    "exp2": ("MUFU.EX2",), "log2": ("MUFU.LG2",), "barrier": ("BAR",), "lds": ("LDS",), "sts": ("STS",),
    "shuffle": ("SHFL",), "fp32": ("FADD", "FFMA", "FMUL", "FMNMX", "FSEL", "FSETP"),
    "fp64": ("DADD", "DFMA", "DMUL", "DSETP"), "convert": ("F2F",), "mma": ("DMMA", "HMMA", "HGMMA"),
    "ldg": ("LDG",), "stg": ("STG",), "async": ("LDGSTS",),
}


def common_path_source(source: str) -> str:
    """The kernels' source with the body of every ``if not _near(...)`` (the second sweep) replaced by
    ``c = c + 1.0``: the test, and the reduction it reads, stay in the compiled code (``--common-path``)."""
    out, skip, found = [], None, 0
    for line in source.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip is not None and (not line.strip() or indent > skip):
            continue
        skip = None
        out.append(line)
        if line.lstrip().startswith("if not _near("):
            out.append(" " * (indent + 4) + "c = c + 1.0")
            out.append("")
            skip, found = indent, found + 1
    if not found:
        raise ValueError("no `if not _near(...)` branch in the kernels' source")
    return "\n".join(out) + "\n"


def common_path_kernels(tmp: str):
    """A module compiled from ``common_path_source`` of the kernels (written under ``tmp``: triton reads its
    kernels' source from their file)."""
    from otfast.kernels.triton import sinkhorn

    path = os.path.join(tmp, "otfast_common_path_kernels.py")
    with open(sinkhorn.__file__) as src, open(path, "w") as dst:
        dst.write(common_path_source(src.read()))
    spec = importlib.util.spec_from_file_location("otfast_common_path_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sass_loops(config, kernels=None) -> list[dict]:
    """Static per-thread instruction counts of each loop of one configuration's SASS (``--sass``), compiled
    from ``kernels`` (see ``_compile``)."""
    compiled = _compile(config, kernels)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = sorted({(int(target, 16), addr) for addr, text in code
                    for target in re.findall(r"BRA(?:\.\w+)*\s+(?:\w+,\s*)?0x([0-9a-f]+)", text)
                    if int(target, 16) <= addr})
    out = []
    for start, end in loops:
        ops = [re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0] for addr, text in code if start <= addr <= end]
        counts = {group: sum(op.split(".")[0] in prefixes or op.startswith(prefixes) for op in ops)
                  for group, prefixes in SASS_GROUPS.items()}
        out.append(dict(start=start, instructions=len(ops), **counts))
    return out


def print_sass(configs: list, common_path: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        kernels = common_path_kernels(tmp) if common_path else None
        for config in configs:
            _print_loops(config, sass_loops(config, kernels))


def _print_loops(config, loops: list[dict]) -> None:
    print(f"{_describe(config.kernel, config.constexprs, config.points)} warps={config.warps}")
    print(f"  {'loop at':>8} {'instr':>6} " + " ".join(f"{g:>7}" for g in SASS_GROUPS))
    for loop in loops:
        print(f"  {loop['start']:#8x} {loop['instructions']:>6} " + " ".join(f"{loop[g]:>7}" for g in SASS_GROUPS))


def _describe(kernel: str, constexprs: dict, points: str | None) -> str:
    return " ".join([kernel, *(f"{k}={v}" for k, v in constexprs.items())] + ([f"points={points}"] if points else []))


def _counted(config) -> bool:
    """Whether ``--sass`` counts a configuration: the solvers and the backward for fp32 points and no tol; the
    resident kernel reading the points, the streaming kernel from each of its sources, the split kernel
    persistent on the packed cost."""
    consts = config.constexprs
    if consts.get("HAS_TOL") or config.points not in (None, "fp32"):
        return False
    if config.kernel == "_sinkhorn_resident_kernel":
        return consts["FROM_POINTS"]
    if config.kernel == "_sinkhorn_split_kernel":
        return consts["PERSISTENT"] and not consts["FROM_POINTS"]
    return config.kernel in ("_sinkhorn_streaming_kernel", "_grad_kernel")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--sass", action="store_true",
                        help="per-loop SASS instruction counts of the solvers (fixed eps, no tol) and the backward "
                             "instead")
    parser.add_argument("--common-path", action="store_true",
                        help="with --sass: without the second sweep of the fast passes (``common_path_source``)")
    args = parser.parse_args(argv)
    if args.common_path and not args.sass:
        parser.error("--common-path counts SASS instructions: it needs --sass")
    from otfast.kernels.triton.configs import configs

    todo = configs()
    if args.sass:
        print_sass([c for c in todo if _counted(c)], args.common_path)
        return 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(check, todo))
    print(f"{'kernel and constexprs':104} {'warps':>5} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11} "
          f"{'per SM':>6}")
    bad = unfit = 0
    for r in rows:
        spilled = r["spill_stores"] or r["spill_loads"]
        per_sm = programs_per_sm(r["regs"], r["warps"], r["shared"])
        bad += bool(spilled)
        unfit += not per_sm
        print(f"{_describe(r['kernel'], r['constexprs'], r['points']):104} {r['warps']:>5} {r['regs']:>4} "
              f"{r['shared']:>6} {r['stack']:>5} {r['spill_stores']:>5}/{r['spill_loads']:<5} {per_sm:>6}"
              f"{'  SPILLS' if spilled else ''}{'  DOES NOT FIT AN SM' if not per_sm else ''}")
    print(f"{len(rows)} configurations compiled for sm_90, {bad} spilling, {unfit} not fitting an SM")
    return 1 if bad or unfit else 0


if __name__ == "__main__":
    sys.exit(main())
