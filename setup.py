"""Build script: the pure-Python package plus the optional pybind11 C++ CPU kernel.

``kernels/`` installs as ``otfast.kernels`` (a top-level ``kernels`` module would clash with the
unrelated PyPI package of that name).
"""

from setuptools import setup

PACKAGES = ["otfast", "otfast.kernels", "otfast.kernels.triton", "otfast.kernels.cpu"]

setup(
    packages=PACKAGES,
    package_dir={"otfast": "otfast", "otfast.kernels": "kernels"},
)
