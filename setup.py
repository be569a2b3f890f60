"""Build script: the pure-Python package plus the optional pybind11 C++ CPU kernel.

``kernels/`` installs as ``otfast.kernels`` (a top-level ``kernels`` module would clash with the
unrelated PyPI package of that name).

The C++ kernel (``otfast.kernels.cpu._sinkhorn``) is optional: it is built with OpenMP when the compiler
supports it, without OpenMP (single-threaded) when it does not, and skipped with a warning when it
cannot be compiled at all; ``otfast.backends()["cpu"]`` then says why and ``auto`` uses torch. A
binary left in place by an earlier build is removed then, so that stale code never runs.
``OTFAST_REQUIRE_CPU_KERNEL=1`` turns the skip into an error (CI sets it: a kernel that does not
compile must fail the build, not fall back).
Never -ffast-math: it assumes no infinities, and padding is -inf in every log-sum-exp. The flags used
instead are value-safe: -fno-trapping-math (no FP exceptions are observed, lets selects vectorise) and
-ffp-contract=fast (fused multiply-adds). The hot loops are cloned for AVX-512, AVX2 and baseline x86-64
inside the source (target_clones), so the build stays portable without -march=native.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGES = ["otfast", "otfast.kernels", "otfast.kernels.triton", "otfast.kernels.cpu"]
CPU_EXTENSION = "otfast.kernels.cpu._sinkhorn"

FLAGS = {  # compiler type -> (compile flags, OpenMP compile flags, OpenMP link flags)
    "msvc": (["/O2", "/std:c++17", "/EHsc"], ["/openmp"], []),
    "unix": (["-O3", "-std=c++17", "-g0", "-fvisibility=hidden", "-fno-trapping-math", "-ffp-contract=fast",
              "-Wno-psabi"], ["-fopenmp"], ["-fopenmp"]),
}


class OptionalBuildExt(build_ext):
    """Builds the C++ kernel when possible and never fails the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all (setuptools raises before build_extension)
            self._skip(exc)

    def build_extensions(self):
        super().build_extensions()
        # a skipped extension has no file to copy in place or to put in a wheel
        self.extensions = [ext for ext in self.extensions if os.path.exists(self.get_ext_fullpath(ext.name))]

    def build_extension(self, ext):
        try:
            import pybind11
        except ImportError as exc:
            self._skip(exc)
            return
        base, omp_compile, omp_link = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        ext.include_dirs = [*ext.include_dirs, pybind11.get_include()]
        attempts = [(base + omp_compile, omp_link), (base, [])]
        for n, (compile_args, link_args) in enumerate(attempts):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                super().build_extension(ext)
                if n:
                    print(f"warning: built {ext.name} without OpenMP (single-threaded)", file=sys.stderr)
                return
            except Exception as exc:
                last = exc
        self._skip(last)

    def _skip(self, exc):
        if os.environ.get("OTFAST_REQUIRE_CPU_KERNEL") == "1":
            raise RuntimeError(f"{CPU_EXTENSION} did not build and OTFAST_REQUIRE_CPU_KERNEL=1") from exc
        package_dir = self.get_finalized_command("build_py").get_package_dir("otfast.kernels.cpu")
        in_source = os.path.join(package_dir, os.path.basename(self.get_ext_filename(CPU_EXTENSION)))
        for stale in {self.get_ext_fullpath(CPU_EXTENSION), in_source}:
            if os.path.exists(stale):
                os.remove(stale)
        print(f"warning: the optional C++ CPU kernel {CPU_EXTENSION} was not built ({exc}); otfast falls back "
              "to its torch backend (see otfast.backends())", file=sys.stderr)


setup(
    packages=PACKAGES,
    package_dir={"otfast": "otfast", "otfast.kernels": "kernels"},
    ext_modules=[Extension(CPU_EXTENSION, sources=["kernels/cpu/sinkhorn.cpp"], language="c++")],
    cmdclass={"build_ext": OptionalBuildExt},
)
