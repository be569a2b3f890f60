"""The layering: ``kernels/`` (the engine) <- ``otfast/`` (API, dispatch, autograd, launchers) <- ``train/``,
``benchmarks/``. Imports only go down, and every backend implements ``otfast.backends.Backend``."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import otfast
from otfast.backends import Backend

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    if package and package[0] == "kernels":  # installed as otfast.kernels
        package = ("otfast", *package)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, node.module) if node.module else base)
            out += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return out


def _violations(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = (), root: Path = ROOT
                ) -> list[str]:
    bad = []
    for path in sorted((root / folder).rglob("*.py")):
        for name in _imports(path, root):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                if not any(name == a or name.startswith(a + ".") for a in allowed):
                    bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


ENGINE_RULE = (("otfast", "train", "benchmarks"), ("otfast.kernels",))


def test_the_engine_imports_nothing_from_the_api():
    assert _violations("kernels", *ENGINE_RULE) == []


def test_the_api_imports_neither_the_harness_nor_the_benchmarks():
    assert _violations("otfast", ("train", "benchmarks")) == []


def test_the_harness_does_not_import_the_benchmarks():
    assert _violations("train", ("benchmarks",)) == []


def test_the_check_sees_violations(tmp_path):
    """Absolute and relative imports of the API from the engine are both caught; the engine's own are not."""
    (tmp_path / "kernels" / "triton").mkdir(parents=True)
    (tmp_path / "kernels" / "triton" / "bad.py").write_text(
        "import otfast.schedule\nfrom ...reference import Potentials\nfrom . import sinkhorn\n"
        "from otfast.kernels.triton import configs\n")
    bad = _violations("kernels", *ENGINE_RULE, root=tmp_path)
    assert bad == ["kernels/triton/bad.py imports otfast.schedule", "kernels/triton/bad.py imports otfast.reference",
                   "kernels/triton/bad.py imports otfast.reference.Potentials"]


@pytest.mark.parametrize("module_name", ["otfast.reference", "otfast.triton_backend", "otfast.cpu_backend"])
def test_every_backend_implements_the_protocol(module_name):
    module = importlib.import_module(module_name)
    if getattr(module, "UNAVAILABLE", None):
        pytest.skip(f"{module_name} unavailable: {module.UNAVAILABLE}")
    assert isinstance(module, Backend)
    for method in ("solve", "solve_points", "grad_points"):
        want = list(inspect.signature(getattr(Backend, method)).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(module, method)).parameters) == want, (module_name, method)


def test_public_api_is_importable_from_the_package():
    for name in otfast.__all__:
        assert hasattr(otfast, name), name
