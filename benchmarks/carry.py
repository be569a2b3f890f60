"""The wheels a GPU machine without network needs, small enough to travel there.

What travels with a run on the GPU machines lent here is 64 MiB in all, and their image lacks POT, GeomLoss,
flash-sinkhorn and ``datasets`` (with ``dill``, ``multiprocess``, ``sacremoses``), and holds triton 3.6, which ships
no resident 64 tile (``configs.RESIDENT_TILES``). As published, those wheels do not fit: POT's is 33 MB (a 175 MB
extension module, 1 MB without its debug sections), triton's 200-290 MB. This fetches them for the GPU machine's
Python and writes each again into ``.whl/`` (same name, still a wheel pip installs):

- every shared object without its debug sections and local symbols (``strip --strip-unneeded``; triton's
  ``libtriton.so`` 500 MB to 190 MB);
- of triton, what a Hopper GPU's runtime never loads left out: the AMD backend (and its entry point, which triton
  would import), proton's and CUPTI's profiling libraries, the test and plugin libraries, FileCheck, and of its
  two ptxas the one it does not run for sm_90 (its own ``get_ptxas`` rule, read from the wheel: triton 3.7 and
  3.8 run ``ptxas``, CUDA 12.8-12.9; 3.9 runs ``ptxas-blackwell``, CUDA 13.4);
- ``RECORD`` written again for the files kept, and every file LZMA-compressed (which pip reads).

``bash benchmarks/gpu_suite.sh`` installs ``.whl/*.whl`` into a folder ahead of site-packages, so a carried triton
is the one every step runs under (its ``env`` step prints which)::

    python -m benchmarks.carry                    # the suite's packages, for Python 3.12 (the H200 image's)
    python -m benchmarks.carry --triton 3.9.0     # and triton 3.9.0 (55 MiB of the 64)
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pot", "geomloss", "flash-sinkhorn", "datasets", "dill", "multiprocess", "sacremoses")
LIMIT = 64 * 2**20  # what travels with a run, the working tree included
# What a Hopper GPU's runtime never loads, as path prefixes inside triton's wheel (and one of its ptxas: _hopper_ptxas)
LEFT_OUT = ("triton/backends/amd/", "triton/_C/libproton.so", "triton/backends/nvidia/lib/cupti",
            "triton/plugins/", "triton/instrumentation/", "triton/FileCheck")
PTXAS = ("ptxas", "ptxas-blackwell")
COMPILER = "triton/backends/nvidia/compiler.py"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _entry_points(text: str) -> str:
    """A wheel's entry points without the backends left out (triton imports every ``triton.backends`` entry)."""
    def kept(line: str) -> bool:
        backend = re.match(r"\s*\w+\s*=\s*triton\.backends\.(\w+)\s*$", line)
        return backend is None or not f"triton/backends/{backend.group(1)}/".startswith(LEFT_OUT)
    return "".join(filter(kept, text.splitlines(keepends=True)))


def _hopper_ptxas(compiler: str) -> str:
    """Which of ``PTXAS`` the NVIDIA backend's ``compiler`` source runs for sm_90: its ``get_ptxas(arch)``
    evaluated on 90, with the tools stood in for by their names."""
    tree = ast.parse(compiler)
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "get_ptxas")
    fn.returns, fn.args.args[0].annotation = None, None
    nvidia = types.SimpleNamespace(ptxas=PTXAS[0], ptxas_blackwell=PTXAS[1])
    namespace = {"knobs": types.SimpleNamespace(nvidia=nvidia)}
    exec(compile(ast.Module([fn], type_ignores=[]), COMPILER, "exec"), namespace)
    return namespace["get_ptxas"](90)


def _stripped(data: bytes, strip: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.so"
        path.write_bytes(data)
        subprocess.run([strip, "--strip-unneeded", str(path)], check=True)
        return path.read_bytes()


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def slim(wheel: Path, out: Path, strip: str = "strip") -> Path:
    """Write ``wheel`` again as ``out`` (see the module's docstring for what changes) and return ``out``.

    Raises:
        FileNotFoundError: ``strip`` (binutils) is not installed.
        ValueError: ``wheel`` has no ``*.dist-info/RECORD`` (not a wheel).
    """
    if shutil.which(strip) is None:
        raise FileNotFoundError(f"{strip!r} (binutils) is needed to take the shared objects' debug sections out")
    with zipfile.ZipFile(wheel) as z:
        record = next((n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)), None)
        if record is None:
            raise ValueError(f"{wheel} has no .dist-info/RECORD: not a wheel")
        hopper = _hopper_ptxas(z.read(COMPILER).decode()) if COMPILER in z.namelist() else None
        dropped = {record} | {f"triton/backends/nvidia/bin/{tool}" for tool in PTXAS if hopper not in (None, tool)}
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_LZMA) as dest:
            for info in z.infolist():
                if info.is_dir() or info.filename in dropped or info.filename.startswith(LEFT_OUT):
                    continue
                data = z.read(info)
                if data[:4] == b"\x7fELF" and re.search(r"\.so(\.|$)", info.filename):
                    data = _stripped(data, strip)
                elif info.filename.endswith(".dist-info/entry_points.txt"):
                    data = _entry_points(data.decode()).encode()
                member = zipfile.ZipInfo(info.filename, info.date_time)
                member.external_attr = info.external_attr
                dest.writestr(member, data, compress_type=zipfile.ZIP_LZMA)
                lines.append(_record_line(info.filename, data))
            dest.writestr(zipfile.ZipInfo(record, z.getinfo(record).date_time), "".join(lines) + f"{record},,\n",
                          compress_type=zipfile.ZIP_LZMA)
    return out


def download(requirements: list[str], python: str, folder: Path) -> list[Path]:
    """The wheels of ``requirements`` (no dependencies) for CPython ``python`` (e.g. "3.12") on x86-64 Linux."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", str(folder),
                    *requirements], check=True)
    return sorted(folder.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES),
                        help=f"requirements to carry (default: {' '.join(PACKAGES)})")
    parser.add_argument("--triton", default=None, metavar="VERSION", help="carry this triton too (e.g. 3.9.0)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12, the H200 image's)")
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="folder of the wheels (default .whl)")
    args = parser.parse_args(argv)
    requirements = args.packages + ([f"triton=={args.triton}"] if args.triton else [])
    with tempfile.TemporaryDirectory() as tmp:
        for wheel in download(requirements, args.python, Path(tmp)):
            out = slim(wheel, args.out / wheel.name)
            print(f"{out}: {wheel.stat().st_size / 2**20:.1f} MiB as published, {out.stat().st_size / 2**20:.1f} now")
    total = sum(path.stat().st_size for path in args.out.glob("*.whl"))
    print(f"{args.out}: {total / 2**20:.1f} MiB of wheels; a run carries {LIMIT // 2**20} MiB with the working tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
