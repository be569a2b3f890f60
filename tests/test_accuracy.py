"""The accuracy matrix (``benchmarks.accuracy``) as tests: every backend against the float64 oracle.

The torch and cpu backends run every cell (D 16 and 768, scales 0.1 to 10, eps down to 1e-4, masks with
junk in the padding, fp16/bf16 inputs, every setting); the Triton kernels run, under the interpreter, the
cells it can afford (``benchmarks.accuracy.interpreter_can_run``), and every cell on a GPU. A cell holds
the gradient to 1e-4 relative (or the cell's measured fp32 conditioning, or the unit roundoff of a half
input dtype), the value to 2e-6, and to GeomLoss's own fp32 error where GeomLoss can compute the cell.
"""

from __future__ import annotations

import functools

import pytest
import torch

import otfast
from benchmarks import accuracy
from conftest import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AVAILABLE = {name for name, info in otfast.backends().items() if info.available}
CASES = [(cell, name) for cell in accuracy.cells() for name in ("torch", "cpu", "triton")
         if name != "triton" or DEVICE.type == "cuda" or accuracy.interpreter_can_run(cell)]


@functools.lru_cache(maxsize=None)
def _oracle(cell: accuracy.Cell) -> accuracy.Oracle:
    return accuracy.Oracle(cell, DEVICE)


@pytest.mark.parametrize("cell,backend", CASES, ids=[f"{c.name}-{b}" for c, b in CASES])
def test_cell(cell, backend):
    if backend not in AVAILABLE:
        pytest.skip(f"backend {backend} unavailable: {otfast.backends()[backend].detail}")
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    row = accuracy.measure(cell, backend, DEVICE, _oracle(cell))
    assert row.ok, row


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_gradient_on_nearly_aligned_points(backend):
    """y is a permutation of x plus 1e-3 noise: the gradient x_i - (S y)_i is a small difference of large
    vectors. fp32 backends keep it to 1e-4 of the largest gradient entry."""
    if backend not in AVAILABLE:
        pytest.skip(f"backend {backend} unavailable")
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the cpu backend runs on CPU tensors")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, 64, generator=gen)
    y = x[:, torch.randperm(20, generator=gen)] + 1e-3 * torch.randn(3, 20, 64, generator=gen)
    x, y = x.to(DEVICE), y.to(DEVICE)

    def grads(a, b, name):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        otfast.sinkhorn_loss(a, b, eps=1e-3, scaling=0.5, backend=name).backward()
        return a.grad.double(), b.grad.double()

    want = grads(x.double(), y.double(), "torch")
    got = grads(x, y, backend)
    for g, w, what in zip(got, want, ("dx", "dy")):
        assert_close(g, w, rtol=1e-4, atol=0, what=what)
