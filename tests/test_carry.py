"""``benchmarks.carry``: wheels written again small enough to travel to a GPU machine, and still wheels pip installs."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from benchmarks.carry import slim

ENTRY_POINTS = """[console_scripts]
proton = triton.profiler.proton:main

[triton.backends]
amd = triton.backends.amd
nvidia = triton.backends.nvidia
"""


@pytest.fixture
def library(tmp_path):
    """A shared library with debug sections and a symbol table, as libtriton.so and POT's modules come."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "lib.c").write_text("int answer(void) { return 42; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-g", "-o", str(tmp_path / "lib.so"), str(tmp_path / "lib.c")], check=True)
    return (tmp_path / "lib.so").read_bytes()


# How triton's NVIDIA backend picks the ptxas for an architecture: triton 3.8's rule and 3.9's
GET_PTXAS = {
    "ptxas": """import functools
from triton import knobs


def get_ptxas(arch: int) -> knobs.NvidiaTool:
    return knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
""",
    "ptxas-blackwell": """def get_ptxas(arch: int) -> knobs.NvidiaTool:
    if arch < 90:
        return knobs.nvidia.ptxas
    # The ptxas-blackwell name is misleading; keep it until legacy ptxas is removed.
    return knobs.nvidia.ptxas_blackwell
""",
}


def _wheel(path, library, get_ptxas):
    files = {
        "triton/__init__.py": ("__version__ = '9.9.1'\n", 0o644),
        "triton/_C/libtriton.so": (library, 0o755),
        "triton/_C/libproton.so": ("proton", 0o755),
        "triton/backends/amd/compiler.py": ("", 0o644),
        "triton/backends/nvidia/compiler.py": (get_ptxas, 0o644),
        "triton/backends/nvidia/include/cuda.h": ("", 0o644),
        "triton/backends/nvidia/bin/ptxas": ("#!/bin/sh\n", 0o755),
        "triton/backends/nvidia/bin/ptxas-blackwell": ("#!/bin/sh\n", 0o755),
        "triton/backends/nvidia/lib/libdevice.10.bc": ("bc", 0o644),
        "triton/backends/nvidia/lib/cupti/libcupti.so": ("cupti", 0o755),
        "triton/plugins/libTritonPluginsTestLib.so": ("plugin", 0o755),
        "triton/FileCheck": ("filecheck", 0o755),
        "triton-9.9.1.dist-info/METADATA": ("Metadata-Version: 2.1\nName: triton\nVersion: 9.9.1\n", 0o644),
        "triton-9.9.1.dist-info/WHEEL": ("Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n",
                                         0o644),
        "triton-9.9.1.dist-info/entry_points.txt": (ENTRY_POINTS, 0o644),
        "triton-9.9.1.dist-info/RECORD": ("triton/__init__.py,,\n", 0o644),
    }
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("triton/"), "")
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16  # a regular file, as wheels record it
            z.writestr(info, data)
    return path


@pytest.mark.parametrize("ptxas", list(GET_PTXAS))
def test_a_slim_triton_keeps_what_the_gpu_runtime_loads_and_installs(tmp_path, library, ptxas):
    """The Python package and its metadata (the version ``configs`` reads), the ptxas the NVIDIA backend runs
    for sm_90 by its own rule (triton 3.8's ``ptxas``, 3.9's ``ptxas-blackwell``; still executable),
    libdevice and headers, libtriton.so without debug sections or symbol table but still loadable, and a
    RECORD whose hashes are the files'; not the other ptxas, the AMD backend (nor its entry point, which
    triton would import), proton, CUPTI, plugins or FileCheck. pip installs it, and in a folder ahead of
    site-packages it is the triton Python finds."""
    out = slim(_wheel(tmp_path / "triton-9.9.1-cp311-cp311-linux_x86_64.whl", library, GET_PTXAS[ptxas]),
               tmp_path / "out" / "triton-9.9.1-cp311-cp311-linux_x86_64.whl")
    with zipfile.ZipFile(out) as z:
        names = sorted(z.namelist())
        assert names == sorted([
            "triton-9.9.1.dist-info/METADATA", "triton-9.9.1.dist-info/WHEEL", "triton-9.9.1.dist-info/RECORD",
            "triton-9.9.1.dist-info/entry_points.txt", "triton/__init__.py", "triton/_C/libtriton.so",
            f"triton/backends/nvidia/bin/{ptxas}", "triton/backends/nvidia/compiler.py",
            "triton/backends/nvidia/include/cuda.h", "triton/backends/nvidia/lib/libdevice.10.bc"])
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        record = z.read("triton-9.9.1.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = z.read(name)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
        assert sorted(line.split(",")[0] for line in record) == names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), str(out)], check=True)
    assert os.access(site / "triton/backends/nvidia/bin" / ptxas, os.X_OK)
    assert (site / "triton-9.9.1.dist-info/entry_points.txt").read_text() == ENTRY_POINTS.replace(
        "amd = triton.backends.amd\n", "")
    lib = (site / "triton/_C/libtriton.so").read_bytes()
    assert b".debug_info" in library and b".symtab" in library
    assert len(lib) < len(library) and b".debug_info" not in lib and b".symtab" not in lib
    assert ctypes.CDLL(str(site / "triton/_C/libtriton.so")).answer() == 42
    found = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, triton; "
                            "print(m.version('triton'), triton.__version__, triton.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["9.9.1", "9.9.1", str(site / "triton" / "__init__.py")]


def test_a_file_without_record_is_refused(tmp_path):
    wheel = tmp_path / "not-a-wheel.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("triton/__init__.py", "")
    with pytest.raises(ValueError, match="has no .dist-info/RECORD: not a wheel"):
        slim(wheel, tmp_path / "out.whl")
