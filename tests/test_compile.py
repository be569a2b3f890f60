"""otfast inside a training step: the custom op under ``torch.compile(fullgraph=True)`` (no graph break, the same
loss and gradients as eager), meta tensors through its fake implementation, the annealing schedule derived
on the device, and a Triton path that reads nothing back to the host (the CUDA-graph and no-sync claims;
checked on CUDA by ``torch.cuda.set_sync_debug_mode`` where a GPU is at hand)."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

import otfast
from conftest import assert_close, make_points
from otfast.schedule import Annealing, Schedule, epsilon_schedule

AVAILABLE = {name for name, info in otfast.backends().items() if info.available}
CPU_BACKENDS = [b for b in ("torch", "cpu") if b in AVAILABLE]
SETTINGS = {
    "paper": dict(),
    "fixed-cosine": dict(cost="cosine", eps=0.05, scaling=None, n_iters=30, debias=False),
    "unbalanced": dict(blur=0.3, reach=1.0),
}


def _step(model, batch, **kw):
    """The loss of a linear encoder's embeddings (the part of a training step otfast is in)."""
    return otfast.sinkhorn_loss(model(batch.x), model(batch.y), batch.mask_x, batch.mask_y, **kw)


def _loss_and_grads(fn, model, batch, **kw):
    model.zero_grad()
    loss = fn(model, batch, **kw)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_loss_has_no_graph_break_and_matches_eager(backend, setting):
    """fullgraph=True fails on any graph break; aot_eager runs the traced graph, the fake implementations and
    the registered backward."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    batch = make_points(3, 7, 9, 8, dtype=torch.float32, seed=4)
    kw = dict(SETTINGS[setting], backend=backend)
    want = _loss_and_grads(_step, model, batch, **kw)
    got = _loss_and_grads(torch.compile(_step, fullgraph=True, backend="aot_eager"), model, batch, **kw)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        assert torch.equal(g, w)


@pytest.mark.skipif("cpu" not in AVAILABLE, reason="the cpu backend is not built")
def test_inductor_compiles_the_step_on_cpu(tmp_path, monkeypatch):
    """The inductor CPU backend (generated C++ around the op): same loss and gradients as eager. Its caches go
    to a fresh folder: a cache written before the op's outputs changed (its call unchanged) handed back code
    that asserted the old outputs' shapes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 8)
    batch = make_points(2, 6, 5, 8, dtype=torch.float32, seed=5)
    want = _loss_and_grads(_step, model, batch, backend="cpu")
    got = _loss_and_grads(torch.compile(_step, fullgraph=True, backend="inductor"), model, batch, backend="cpu")
    assert_close(got[0], want[0], rtol=1e-6, atol=0, what="loss")
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, rtol=1e-5, atol=1e-7, what="gradient")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["auto"])
def test_meta_tensors_give_shapes(backend):
    """The op's fake implementation: meta in, meta out, for the loss and its backward."""
    x = torch.empty(3, 7, 16, device="meta", requires_grad=True)
    y = torch.empty(3, 9, 16, device="meta")
    value = otfast.sinkhorn_loss(x, y, backend=backend, reduction="none")
    assert value.device.type == "meta" and value.shape == (3,)
    value.sum().backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_op_matches_its_fake_on_strided_inputs(backend):
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch): the real op's
    outputs have the fake's shapes and strides, which a compiled step asserts, with transposed masks and
    weights (the log-weights would take their strides), for each kind of annealing start: found in the op,
    given, none (a fixed eps)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(3, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    mx, my = torch.ones(5, 3, dtype=torch.bool).t(), torch.ones(6, 3, dtype=torch.bool).t()
    mx[1, -1] = my[2, :2] = False
    a, b = (m.double() / m.sum(1, keepdim=True) for m in (mx, my))
    assert not (mx.is_contiguous() or a.is_contiguous())
    for diameter, scaling in ((None, 0.5), (torch.tensor(2.0, dtype=torch.float64), 0.5), (None, None)):
        torch.library.opcheck(torch.ops.otfast.sinkhorn_loss.default,
                              (x, y, a, b, mx, my, diameter, None, 0.01, 0.1, scaling, 5, None, None, True,
                               "sqeuclidean", backend))


@pytest.mark.parametrize("diameter", [0.05, 0.0501, 0.3, 1.0, 3.7, 123.4, 9.9e4])
@pytest.mark.parametrize("scaling", [0.5, 0.9])
def test_device_annealing_is_geomloss_list(diameter, scaling):
    """The annealing list derived from a device diameter has the host list's length and values."""
    ann = Annealing(torch.tensor(diameter, dtype=torch.float64), 0.05, scaling)
    host = epsilon_schedule(diameter, 0.05, scaling)
    assert int(ann.length()) == len(host)
    assert Schedule(eps=0.0025, anneal=ann).on_host().anneal == host


def test_device_annealing_is_not_read_as_a_list_of_temperatures():
    """Code that expects host temperatures fails on an ``Annealing`` instead of reading its fields as them."""
    sched = Schedule(eps=0.0025, anneal=Annealing(torch.tensor(2.0, dtype=torch.float64), 0.05, 0.5))
    with pytest.raises(TypeError):
        _ = sched.eps_init
    with pytest.raises(TypeError):
        list(sched.anneal)
    assert sched.on_host().eps_init == 4.0


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton unavailable")
@pytest.mark.parametrize("N,M", [(7, 9), (65, 17)], ids=["resident", "streaming"])
def test_triton_derives_the_annealing_list_on_the_device(N, M):
    """The kernels' own list (from the diameter alone) gives the potentials of the host list, to the last
    bits their exp may differ in."""
    from otfast import triton_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(N)
    x, y = (torch.randn(2, n, 8, generator=gen).mul(3).to(device) for n in (N, M))
    alpha = torch.full((2, N), -math.log(N), device=device)
    beta = torch.full((2, M), -math.log(M), device=device)
    # a few final updates: the annealing list is what differs (the interpreter's streaming pass is slow)
    host = Schedule(eps=0.01, anneal=epsilon_schedule(4.123, 0.1, 0.5), n_iters=3)
    dev = Schedule(eps=0.01, anneal=Annealing(torch.tensor(4.123, dtype=torch.float64, device=device), 0.1, 0.5),
                   n_iters=3)
    a, b = (triton_backend.solve_points(x, y, alpha, beta, s) for s in (host, dev))
    assert torch.equal(a.n_iters, b.n_iters)
    for u, v in zip(a[:4], b[:4]):
        assert_close(u, v, rtol=1e-13, atol=0)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton unavailable")
def test_triton_path_reads_nothing_back_to_the_host(monkeypatch):
    """No otfast code calls .item(), .tolist(), bool(), int(), float() or nonzero() on a tensor in the Triton
    path of a paper-setting loss and its backward (check_inputs=False), and, once a first call has copied the
    schedule's constants, none copies host data to the device (torch.tensor, torch.as_tensor: a copy from
    pageable memory that waits, and that a CUDA graph capture refuses): nothing waits for the device, which is
    what CUDA graphs and a no-sync training step need."""
    reads, copies = [], []

    def spy_on(owner, name, record):
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("otfast"):
                record.append(f"{name} in {caller}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        spy_on(torch.Tensor, name, reads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = make_points(2, 7, 9, 8, dtype=torch.float32, seed=6)
    x = batch.x.to(device).requires_grad_()
    args = (batch.y.to(device), batch.mask_x.to(device), batch.mask_y.to(device))
    otfast.sinkhorn_loss(x, *args, backend="triton", check_inputs=False).backward()
    assert reads == []
    for name in ("tensor", "as_tensor"):
        spy_on(torch, name, copies)
    otfast.sinkhorn_loss(x, *args, backend="triton", check_inputs=False).backward()
    assert reads == [] and copies == []
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            otfast.sinkhorn_loss(x, *args, backend="triton", check_inputs=False).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_input_checks_run_inside_the_op_under_compile():
    """A bad value still gets its clear error when the loss is compiled: the check is read by the op."""
    batch = make_points(2, 5, 6, 4, dtype=torch.float32, seed=7)
    x = batch.x.clone()
    x[1, 0, 2] = float("nan")
    fn = torch.compile(lambda a, b: otfast.sinkhorn_loss(a, b, backend="torch"), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="x contains NaN values"):
        fn(x, batch.y)


CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and "triton" in AVAILABLE), reason="needs CUDA and triton")


@CUDA
def test_compiled_triton_loss_matches_eager_on_cuda():
    torch.manual_seed(2)
    model = torch.nn.Linear(8, 8).cuda()
    batch = make_points(3, 7, 9, 8, dtype=torch.float32, seed=8)
    batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).cuda() for f in dataclasses.fields(batch)
                                          if isinstance(getattr(batch, f.name), torch.Tensor)})
    want = _loss_and_grads(_step, model, batch, backend="triton")
    got = _loss_and_grads(torch.compile(_step, fullgraph=True), model, batch, backend="triton")
    assert_close(got[0], want[0], rtol=1e-6, atol=0, what="loss")
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, rtol=1e-5, atol=1e-7, what="gradient")


@CUDA
@pytest.mark.parametrize("B,N,M", [(3, 7, 9), (1, 300, 257)], ids=["resident", "streaming-split"])
def test_cuda_graph_captures_loss_and_backward(B, N, M):
    """The whole step (loss and backward) captured once and replayed gives the eager loss and gradients: for
    short pairs (resident kernel) and for one long pair (streaming kernel, rows split among programs in one
    cooperative launch, the default on a GPU)."""
    batch = make_points(B, N, M, 8, dtype=torch.float32, seed=9)
    x = batch.x.cuda().requires_grad_()
    y, mx, my = batch.y.cuda(), batch.mask_x.cuda(), batch.mask_y.cuda()

    def step():
        loss = otfast.sinkhorn_loss(x, y, mx, my, backend="triton", check_inputs=False)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: JIT compiles and the schedule's constants reach the device
        for _ in range(2):
            x.grad = None
            want = step().detach().clone()
    torch.cuda.current_stream().wait_stream(side)
    want_grad = x.grad.clone()
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, want)
    assert torch.equal(x.grad, want_grad)


def test_the_ops_potentials_carry_no_gradient():
    """Only the loss value is differentiated: backward through a potential output of the op (which the
    envelope theorem holds fixed) gives no gradient and no error, and computes nothing."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    a, b = torch.full((2, 5), 0.2, dtype=torch.float64), torch.full((2, 6), 1 / 6, dtype=torch.float64)
    out = torch.ops.otfast.sinkhorn_loss(x, y, a, b, a > 0, b > 0, None, None, 0.1, 0.3, None, 20, None, None, False,
                                         "sqeuclidean", "torch")
    out[5].sum().backward(retain_graph=True)  # f of OT(x, y)
    assert x.grad is None and y.grad is None
    out[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
