"""The Triton backend against the torch reference: on CPU under ``TRITON_INTERPRET=1`` (set by conftest.py
when there is no GPU), on the GPU when there is one (``benchmarks/gpu_suite.sh`` runs this file there).

Both regimes run: resident and streaming. Pairs of up to 32 tokens solve on the resident kernel's 32 tile;
longer ones stream here (``resident_tiles``), except in the tests of its 64 tile (``TILE64``), which the
launchers choose for 33 to 64 tokens. Every output of every launch is
poisoned with NaN (integers with a sentinel) first, so an element a kernel forgets to write fails.
Shapes stay small (D = 8) because the interpreter runs each kernel op in numpy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import otfast
from conftest import assert_close, assert_finite_at_extreme_eps, case_id, make_costs, make_points

triton = pytest.importorskip("triton")
backend = pytest.importorskip("otfast.triton_backend")
configs = pytest.importorskip("otfast.kernels.triton.configs")
TILES = configs.RESIDENT_TILES
TILE64 = next((tile for tile in TILES if tile[0] == 64), None)  # shipped with triton >= 3.7
ON_64 = pytest.mark.skipif(TILE64 is None, reason="the 64 tile ships with triton 3.7 and later")

if not otfast.backends()["triton"].available:
    pytest.skip(f"triton backend unavailable: {otfast.backends()['triton'].detail}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _uniform_log_weights(mask: torch.Tensor) -> torch.Tensor:
    """float64 log-weights of the uniform measure on each row's valid tokens, -inf on padding."""
    return torch.where(mask.bool(), -torch.log(mask.sum(1, keepdim=True).double()), -torch.inf)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN (floats) or -2^31 (int32)."""
    monkeypatch.setenv("OTFAST_DEBUG_POISON", "1")


def _tiles(monkeypatch, *tiles):
    """The resident tiles the launchers may choose (``configs.resident_tile``): pairs longer than the last stream."""
    monkeypatch.setattr(configs, "RESIDENT_TILES", tiles)


@pytest.fixture(autouse=True)
def resident_tiles(monkeypatch):
    """The resident tiles the launchers chose, in order. Only the 32 tile unless a test allows ``TILES``: pairs
    of 33 to 64 tokens stream (the streaming kernel's cases are that short, for the interpreter's sake)."""
    _tiles(monkeypatch, TILES[0])
    chosen, choose = [], backend.resident_tile

    def recorded(length, from_points=True, largest=None):
        chosen.append(choose(length, from_points, largest))
        return chosen[-1]

    monkeypatch.setattr(backend, "resident_tile", recorded)
    return chosen


SETTINGS = {
    "fixed-cosine": dict(cost="cosine", eps=0.1, scaling=None, n_iters=40, debias=False),
    "anneal-debias": dict(blur=0.3, scaling=0.5, debias=True),
    "unbalanced": dict(blur=0.5, scaling=0.5, reach=1.0, debias=True),
    "tol": dict(eps=2.0, scaling=None, n_iters=300, tol=1e-4, debias=False),  # pairs stop after 23-61 updates
}
# (N, M): resident 1, 7, 32; on the 64 tile 64 and 40 x 64 (three of its column groups partly past the pair);
# streaming 37 (two tiles of rows) and 70 (three, the last one ragged).
RESIDENT = [(1, 7), (7, 20), (32, 17), (64, 41)]
STREAMED = [(37, 20, "tol"), (70, 33, "unbalanced"), (70, 37, "anneal-debias")]
CASES = [(n, m, s) for n, m in RESIDENT for s in SETTINGS] + [(40, 64, "anneal-debias")] + STREAMED


def _run(batch, backend, **kw):
    x, y, wx, wy, mx, my = _on_device(batch.x, batch.y, batch.weights_x, batch.weights_y, batch.mask_x, batch.mask_y)
    x.requires_grad_()
    y.requires_grad_()
    if wx is not None:
        wx.requires_grad_()
    loss = otfast.sinkhorn_loss(x, y, mx, my, weights_x=wx, weights_y=wy, reduction="none", backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad, y.grad, None if wx is None else wx.grad


@pytest.mark.parametrize("N,M,setting", CASES, ids=[case_id(3, n, m, 8, torch.float32, s=s) for n, m, s in CASES])
def test_loss_and_gradients_match_reference(N, M, setting, monkeypatch, resident_tiles):
    on64 = TILE64 is not None and (N, M, setting) not in STREAMED and max(N, M) > 32
    if on64:
        _tiles(monkeypatch, *TILES)
    batch = make_points(3, N, M, 8, dtype=torch.float32, seed=N * 1000 + M, weights=setting == "anneal-debias")
    kw = SETTINGS[setting]
    ref = _run(batch, "torch", **kw)
    got = _run(batch, "triton", **kw)
    assert_close(got[0], ref[0], rtol=1e-5, atol=1e-7, what="value")
    assert_close(got[1], ref[1], rtol=1e-4, atol=1e-7, what="dx")
    assert_close(got[2], ref[2], rtol=1e-4, atol=1e-7, what="dy")
    if ref[3] is not None:
        assert_close(got[3], ref[3], rtol=1e-4, atol=1e-5, what="d weights_x")  # exact 0 at N = 1, up to rounding
    assert resident_tiles and set(resident_tiles) == {TILE64 if on64 else None if max(N, M) > 32 else TILES[0]}


@pytest.mark.parametrize("regime", ["resident", pytest.param("resident-64", marks=ON_64), "streaming"])
def test_precise_passes_take_float64_exponentials(regime, monkeypatch, resident_tiles):
    """The annealing's precise passes (temperatures above 256 times the final one) in float64 down to their
    exponentials: with fp32 exponentials of the float64 exponents (each term off by |z| 2^-24, at
    temperatures where that is 1e-6 of the potentials) this annealed pair, D = 768, scale 1, the accuracy
    matrix's failing cell on an H200 and in the interpreter, had a gradient 1.3e-4 from the float64
    oracle; 3e-6 with them. The resident kernel on either tile (the 24 x 20 pair on the 64 tile when it is the
    only one) and the streaming kernel (no resident tile)."""
    g = torch.Generator().manual_seed(768010)
    x = torch.randn(4, 24, 768, generator=g)
    y = torch.randn(4, 20, 768, generator=g) + 0.1
    x, y = x[2:3], y[2:3]
    kw = dict(blur=0.05, scaling=0.5, debias=False, diameter=150.60245211969624)  # the 4 pairs' diameter
    _tiles(monkeypatch, *{"resident": TILES[:1], "resident-64": (TILE64,), "streaming": ()}[regime])
    grads = []
    for be, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        xs, ys = (t.to(DEVICE, dtype).requires_grad_() for t in (x, y))
        otfast.sinkhorn_loss(xs, ys, backend=be, **kw).backward()
        grads.append((xs.grad.double().cpu(), ys.grad.double().cpu()))
    (want_x, want_y), (got_x, got_y) = grads
    err = max(float((got_x - want_x).abs().max() / want_x.abs().max()),
              float((got_y - want_y).abs().max() / want_y.abs().max()))
    assert err < 2e-5, err
    assert resident_tiles == [None if regime == "streaming" else TILE64 if regime == "resident-64" else TILES[0]]


@pytest.mark.parametrize("regime", ["resident", pytest.param("resident-64", marks=ON_64), "streaming"])
def test_precise_passes_at_a_tiny_blur_are_not_nan(regime, monkeypatch, resident_tiles):
    """The resident kernel's precise passes took their max of exponents formed in fp32, off by about |C| / eps
    2^-24: at blur 3e-7 (eps 9e-14, precise passes down to 2.3e-11) 1e4, and the float64 exponentials relative
    to it overflowed: NaN loss. The annealed loss there against the float64 oracle, on either resident tile and
    streamed."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 5, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    _tiles(monkeypatch, *{"resident": TILES[:1], "resident-64": (TILE64,), "streaming": ()}[regime])
    out = []
    for be, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        xs, ys = (t.to(DEVICE, dtype).requires_grad_() for t in (x, y))
        loss = otfast.sinkhorn_loss(xs, ys, blur=3e-7, debias=False, reduction="none", backend=be)
        out.append([t.detach().double().cpu() for t in (loss, *torch.autograd.grad(loss.sum(), (xs, ys)))])
    for want, got, what in zip(*out, ("value", "dx", "dy")):
        assert_close(got, want, rtol=1e-6, atol=1e-7, what=what)
    assert resident_tiles == [None if regime == "streaming" else TILE64 if regime == "resident-64" else TILES[0]]


@pytest.mark.parametrize("value", ["auto", "32"])
def test_otfast_triton_resident_caps_the_resident_tiles(value, monkeypatch, resident_tiles):
    """``OTFAST_TRITON_RESIDENT``: "auto" takes the largest resident tile the installed triton ships (a 40 x 20
    pair on the 64 tile from triton 3.7), "32" streams the pairs of 33 to 64 tokens, as triton 3.6 does; the loss
    and its gradients are the reference's either way."""
    _tiles(monkeypatch, *TILES)
    monkeypatch.setenv("OTFAST_TRITON_RESIDENT", value)
    batch = make_points(2, 40, 20, 8, dtype=torch.float32, seed=4020)
    kw = dict(eps=0.5, scaling=None, n_iters=5, debias=False)
    ref, got = _run(batch, "torch", **kw), _run(batch, "triton", **kw)
    assert_close(got[0], ref[0], rtol=1e-5, atol=1e-7, what="value")
    assert_close(got[1], ref[1], rtol=1e-4, atol=1e-7, what="dx")
    assert_close(got[2], ref[2], rtol=1e-4, atol=1e-7, what="dy")
    assert resident_tiles == [TILE64 if value == "auto" else None]


def test_a_resident_tile_not_shipped_is_an_error_naming_the_variable(monkeypatch):
    """Any ``OTFAST_TRITON_RESIDENT`` but auto and the installed triton's tile sides is refused by name, before
    any launch: 64 under a triton older than 3.7 too."""
    _tiles(monkeypatch, *TILES)
    sides = [tile[0] for tile in TILES]
    named = f"OTFAST_TRITON_RESIDENT must be auto or one of {', '.join(map(str, sides))}"
    for value in ["48", "0", "off", "128"] + ([] if TILE64 else ["64"]):
        monkeypatch.setenv("OTFAST_TRITON_RESIDENT", value)
        with pytest.raises(ValueError, match=named):
            otfast.sinkhorn_loss(torch.randn(1, 3, 2, device=DEVICE), torch.randn(1, 4, 2, device=DEVICE),
                                 backend="triton")
    for value in map(str, sides):
        monkeypatch.setenv("OTFAST_TRITON_RESIDENT", value)
        assert backend.resident_side() == int(value)


@pytest.mark.parametrize("variable,value", [("OTFAST_TRITON_STREAM", "buffer"), ("OTFAST_TRITON_SPLIT", "on"),
                                            ("OTFAST_TRITON_PRECISION", "tf32")])
def test_a_bad_setting_is_an_error_at_the_first_call(variable, value, monkeypatch):
    """The settings that only streamed pairs or the backward read are checked at every entry too: a typo fails
    the first call, on a short pair's forward and in a precomputed cost's solve, not the first long sentence of
    a training run, hours in."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"{variable} must be one of"):
        otfast.sinkhorn_loss(torch.randn(1, 3, 2, device=DEVICE), torch.randn(1, 4, 2, device=DEVICE),
                             backend="triton")
    with pytest.raises(ValueError, match=f"{variable} must be one of"):
        otfast.sinkhorn(torch.rand(1, 3, 4, device=DEVICE), eps=0.1, backend="triton")


@pytest.mark.parametrize("N,M,tiles", [(7, 20, 1), pytest.param(48, 40, 2, marks=ON_64), (48, 40, 1)],
                         ids=["resident", "resident-64", "streaming"])
def test_paper_setting_matches_the_fp64_oracle(N, M, tiles, monkeypatch, resident_tiles):
    """At eps = 0.0025 (the paper's blur = 0.05) C / eps is in the thousands: the fp32 kernels are held to the
    float64 oracle with the accuracy matrix's bounds (value 2e-6, gradients 1e-4)."""
    _tiles(monkeypatch, *TILES[:tiles])
    oracle = _run(make_points(2, N, M, 8, dtype=torch.float64, seed=7), "torch")
    got = _run(make_points(2, N, M, 8, dtype=torch.float32, seed=7), "triton")
    assert_close(got[0], oracle[0], rtol=2e-6, atol=0, what="value")
    for g, o, what in zip(got[1:3], oracle[1:3], ("dx", "dy")):
        assert_close(g, o, rtol=1e-4, atol=0, what=what)
    assert resident_tiles[-1] == (None if max(N, M) > configs.RESIDENT_TILES[-1][0] else configs.RESIDENT_TILES[-1])


# The interpreter's numpy warns for the tile's lanes outside the pair (rows N..31 of the resident tile, whose
# zero cost against huge potentials overflows): the kernel discards those lanes (``valid``); the outputs are
# what the test checks.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning",
                            "ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("N,M", [(7, 5), (40, 37)], ids=["resident", "streaming"])
def test_huge_cost_over_eps_stays_finite(N, M):
    """C / eps ~ 1e10: the values match the torch backend (which computes in float64) instead of -inf / NaN."""
    cost = torch.rand(2, N, M, generator=torch.Generator().manual_seed(0)) * 1e6
    want = otfast.sinkhorn(cost, eps=1e-4, n_iters=20, backend="torch")
    got = otfast.sinkhorn(cost.to(DEVICE), eps=1e-4, n_iters=20, backend="triton")
    assert torch.isfinite(got.value).all()
    assert_close(got.value.cpu(), want.value, rtol=1e-6, atol=0, what="value")


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning",
                            "ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("N,M,tiles", [(9, 6, 1), pytest.param(33, 20, 2, marks=ON_64), (33, 20, 1)],
                         ids=["resident", "resident-64", "streaming"])
def test_clouds_far_apart_stay_finite(N, M, tiles, monkeypatch, resident_tiles):
    """x 1e4 from the origin and y 1e4 on the other side (C / eps ~ 3e9, every cost nearly the same): the
    fast passes' exponents relative to the zero initial potentials are ~1e10, whose fp32 max is off by
    hundreds of binary orders; the potentials and gradients still match the reference's (they were NaN
    before the second sweep took its own max there, ``sinkhorn._far``)."""
    from otfast import reference
    from otfast.schedule import Schedule

    _tiles(monkeypatch, *TILES[:tiles])

    batch = make_points(2, N, M, 8, seed=23, ragged=False)
    x, y = batch.x + 1e4, batch.y - 1e4
    alpha = torch.full((2, N), -math.log(N), dtype=torch.float64)
    beta = torch.full((2, M), -math.log(M), dtype=torch.float64)
    schedule = Schedule(eps=0.5, n_iters=12)
    pots = backend.solve_points(*_on_device(x, y, alpha, beta), schedule)
    want = reference.solve_points(x, y, alpha, beta, schedule)
    for field in ("f", "g", "f_prev", "g_prev"):  # potentials ~8e8: within 2e-4 eps
        assert_close(getattr(pots, field).cpu(), getattr(want, field), rtol=0, atol=1e-4, what=field)
    u, v = alpha.exp(), beta.exp()
    grads = backend.grad_points(*_on_device(x, y, alpha, beta), pots, schedule.eps, *_on_device(u, v))
    for got, w, what in zip(grads, reference.grad_points(x, y, alpha, beta, want, schedule.eps, u, v), ("dx", "dy")):
        assert_close(got.cpu(), w, rtol=1e-6, atol=1e-6, what=what)
    assert resident_tiles == [None if tiles == 1 and N > 32 else configs.RESIDENT_TILES[-1]]


def test_single_token_pairs_have_exact_gradients():
    """N = M = 1: the plan is 1, and the gradient of OT(x, y) = |x - y|^2 / 2 is exactly x - y."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
    xs = x.to(DEVICE).requires_grad_()
    otfast.sinkhorn_loss(xs, y.to(DEVICE), eps=1e-4, scaling=None, n_iters=3, debias=False, reduction="sum",
                         backend="triton").backward()
    assert_close(xs.grad.cpu(), x - y, rtol=1e-6, atol=0, what="dx")


@pytest.mark.parametrize("N,M", [(7, 9), (40, 37)], ids=lambda v: str(v))
@pytest.mark.parametrize("rho,scaling", [(None, None), (0.5, 0.7)], ids=["balanced-fixed", "unbalanced-anneal"])
def test_sinkhorn_on_costs_matches_reference(N, M, rho, scaling):
    cost, a, b, mask_a, mask_b = _on_device(*(getattr(make_costs(3, N, M, dtype=torch.float32, seed=N + M), k)
                                              for k in ("cost", "a", "b", "mask_a", "mask_b")))
    kw = dict(mask_a=mask_a, mask_b=mask_b, eps=0.2, n_iters=200, tol=1e-4, rho=rho, scaling=scaling)
    ref = otfast.sinkhorn(cost, a, b, backend="torch", **kw)
    got = otfast.sinkhorn(cost, a, b, backend="triton", **kw)
    assert_close(got.value, ref.value, rtol=1e-5, atol=1e-7, what="value")
    assert_close(got.f, ref.f, rtol=1e-5, atol=1e-6, what="f")
    assert_close(got.g, ref.g, rtol=1e-5, atol=1e-6, what="g")
    assert_close(got.plan(), ref.plan(), rtol=1e-4, atol=1e-8, what="plan")
    assert (got.n_iters - ref.n_iters).abs().max() <= 2, (got.n_iters, ref.n_iters)
    assert bool((got.marginal_error <= 1e-4).all())


@pytest.mark.filterwarnings("ignore:sinkhorn. 1 of 2 pairs did not reach tol")  # the hard pair, on purpose
def test_tolerance_stops_pairs_independently():
    """An easy pair (y = x) stops long before a hard one in the same launch."""
    batch = make_points(2, 20, 20, 8, dtype=torch.float32, seed=3, ragged=False, junk=None)
    x, y = _on_device(batch.x, batch.y.clone())
    y[0] = x[0]
    cost = otfast.reference.sqeuclidean_cost(x, y)
    out = {be: otfast.sinkhorn(cost, eps=0.05, n_iters=500, tol=1e-5, backend=be) for be in ("torch", "triton")}
    assert out["triton"].n_iters[0] < out["triton"].n_iters[1]
    assert (out["triton"].n_iters - out["torch"].n_iters).abs().max() <= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    batch = make_points(2, 12, 17, 8, dtype=dtype, seed=11)
    ref, got = _run(batch, "torch", blur=0.3), _run(batch, "triton", blur=0.3)
    for r, g, what in zip(ref[:3], got[:3], ("value", "dx", "dy")):
        assert g.dtype == (torch.float32 if what == "value" else dtype)
        assert_close(g.float(), r.float(), dtype=dtype, what=what)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_nan_padding_gets_exact_zero_gradients(cost):
    """NaN on padded tokens: the gradients are finite, match the reference, and are exactly 0 on padding
    (the sqeuclidean backward returns the kernel's rows as they are: its padding rows must be 0 already)."""
    batch = make_points(3, 9, 12, 8, dtype=torch.float32, seed=13, junk=float("nan"))
    ref, got = _run(batch, "torch", cost=cost), _run(batch, "triton", cost=cost)
    for r, g, what, mask in ((ref[1], got[1], "dx", batch.mask_x), (ref[2], got[2], "dy", batch.mask_y)):
        g = g.cpu()
        assert torch.isfinite(g).all(), what
        assert torch.equal(g[~mask.bool()], torch.zeros_like(g[~mask.bool()])), f"{what} is not 0 on padding"
        assert_close(g, r, rtol=1e-4, atol=1e-7, what=what)


def test_strided_inputs():
    base = make_points(2, 9, 11, 16, dtype=torch.float32, seed=5, junk=None)
    bx, by, mx, my = _on_device(base.x, base.y, base.mask_x, base.mask_y)
    x, y = bx[:, :, ::2], by.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 1::2]
    assert not x.is_contiguous() and not y.is_contiguous()
    ref = otfast.sinkhorn_loss(x, y, mx, my, reduction="none", backend="torch")
    got = otfast.sinkhorn_loss(x, y, mx, my, reduction="none", backend="triton")
    assert_close(got, ref, rtol=1e-5, atol=1e-7, what="value")


@pytest.mark.parametrize("N,M", [(7, 20), (48, 40)], ids=["resident", "streaming"])
def test_repeated_runs_are_bitwise_identical(N, M):
    """The debiased loss and its gradients, twice, bit for bit (ten updates: the kernels' launches are what runs
    again, not the schedule)."""
    batch = make_points(2, N, M, 8, dtype=torch.float32, seed=2)
    kw = dict(eps=0.5, scaling=None, n_iters=10)
    first, second = _run(batch, "triton", **kw), _run(batch, "triton", **kw)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_no_nan_at_extreme_eps():
    assert_finite_at_extreme_eps(_run, "triton")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_batch_on_another_gpu_than_the_current_one():
    """Triton launches on the current CUDA device: the launchers make the batch's own device current, so a loss
    and its gradients on cuda:1 while cuda:0 is current are the ones computed with cuda:1 current."""
    batch = make_points(2, 20, 17, 8, dtype=torch.float32, seed=2017)
    out = []
    for current in (1, 0):
        with torch.cuda.device(current):
            x, y = (t.to("cuda:1").requires_grad_() for t in (batch.x, batch.y))
            loss = otfast.sinkhorn_loss(x, y, backend="triton", reduction="none")
            out.append([t.cpu() for t in (loss.detach(), *torch.autograd.grad(loss.sum(), (x, y)))])
    for want, got in zip(*out):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_auto_picks_triton_only_for_cuda():
    from otfast.backends import resolve

    assert resolve("auto", torch.device("cpu")) is not backend
    if DEVICE.type == "cuda":
        assert resolve("auto", DEVICE) is backend
    else:
        assert resolve("triton", DEVICE) is backend  # allowed on CPU only because TRITON_INTERPRET=1


def _compiling(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a process that compiles for sm_90 (the interpreter off)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})


def _sass_loops(script: str):
    """The JSON a ``resources.sass_loops`` script prints (``_compiling``)."""
    proc = _compiling("-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_configuration_compiles_for_sm90_without_spills(monkeypatch):
    """``python -m otfast.kernels.triton.resources`` compiles every configuration the launchers can choose for
    sm_90 (no GPU needed) and exits 1 on any spill."""
    from otfast.kernels.triton.configs import configs

    _tiles(monkeypatch, *TILES)
    proc = _compiling("-m", "otfast.kernels.triton.resources")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(configs())} configurations compiled for sm_90, 0 spilling, 0 not fitting an SM" in proc.stdout


@pytest.mark.parametrize("regs,warps,shared,programs", [
    (209, 8, 3072, 1),     # 27 units of 256 registers a warp: 9 warps' worth, one program of 8
    (255, 4, 2048, 2),     # 32 units a warp: 8 warps, two programs of 4
    (64, 4, 2048, 8),      # 8 units a warp: 32 warps, 8 programs
    (32, 1, 1024, 32),     # the limit of 32 programs an SM
    (32, 4, 102400, 2),    # shared memory: 228 KiB hold two programs of 100 KiB
    (128, 16, 1024, 1),    # 16 units a warp: 16 warps, one program of 16
    (255, 16, 1024, 0),    # 16 warps of 8192 registers are twice the register file: no program fits
    (32, 4, 233472, 0),    # 228 KiB of shared memory an SM has, but one program may take 227 at most
])
def test_programs_per_sm_follows_cudas_occupancy_rules(regs, warps, shared, programs):
    """The resource check's programs per SM (CUDA's occupancy rules for compute capability 9.0)."""
    from otfast.kernels.triton.resources import programs_per_sm

    assert programs_per_sm(regs, warps, shared) == programs


_ITERATION_LOOP = """
import json, tempfile
from otfast.kernels.triton import resources
from otfast.kernels.triton.configs import configs
config = next(c for c in configs() if c.kernel == "_sinkhorn_resident_kernel" and c.points == "fp32"
              and not c.constexprs["HAS_TOL"] and c.constexprs["BLOCK_N"] == {side})
with tempfile.TemporaryDirectory() as tmp:
    kernels = resources.common_path_kernels(tmp)
    print(json.dumps([config.warps, resources.sass_loops(config), resources.sass_loops(config, kernels)]))
"""


@pytest.mark.parametrize("side", [tile[0] for tile in TILES])
def test_a_fast_pass_forms_its_exponents_once_on_the_common_path(side):
    """The SASS of the resident kernel's iteration loop (``resources --sass``), whole and on the common path
    (``--common-path``: the second sweep that only passes far from their reference take, removed), on each
    tile. The common path keeps all 2 N M / threads exponentials (16 at 32 x 32 and 4 warps, 32 at 64 x 64
    and 8) and forms each exponent once: within 24 fp32 instructions and 40 in all per exponential (366 and
    572 at 32 x 32 under triton 3.9 before its tiles took three axes, 382 and 621 after, 502 and 715 when
    every pass swept the tile twice; 712 and 1,089 at 64 x 64 with its vectors anchored, 566 and 877
    without)."""
    warps, *loops = _sass_loops(_ITERATION_LOOP.format(side=side))
    exponentials = 2 * side * side // (32 * warps)
    whole, common = (min((loop for loop in found if loop["exp2"] == exponentials),
                         key=lambda loop: loop["instructions"]) for found in loops)
    assert common["instructions"] < whole["instructions"]
    assert common["fp32"] <= 24 * exponentials and common["instructions"] <= 40 * exponentials, common


_STREAM_LOOPS = """
import json, tempfile
from otfast.kernels.triton import resources
from otfast.kernels.triton.configs import configs
config = next(c for c in configs() if c.kernel == "_sinkhorn_streaming_kernel" and not c.constexprs["HAS_TOL"])
with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps(resources.sass_loops(config, resources.common_path_kernels(tmp))))
"""


def test_streamed_fast_passes_on_the_common_path_reduce_once_per_row_block_and_absorb_the_cost():
    """The SASS of the streaming kernel on the common path (``resources --sass --common-path``). The tile loops
    of its fast passes (8 exponentials per thread: 32 x 32 / 128, and almost no float64, unlike the precise
    pass's: a row pass and a column pass each reading the absorbed cost, storing it, or neither) accumulate
    each lane's exponentials and max across the column tiles and reduce once per row block: no barrier, no
    shuffle, at most 13 fp32 operations and 50 instructions per exponential (336 to 396 for the column
    passes, 197 to 225 for the row passes, under triton 3.9, each trip loading the next tile into registers
    before computing on this one; 289 to 322 and 174 to 195 without; 402 with 80 shuffles and 335 with 8
    barriers when every tile reduced its max and its sum across the block). The two that read the absorbed
    cost take at most 4 fp32 operations and 20 instructions per exponential (89 and 143; 80 and 130 without
    loading ahead)."""
    loops = _sass_loops(_STREAM_LOOPS)
    fast = sorted((loop for loop in loops if loop["exp2"] == 8 and loop["fp64"] < 32),
                  key=lambda loop: loop["instructions"])
    assert len(fast) == 6, fast
    for loop in fast:
        assert loop["barrier"] == 0 and loop["shuffle"] == 0, loop
        assert loop["fp32"] <= 13 * 8 and loop["instructions"] <= 50 * 8, loop
    for loop in fast[:2]:
        assert loop["fp32"] <= 4 * 8 and loop["instructions"] <= 20 * 8, loop


_GRAD_LOOPS = """
import json
from otfast.kernels.triton import resources
from otfast.kernels.triton.configs import configs
config = next(c for c in configs() if c.kernel == "_grad_kernel" and c.points == "fp32"
              and c.constexprs["PRECISION"] == "ieee")
print(json.dumps([config.constexprs["BLOCK_K"], resources.sass_loops(config)]))
"""


def test_the_backward_forms_its_cost_tiles_without_a_reduction_per_step():
    """The SASS of the backward (``resources --sass``): the two DMMA loops that form a cost tile from the points
    (``_cost_tile_dot``: the pass every term takes, and term 1's second) take BLOCK_K features a step with no
    shuffle and at most 2 barriers (the dot's operands through shared memory), the norms summed per lane and
    reduced once after the last step, and at most 8 instructions per feature (220 at BLOCK_K = 32 under
    triton 3.9; 150 with 6 barriers and 22 shuffles at 16 when each step reduced the norms across the
    block). They are software-pipelined (``sinkhorn.STAGES``): the next step's points go to shared memory as
    async copies (LDGSTS)."""
    block_k, loops = _sass_loops(_GRAD_LOOPS)
    steps = [loop for loop in loops if loop["mma"] and not loop["exp2"] and loop["instructions"] < 400]
    assert len(steps) == 2, loops
    for loop in steps:
        assert loop["shuffle"] == 0 and loop["barrier"] <= 2 and loop["instructions"] <= 8 * block_k, loop
        assert loop["async"] > 0, loop


def test_common_path_source_refuses_kernels_without_the_branch():
    from otfast.kernels.triton import resources

    with pytest.raises(ValueError, match="_near"):
        resources.common_path_source("def kernel(c):\n    return c\n")


def _far_start(N: int, M: int):
    """``(x, y, alpha, beta, schedule)``: 12 updates at eps 0.0025 from zero potentials, points at scale 10 (D =
    16), whose first fast passes have exponents in the thousands relative to their reference."""
    from otfast.schedule import Schedule

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, N, 16, generator=gen) * 10, torch.randn(2, M, 16, generator=gen) * 10
    alpha, beta = _uniform_log_weights(torch.ones(2, N)), _uniform_log_weights(torch.ones(2, M))
    return x, y, alpha, beta, Schedule(eps=0.0025, n_iters=12)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="patches a constant that compiled kernels bake in")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("N,M,tiles", [(20, 17, 1), pytest.param(40, 37, 2, marks=ON_64), (40, 37, 1)],
                         ids=["resident", "resident-64", "streaming"])
def test_fast_passes_sweep_again_only_far_from_their_reference(N, M, tiles, monkeypatch):
    """A fast pass sums its exponents in one sweep relative to the previous update when every row's max lies
    within ``NEAR`` binary orders of it, and sweeps again relative to the max otherwise (``sinkhorn._near``).
    From zero potentials at eps 0.0025 and scale 10 the first passes' maxima are in the thousands: one sweep
    everywhere (NEAR = inf) leaves 2e-2 eps in f when resident, and overflows when streaming (whose one sweep
    sums the exponentials relative to the reference itself: NaN); two sweeps everywhere (NEAR = 0, the kernels
    before) and the shipped rule both stay within 1e-5 eps of the float64 oracle, and differ, so the one-sweep
    path ran."""
    from otfast import reference
    from otfast.kernels.triton import sinkhorn

    _tiles(monkeypatch, *TILES[:tiles])
    x, y, alpha, beta, schedule = _far_start(N, M)
    want = reference.solve_points(x.double(), y.double(), alpha, beta, schedule)

    def error(near):
        monkeypatch.setattr(sinkhorn, "NEAR", triton.language.constexpr(near))
        got = backend.solve_points(x, y, alpha, beta, schedule)
        return got.f, max(float((got.f - want.f).abs().max()), float((got.g - want.g).abs().max())) / schedule.eps

    shipped, shipped_err = error(sinkhorn.NEAR.value)
    twice, twice_err = error(0.0)
    _, once_err = error(math.inf)
    assert shipped_err < 1e-5 and twice_err < 1e-5, (shipped_err, twice_err)
    assert not once_err <= 1e-3, once_err  # NaN when streaming
    assert not torch.equal(shipped, twice)


# (case, N, M, resident tiles allowed): 40 x 37 streams with the 32 tile alone, and solves on the 64 tile with both.
REPLAYED = [("far start", 20, 17, 1), ("far start", 40, 37, 1), ("unbalanced debiased", 20, 17, 1),
            ("unbalanced debiased", 40, 37, 1), ("unbalanced debiased", 40, 37, 2)]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="records the decisions of interpreted kernels")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("case,N,M,tiles", [pytest.param(c, n, m, t, id=f"{c.replace(' ', '-')}-{n}x{m}-{t}-tiles",
                                                         marks=ON_64 if t == 2 else ()) for c, n, m, t in REPLAYED])
def test_the_sweep_replay_predicts_the_kernels_decisions(case, N, M, tiles, monkeypatch):
    """``benchmarks.sweeps`` replays the loop in float64 to say which fast passes take one sweep (no GPU counter
    can): it predicts every decision of the interpreted kernels (``_near``: per pass and pair when resident,
    per row block when streaming), in order, pair by pair and problem by problem: from a far start (some
    decisions of either kind), and for the unbalanced debiased loss (each reference undamped at its own
    temperature along the annealing, precise passes before the fast ones, the symmetric problems' single
    potential). When streaming, it also predicts which fast passes read the absorbed cost (``_stream_softmin``),
    pass by pass: from the far start some of either kind; the annealed loss's fast passes are all annealing
    steps, which neither store it nor drift little enough to read it."""
    from benchmarks.sweeps import Decisions
    from otfast import reference
    from otfast.kernels.triton import sinkhorn

    _tiles(monkeypatch, *TILES[:tiles])
    resident = backend.chosen_tile(max(N, M)) is not None
    decided, absorbed = {}, {}
    near, columns = sinkhorn._near, sinkhorn._stream_columns

    def program():
        return int(triton.language.program_id(1)), int(triton.language.program_id(0))

    def recorded(m, valid):
        out = near(m, valid)
        decided.setdefault(program(), []).append(bool(out))
        return out

    def recorded_columns(A_COL, POT_COL, n_cols, absorbs, store, BLOCK):
        absorbed.setdefault(program(), []).append(bool(absorbs))
        return columns(A_COL, POT_COL, n_cols, absorbs, store, BLOCK)

    monkeypatch.setattr(sinkhorn, "_near", recorded)
    monkeypatch.setattr(sinkhorn, "_stream_columns", recorded_columns)
    if case == "far start":
        x, y, alpha, beta, schedule = _far_start(N, M)
        backend.solve_points(x, y, alpha, beta, schedule)
        replay = Decisions(schedule.eps, resident=resident)
        with replay.record():
            reference.solve_points(x, y, alpha, beta, schedule)
    else:
        batch = make_points(2, N, M, 8, seed=3, ragged=False)
        kw = dict(blur=0.1, scaling=0.5, reach=1.0, debias=True)
        otfast.sinkhorn_loss(batch.x, batch.y, backend="triton", **kw)
        replay = Decisions(0.1**2, resident=resident)
        with replay.record():
            otfast.sinkhorn_loss(batch.x, batch.y, backend="torch", **kw)
    assert replay.sequences == decided
    assert 0 < replay.one_sweep and (replay.one_sweep < replay.total or case != "far start")
    assert replay.absorbed == absorbed
    if not resident and case == "far start":  # passes of either kind
        assert 0 < replay.absorbed_passes < replay.fast_passes, replay.absorbed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("N,M,solver", [(7, 9, "resident"), (33, 20, "streaming")], ids=lambda v: str(v))
def test_sqeuclidean_points_are_prepared_inside_the_kernels(N, M, solver, dtype, monkeypatch):
    """The raw points go to the kernels as they are: one launch finds each pair's centre, the cost kernels
    subtract it and zero the padding rows as they load. The results match the reference's, which prepares
    the points in float64 torch (points 1e4 from the origin, where fp32 points not centred would cancel
    beyond the gradient tolerance; NaN in padding; outputs poisoned), and a solve is
    2 Triton launches (centre + resident) or 3 (+ the cost tiles) and no torch op but the streaming kernel's
    zero initial potentials, a backward 2 (centre + one gradient launch for dx and dy) and no torch op
    (counted without the poisoning, whose fills are launches of their own)."""
    from benchmarks.launches import launches, trace_interpreted_launches

    from otfast import reference
    from otfast.schedule import Schedule

    batch = make_points(2, N, M, 8, dtype=dtype, seed=17, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x + 1e4, batch.y + 1e4, batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    u, v = torch.rand(2, N, dtype=dtype, device=DEVICE), torch.rand(2, M, dtype=dtype, device=DEVICE)
    schedule = Schedule(eps=0.5, n_iters=10)

    pots = backend.solve_points(x, y, alpha, beta, schedule)
    ref = reference.solve_points(x.cpu(), y.cpu(), alpha.cpu(), beta.cpu(), schedule)
    for got, want, what in ((pots.f, ref.f, "f"), (pots.g, ref.g, "g")):
        assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6, what=what)
    grads = backend.grad_points(x, y, alpha, beta, pots, schedule.eps, u, v)
    want = reference.grad_points(x.cpu(), y.cpu(), alpha.cpu(), beta.cpu(), ref, schedule.eps, u.cpu(), v.cpu())
    for got, w, what in zip(grads, want, ("dx", "dy")):
        assert got.dtype == dtype and torch.isfinite(got).all(), what
        assert_close(got.cpu(), w, rtol=1e-4, atol=1e-6, what=what)

    monkeypatch.delenv("OTFAST_DEBUG_POISON")
    if DEVICE.type == "cpu":
        trace_interpreted_launches()
    count = launches(lambda: backend.solve_points(x, y, alpha, beta, schedule), DEVICE.type)
    assert (count["triton"], count["torch"]) == ((2, 0) if solver == "resident" else (3, 2)), count
    count = launches(lambda: backend.grad_points(x, y, alpha, beta, pots, schedule.eps, u, v), DEVICE.type)
    assert (count["triton"], count["torch"]) == (2, 0), count


@pytest.mark.parametrize("N,M,solver", [(9, 6, "resident"), (33, 17, "streaming")], ids=lambda v: str(v))
def test_the_debiased_loss_takes_one_launch_per_kernel(N, M, solver, monkeypatch):
    """``solve_problems`` solves OT(x, y), OT(x, x) and OT(y, y) in one launch of each kernel, and
    ``grad_problems`` writes dx of OT(x, y) - OT(x, x) and dy of OT(x, y) - OT(y, y) in one more: each
    problem's potentials, iteration counts and residuals, and both gradients, match the reference's problem
    by problem, and the centres (x and y together, x, y) match torch's means of the valid points. The
    points lie 1e4 from the origin, padding is NaN, outputs are poisoned. Launches: a
    solve is 2 (centre + resident) or 3 (+ the packed costs, and a zero fill for each of the four initial
    potentials), a backward 2, where one problem at a time took three times as many."""
    from benchmarks.launches import launches, trace_interpreted_launches

    from otfast import reference
    from otfast.schedule import Schedule

    batch = make_points(2, N, M, 8, seed=23, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x + 1e4, batch.y + 1e4, batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    gen = torch.Generator().manual_seed(5)
    weights = [torch.rand(2, n, dtype=torch.float64, generator=gen).to(DEVICE) for n in (N, M, N, M)]
    schedule = Schedule(eps=0.5, n_iters=8)

    pots = backend.solve_problems(x, y, alpha, beta, schedule, debias=True)
    grads = backend.grad_problems(x, y, alpha, beta, pots, schedule.eps, weights)
    xc, yc, ac, bc = x.cpu(), y.cpu(), alpha.cpu(), beta.cpu()
    xm, ym = (torch.where(m.cpu().bool()[..., None], p, 0.0) for p, m in ((xc, mx), (yc, my)))
    nx, ny = mx.cpu().sum(1, keepdim=True).double(), my.cpu().sum(1, keepdim=True).double()
    centres = torch.stack([(xm.sum(1) + ym.sum(1)) / (nx + ny), xm.sum(1) / nx, ym.sum(1) / ny])
    assert_close(backend._centre(x, y, alpha, beta).cpu(), centres, rtol=1e-12, atol=0, what="centres")
    u, v, u_xx, u_yy = (w.cpu() for w in weights)
    ref = [reference.solve_points(xc, yc, ac, bc, schedule), reference.solve_points(xc, xc, ac, ac, schedule, True),
           reference.solve_points(yc, yc, bc, bc, schedule, True)]
    for got, want, problem in zip(pots, ref, ("xy", "xx", "yy")):
        for field in ("f", "g", "f_prev", "g_prev", "error"):
            assert_close(getattr(got, field).cpu(), getattr(want, field), rtol=1e-6, atol=1e-6,
                         what=f"{field} of OT({problem})")
        assert torch.equal(got.n_iters.cpu(), want.n_iters.to(got.n_iters.dtype)), problem
    dx, dy = reference.grad_points(xc, yc, ac, bc, ref[0], schedule.eps, u, v)
    dx = dx - reference.grad_points(xc, xc, ac, ac, ref[1], schedule.eps, u_xx, None)[0]
    dy = dy - reference.grad_points(yc, yc, bc, bc, ref[2], schedule.eps, u_yy, None)[0]
    for got, want, what in zip(grads, (dx, dy), ("dx", "dy")):
        assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6, what=what)

    monkeypatch.delenv("OTFAST_DEBUG_POISON")
    if DEVICE.type == "cpu":
        trace_interpreted_launches()
    count = launches(lambda: backend.solve_problems(x, y, alpha, beta, schedule, debias=True), DEVICE.type)
    assert (count["triton"], count["torch"]) == ((2, 0) if solver == "resident" else (3, 4)), count
    count = launches(lambda: backend.grad_problems(x, y, alpha, beta, pots, schedule.eps, weights), DEVICE.type)
    assert (count["triton"], count["torch"]) == (2, 0), count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_bounding_diameter_is_the_references_bit_for_bit(dtype, monkeypatch):
    """``triton_backend.bounding_diameter`` (each pair's box in one launch, reduced over the batch by torch)
    equals ``otfast.schedule.bounding_diameter`` bit for bit: ragged masks with NaN on padding (never read),
    strided x, D = 70 (two 64-wide feature blocks, the second ragged), x's extremes on some features and y's on
    others; a mask that is not bool is an error; and one launch with three torch reductions (and a conversion
    of fp32 sides) where the reference takes 17 launches."""
    from benchmarks.launches import launches, trace_interpreted_launches

    from otfast.schedule import bounding_diameter

    batch = make_points(3, 37, 20, 70, dtype=dtype, seed=31, junk=float("nan"))
    wide = torch.stack([batch.x, batch.x], dim=-1)[..., 0]  # x with a feature stride of 2
    x, y, mx, my = _on_device(wide, 3.0 * batch.y, batch.mask_x.bool(), batch.mask_y.bool())
    want = bounding_diameter(x, y, mx, my)
    got = backend.bounding_diameter(x, y, mx, my)
    assert got.dtype == torch.float64 and got.shape == ()
    assert torch.equal(got, want), (got.item(), want.item())
    with pytest.raises(TypeError, match="mask_x must be a bool tensor, got torch.int64"):
        backend.bounding_diameter(x, y, mx.long(), my)
    monkeypatch.delenv("OTFAST_DEBUG_POISON")
    if DEVICE.type == "cpu":
        trace_interpreted_launches()
    count = launches(lambda: backend.bounding_diameter(x, y, mx, my), DEVICE.type)
    assert (count["triton"], count["torch"]) == (1, 4 if dtype == torch.float32 else 3), count  # float64: no .double()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts torch calls as the CPU profiler sees them; on a GPU the "
                    "suite's launches step counts the CUDA kernels")
def test_a_loss_call_launches_what_the_readme_counts(monkeypatch):
    """``benchmarks.launches.measure`` of one debiased, annealed loss call with mask weights (the harness's
    settings) on the resident kernel: the forward 3 Triton launches (bounds, centre, solver) and 24 torch ops
    (masks and float64 weights 8, the diameter's reductions 5, the schedule buffer 1, dual values 7, flags, dtype,
    mean), the backward 2 Triton launches and 8 torch ops (the mean's backward 2, the upstream weights 2 and
    their conversion to the points' dtype 2, the accumulation into x.grad and y.grad 2): no weight gradient, no
    log-weights formed again, no per-problem scaling (README, "Inside a training step", Launches)."""
    from benchmarks.launches import measure, trace_interpreted_launches

    monkeypatch.delenv("OTFAST_DEBUG_POISON")
    trace_interpreted_launches()
    count = measure((2, 8, 9, 16), "triton", "cpu")
    assert (count["forward"]["triton"], count["forward"]["torch"]) == (3, 24), count
    assert (count["backward"]["triton"], count["backward"]["torch"]) == (2, 8), count


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # lanes past the pair's rows
@pytest.mark.parametrize("N,M,solver", [(9, 6, "resident"), (33, 17, "streaming")], ids=lambda v: str(v))
def test_the_breakdown_names_every_kernel_a_loss_call_launches(N, M, solver, monkeypatch):
    """``benchmarks.breakdown.kernel_times`` (the GPU suite's breakdown step) times each launch of one loss
    call under its kernel's name: the forward the bounding box of the annealing start, the centre, the solver's
    kernel and, streamed, the cost tiles;
    the backward the centre and the gradient. The times of a call add up to no more than its wall time (no
    launch counted twice)."""
    import time

    from benchmarks.breakdown import kernel_times
    from benchmarks.launches import trace_interpreted_launches

    monkeypatch.delenv("OTFAST_DEBUG_POISON")
    if DEVICE.type == "cpu":
        trace_interpreted_launches()
    batch = make_points(2, N, M, 8, seed=29)
    x, y = (t.requires_grad_() for t in _on_device(batch.x, batch.y))
    losses = {}

    def forward():
        losses["loss"] = otfast.sinkhorn_loss(x, y, eps=0.5, n_iters=4, backend="triton").sum()

    for call, kernels in ((forward, {"_bounds_kernel", "_centre_kernel", f"_sinkhorn_{solver}_kernel"}
                           | ({"_cost_kernel"} if solver == "streaming" else set())),
                          (lambda: losses["loss"].backward(), {"_centre_kernel", "_grad_kernel"})):
        started = time.perf_counter()
        times = kernel_times(call, DEVICE.type)
        elapsed = (time.perf_counter() - started) * 1e3
        assert set(times) - {"torch"} == kernels, times
        assert all(ms > 0 for ms in times.values()) and sum(times.values()) <= elapsed, (times, elapsed)


@pytest.mark.parametrize("N,M,sms", [(9, 6, 0), (37, 20, 0), (9, 6, 1000)],
                         ids=["one-block", "two-row-blocks", "three-groups"])
def test_backward_covers_every_feature_slice_and_group(N, M, sms, monkeypatch):
    """The backward forms each cost tile once per row block and multiplies its plan tile into every
    32-wide slice of y, accumulating in the output's own rows (the debiased loss's second terms in a
    second pass, added to the first's finished rows). D = 70: two full slices and a ragged one; N = 37
    gives two row blocks and two column tiles (the accumulator is rescaled between them); a GPU of 1000
    SMs (``_sm_count``) splits the features into three groups, one slice each. dx of OT(x, y) - OT(x, x)
    and dy of OT(x, y) - OT(y, y), and the plain dx, dy of OT(x, y), match the reference's from the same
    potentials; the outputs are poisoned."""
    from otfast import reference
    from otfast.reference import Potentials
    from otfast.schedule import Schedule

    monkeypatch.setattr(backend, "_sm_count", lambda device: sms)
    batch = make_points(2, N, M, 70, seed=29, junk=float("nan"))
    x, y, mx, my = batch.x.float(), batch.y.float(), batch.mask_x, batch.mask_y
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    gen = torch.Generator().manual_seed(7)
    u, v, u_xx, u_yy = (torch.rand(2, n, dtype=torch.float64, generator=gen) for n in (N, M, N, M))
    schedule = Schedule(eps=20.0, n_iters=20)  # plans spread over many columns, OT(x, x)'s too
    xd, yd = x.double(), y.double()
    pots = [reference.solve_points(xd, yd, alpha, beta, schedule), reference.solve_points(xd, xd, alpha, alpha,
                                                                                            schedule, True),
            reference.solve_points(yd, yd, beta, beta, schedule, True)]
    dx, dy = reference.grad_points(xd, yd, alpha, beta, pots[0], schedule.eps, u, v)
    want = [dx - reference.grad_points(xd, xd, alpha, alpha, pots[1], schedule.eps, u_xx, None)[0],
            dy - reference.grad_points(yd, yd, beta, beta, pots[2], schedule.eps, u_yy, None)[0]]
    for w, plain in zip(want, (dx, dy)):  # the second terms are not negligible
        assert (w - plain).abs().max() > 0.02 * plain.abs().max()

    on = _on_device
    got = backend.grad_problems(*on(x, y, alpha, beta), [Potentials(*on(*p)) for p in pots], schedule.eps,
                                on(u, v, u_xx, u_yy))
    for g, w, what in zip(got, want, ("dx - dx of OT(x, x)", "dy - dy of OT(y, y)")):
        assert_close(g.cpu(), w, rtol=1e-4, atol=1e-6, what=what)
    got = backend.grad_problems(*on(x, y, alpha, beta), [Potentials(*on(*pots[0]))], schedule.eps, on(u, v))
    for g, w, what in zip(got, (dx, dy), ("dx", "dy")):
        assert_close(g.cpu(), w, rtol=1e-4, atol=1e-6, what=what)


def test_backward_splits_features_only_to_fill_the_gpu():
    """``feature_groups``: one group (all of D per program, each cost tile formed once) unless the grid has
    fewer than ``GRAD_PROGRAMS_PER_SM`` programs per SM; the groups are whole slices and cover D exactly."""
    from otfast.kernels.triton.configs import GRAD_BLOCK, GRAD_PROGRAMS_PER_SM

    slice_ = GRAD_BLOCK[3]
    assert backend.feature_groups(96, 768, 0) == (1, 768)
    for programs, dim, sms in [(96, 768, 132), (4, 768, 132), (3072, 768, 132), (8, 70, 1000), (2, 16, 132),
                               (1, 1, 132)]:
        groups, per = backend.feature_groups(programs, dim, sms)
        assert per % slice_ == 0 and (groups - 1) * per < dim <= groups * per, (programs, dim, sms, groups, per)
        target, slices = GRAD_PROGRAMS_PER_SM * sms, -(-dim // slice_)
        if programs >= target:
            assert groups == 1, (programs, dim, sms, groups)
        else:  # within a factor 2 of the target (whole slices), never more groups than slices
            assert 2 * programs * groups > min(target, programs * slices) and groups <= slices, (programs, dim, sms,
                                                                                                 groups)


def _assert_same_solves(got, want):
    """Bitwise potentials and iteration counts under the interpreter (the same row blocks and column tiles
    in the same order), within 1e-6 on a GPU (other kernels, other contraction); residuals within 1e-6 (the
    split sums its programs' fp32 partial sums in float64)."""
    for g, w in zip(got, want, strict=True):
        for field in ("f", "g", "f_prev", "g_prev"):
            a, b = getattr(g, field), getattr(w, field)
            assert torch.equal(a, b) if DEVICE.type == "cpu" else torch.allclose(a, b, rtol=1e-6, atol=1e-6), field
        assert torch.equal(g.n_iters, w.n_iters), (g.n_iters, w.n_iters)
        assert_close(g.error.cpu(), w.error.cpu(), rtol=1e-6, atol=0, what="residual")


@pytest.mark.parametrize("setting,source", [("anneal-unbalanced-debias", "cost"), ("tol", "cost"),
                                            ("anneal-unbalanced-debias", "points")])
def test_split_rows_solve_as_one_program_does(setting, source, monkeypatch):
    """``OTFAST_TRITON_SPLIT=phases`` on 18 SMs: each of the 2 pairs x 3 problems splits its 37 rows and 33
    columns among 3 programs (32 rows, 5 and none; ``SPLIT_MIN_ROWS`` lowered to 12), which decide each
    step's residual together. Potentials, f_prev, g_prev and iteration counts are those of the streaming
    kernel (one program per pair and problem) bit for bit: annealing with float64 passes, unbalanced,
    debiased; and with a tolerance, where the pairs stop after different numbers of updates; on the packed
    cost and with every tile formed from the points (``OTFAST_TRITON_STREAM``; the split kernel never reads an
    absorbed cost, so "cost" is the packed source to compare with)."""
    from otfast.schedule import Schedule

    monkeypatch.setenv("OTFAST_TRITON_STREAM", source)
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "off")
    batch = make_points(2, 37, 33, 8, seed=31, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x, batch.y, batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    if setting == "tol":
        schedule, debias = Schedule(eps=2.0, n_iters=300, tol=1e-2), False
    else:
        schedule, debias = Schedule(eps=0.01, anneal=(4.0, 0.25), n_iters=3, rho=2.0), True
    want = backend.solve_problems(x, y, alpha, beta, schedule, debias=debias)
    if setting == "tol":
        assert want[0].n_iters[0] != want[0].n_iters[1], want[0].n_iters
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "phases")
    monkeypatch.setattr(backend, "_sm_count", lambda device: 18)
    monkeypatch.setattr(backend, "SPLIT_MIN_ROWS", 12)
    splits = _spy_on_split(monkeypatch)
    _assert_same_solves(backend.solve_problems(x, y, alpha, beta, schedule, debias=debias), want)
    assert splits == [(3, source == "points")], splits


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any torch op makes while it is active, in bytes: the launchers' buffers, and
    everything else torch computes on the way (the interpreter's copies of the arguments too)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_streaming_from_the_points_needs_no_cost_buffer(cost, monkeypatch):
    """``OTFAST_TRITON_STREAM=points``: the streaming kernel forms every cost tile from the points in every
    pass (fp32 raw points for sqeuclidean, the float64 normalised ones for cosine; NaN in the padding). No
    torch op makes a tensor larger than the points in float64 (B N D x 8 bytes; the packed cost makes B N M x
    4 and more), and the three problems of the debiased loss, annealed and unbalanced, solve as
    on the packed cost: the same iteration counts, potentials within 1e-12 (the cost kernel's larger tiles
    can round a cost entry's last bit differently under the interpreter), 1e-6 on a GPU."""
    from otfast.schedule import Schedule

    batch = make_points(2, 40, 36, 8, seed=47, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x.float(), batch.y.float(), batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    schedule = Schedule(eps=0.01, anneal=(4.0, 0.25), n_iters=2, rho=2.0)
    solved = {}
    for source in ("cost", "points"):
        monkeypatch.setenv("OTFAST_TRITON_STREAM", source)
        with _Allocations() as seen:
            solved[source] = backend.solve_problems(x, y, alpha, beta, schedule, debias=True, cost=cost)
        solved[source + " largest"] = seen.largest
    assert solved["cost largest"] >= 2 * 40 * 36 * 4
    assert solved["points largest"] <= 2 * 40 * 8 * 8, solved["points largest"]
    tol = 1e-12 if DEVICE.type == "cpu" else 1e-6
    for got, want in zip(solved["points"], solved["cost"], strict=True):
        for field in ("f", "g", "f_prev", "g_prev"):
            assert_close(getattr(got, field).cpu(), getattr(want, field).cpu(), rtol=tol, atol=tol, what=field)
        assert torch.equal(got.n_iters, want.n_iters), (got.n_iters, want.n_iters)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="measures the GPU's peak memory")
def test_streaming_from_the_points_keeps_the_peak_memory_of_the_potentials():
    """On a GPU, the debiased loss forward and backward of a pooled problem of 2048 words (D = 16, 5 updates)
    streamed from the points allocates no more than O(B (N + M) D) beyond its inputs: under a tenth of what
    the packed cost alone takes (3 x 2048^2 x 8 bytes = 96 MiB), which source "cost" allocates."""
    batch = make_points(1, 2048, 2048, 16, seed=53, ragged=False)
    x, y = (t.float().to(DEVICE).requires_grad_() for t in (batch.x, batch.y))
    kw = dict(eps=0.05, scaling=None, n_iters=5, backend="triton")
    peaks = {}
    for source in ("points", "cost"):
        os.environ["OTFAST_TRITON_STREAM"] = source
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.autograd.grad(otfast.sinkhorn_loss(x, y, **kw).sum(), (x, y))
            torch.cuda.synchronize()
            peaks[source] = torch.cuda.max_memory_allocated() - base
        finally:
            del os.environ["OTFAST_TRITON_STREAM"]
    assert peaks["cost"] >= 3 * 2048**2 * 8, peaks
    assert peaks["points"] < 3 * 2048**2 * 8 / 10, peaks


def _spy_on_split(monkeypatch) -> list[tuple[int, bool]]:
    """The programs per pair and problem of every ``_split`` solve from here on, and whether it formed its cost
    from the points."""
    calls, split = [], backend._split

    def spy(stream, *args):
        calls.append((args[7], stream.from_points))
        return split(stream, *args)

    monkeypatch.setattr(backend, "_split", spy)
    return calls


def test_persistent_split_kernel_runs_the_whole_schedule_in_one_launch(monkeypatch):
    """The persistent form (every step in one launch, the programs meeting at ``_grid_sync``) with one
    program per pair and problem, which the interpreter can run (more would wait for each other forever
    there, its programs running one after the other): the streaming kernel's results (9 x 6 points, the
    debiased loss's three problems, annealed), in one launch."""
    from benchmarks.launches import launches, trace_interpreted_launches

    from otfast.schedule import Schedule

    batch = make_points(2, 9, 6, 8, seed=37, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x, batch.y, batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    schedule = Schedule(eps=0.3, anneal=(2.0, 0.5), n_iters=5)
    hi, lo = backend.cost_matrix(backend._points(x, y, alpha, beta, "sqeuclidean"), alpha, beta, backend.XY, 3)
    stream = backend._Stream.packed(hi, lo, absorb=False)  # as the split kernel reads it
    want = backend._streaming(stream, alpha, beta, schedule, backend.XY, 3, 9, 6)
    if DEVICE.type == "cpu":
        trace_interpreted_launches()
    got = []
    count = launches(lambda: got.append(backend._split(stream, alpha, beta, schedule, backend.XY, 3, 9, 6, 1, True)),
                     DEVICE.type)
    assert count["triton"] == 1, count
    _assert_same_solves(got[0], want)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="several programs waiting for each other need a GPU")
@pytest.mark.parametrize("N,M,tol", [(300, 257, None), (2048, 2048, 1e-4)], ids=["300x257-annealed", "2048-tol"])
def test_persistent_split_matches_one_program_per_problem_on_cuda(N, M, tol, monkeypatch):
    """On a GPU, the persistent split with as many programs per pair and problem as fill the idle SMs
    (``_grid_sync`` with several programs) solves the debiased loss's three problems as the streaming
    kernel does."""
    from otfast.schedule import Schedule

    monkeypatch.setenv("OTFAST_TRITON_STREAM", "cost")  # see test_split_rows_solve_as_one_program_does
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "off")
    batch = make_points(1, N, M, 16, seed=41, junk=float("nan"))
    x, y, mx, my = _on_device(batch.x.float(), batch.y.float(), batch.mask_x, batch.mask_y)
    alpha, beta = _uniform_log_weights(mx), _uniform_log_weights(my)
    schedule = Schedule(eps=0.01, anneal=(4.0, 1.0, 0.25, 0.0625, 0.015625), n_iters=50, tol=tol)
    want = backend.solve_problems(x, y, alpha, beta, schedule, debias=True)
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "persistent")
    splits = _spy_on_split(monkeypatch)
    _assert_same_solves(backend.solve_problems(x, y, alpha, beta, schedule, debias=True), want)
    assert len(splits) == 1 and splits[0][0] > 1, splits


CELLS = [("cosine", 0.05, False, 1.0), ("sqeuclidean", 0.0025, True, 1.0)]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="records the choices of interpreted kernels")
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("cost,eps,debias,scale", CELLS, ids=[f"{c}-eps{e}-{'debias' if d else 'plain'}-scale{s}"
                                                              for c, e, d, s in CELLS])
def test_the_absorbed_cost_keeps_the_accuracy_matrix_bounds(cost, eps, debias, scale, monkeypatch):
    """Streamed pairs (40 x 36 points, D = 16, ragged masks) at a fixed temperature, 15 updates from zero
    potentials, where most fast passes read the absorbed cost (recorded): the loss and its gradients in fp32
    stay within the accuracy matrix's bounds of the float64 torch backend (value 2e-6, gradient 1e-4,
    relative to the largest entry). (The exact path, source "cost", is the split kernel's: the split tests
    compare the two bit for bit.)"""
    from otfast.kernels.triton import sinkhorn

    batch = make_points(2, 40, 36, 16, seed=43)
    kw = dict(cost=cost, eps=eps, scaling=None, n_iters=15, debias=debias)
    x64, y64 = (batch.x * scale).double().requires_grad_(), (batch.y * scale).double().requires_grad_()
    want = otfast.sinkhorn_loss(x64, y64, batch.mask_x, batch.mask_y, backend="torch", **kw)
    want_grads = torch.autograd.grad(want.sum(), (x64, y64))
    columns, absorbed = sinkhorn._stream_columns, []

    def recorded(A_COL, POT_COL, n_cols, absorbs, store, BLOCK):
        absorbed.append(bool(absorbs))
        return columns(A_COL, POT_COL, n_cols, absorbs, store, BLOCK)

    monkeypatch.setattr(sinkhorn, "_stream_columns", recorded)
    x, y = (batch.x * scale).float().requires_grad_(), (batch.y * scale).float().requires_grad_()
    got = otfast.sinkhorn_loss(x, y, batch.mask_x, batch.mask_y, backend="triton", **kw)
    grads = torch.autograd.grad(got.sum(), (x, y))
    value = float(((got.double() - want).abs().max() / want.abs().max()).detach())
    grad = max(float((g.double() - w).abs().max() / w.abs().max()) for g, w in zip(grads, want_grads))
    assert len(absorbed) / 2 < sum(absorbed) < len(absorbed), absorbed
    assert value <= 2e-6 and grad <= 1e-4, (value, grad)


@pytest.mark.parametrize("mode", ["auto", "persistent"])
def test_split_count_fills_idle_sms(monkeypatch, mode):
    """``split_count``: 1 when ``OTFAST_TRITON_SPLIT`` is off (and by default, "auto", under the interpreter)
    and wherever pairs x problems fill the SMs; otherwise as many programs per pair and problem as fill
    them, never more than the SMs (a persistent grid must fit at once), and no more than give the longer
    side ``SPLIT_MIN_ROWS`` rows each. A bad ``OTFAST_TRITON_SPLIT`` is an error naming it."""
    from otfast.kernels.triton.configs import SPLIT_MIN_ROWS

    monkeypatch.setattr(backend, "_sm_count", lambda device: 132)
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "off")
    assert backend.split_count(1, 3, 2048, 2048, DEVICE) == 1
    monkeypatch.delenv("OTFAST_TRITON_SPLIT")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.split_mode() == "auto" and backend.split_count(1, 3, 2048, 2048, DEVICE) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", mode)
    for b, count, n, m in [(1, 3, 2048, 2048), (1, 1, 16384, 300), (24, 3, 48, 48), (64, 3, 512, 512),
                           (2, 3, 512, 4096), (1, 3, 40, 40), (1, 3, 65, 65), (1, 3, 200, 40)]:
        k = backend.split_count(b, count, n, m, DEVICE)
        assert 1 <= k and b * count * k <= max(132, b * count), (b, count, n, m, k)
        assert k == 1 or max(n, m) // k >= SPLIT_MIN_ROWS, (b, count, n, m, k)
        assert k == max(1, min(132 // (b * count), max(n, m) // SPLIT_MIN_ROWS)), (b, count, n, m, k)
    assert backend.split_count(1, 3, 2048, 2048, DEVICE) == 2048 // SPLIT_MIN_ROWS
    monkeypatch.setenv("OTFAST_TRITON_SPLIT", "on")
    with pytest.raises(ValueError, match="OTFAST_TRITON_SPLIT"):
        backend.split_count(1, 3, 2048, 2048, DEVICE)


def test_problems_a_packed_cost_cannot_index_are_refused_or_solved_from_the_points(monkeypatch):
    """One problem of 2^31 or more cost entries per pair (46341 x 46341: OT(x, y), or OT(x, x) of the
    debiased loss beside a short y) in a packed cost is a clear error before any launch or allocation, not a
    wrong index: asked for explicitly, or for a precomputed cost. By default (``stream_source`` "auto") the
    streaming solvers form such a problem's tiles from the points instead, which index no [N, M] buffer."""
    from otfast.schedule import Schedule

    n = 46341
    x, y = torch.zeros(1, n, 1, device=DEVICE), torch.zeros(1, 10, 1, device=DEVICE)
    a, b = torch.zeros(1, n, dtype=torch.float64, device=DEVICE), torch.zeros(1, 10, dtype=torch.float64,
                                                                                device=DEVICE)
    assert backend.stream_source(1, [(n, 10), (n, n), (10, 10)], DEVICE) == "points"
    with pytest.raises(ValueError, match=r"46341 x 46341 problem .* >= 2\^31"):
        backend.stream_source(1, [(n, n)], DEVICE, from_points=False)
    for source in ("absorbed", "cost"):
        monkeypatch.setenv("OTFAST_TRITON_STREAM", source)
        with pytest.raises(ValueError, match=r"46341 x 46341 problem .* >= 2\^31"):
            backend.solve_problems(x, y, a, b, Schedule(eps=0.1), debias=True)
        with pytest.raises(ValueError, match=r"2\^31"):
            backend.solve_points(x, x, a, a, Schedule(eps=0.1))


def test_the_stream_source_fits_the_buffers_in_the_device_memory_share(monkeypatch):
    """``stream_source``: "auto" takes the packed and absorbed cost (12 bytes per entry) while it fits in
    ``STREAM_MEMORY_SHARE`` of the device's memory, then the packed cost alone (8), then the points (none);
    an explicit ``OTFAST_TRITON_STREAM`` is obeyed; a precomputed cost reads "points" as "cost"; a bad value
    is an error naming the variable."""
    from otfast.kernels.triton.configs import STREAM_MEMORY_SHARE

    shapes = [(100, 80), (100, 100), (80, 80)]  # 24,400 entries per pair: 2 pairs, 48,800
    for memory, want in [(12 * 48_800 / STREAM_MEMORY_SHARE, "absorbed"),
                         (12 * 48_800 / STREAM_MEMORY_SHARE - 1, "cost"),
                         (8 * 48_800 / STREAM_MEMORY_SHARE, "cost"),
                         (8 * 48_800 / STREAM_MEMORY_SHARE - 1, "points")]:
        monkeypatch.setattr(backend, "_device_memory", lambda device, memory=memory: memory)
        assert backend.stream_source(2, shapes, DEVICE) == want, memory
        assert backend.stream_source(2, shapes, DEVICE, from_points=False) == want.replace("points", "cost")
    for source in ("absorbed", "cost", "points"):
        monkeypatch.setenv("OTFAST_TRITON_STREAM", source)
        assert backend.stream_source(2, shapes, DEVICE) == source
    monkeypatch.setenv("OTFAST_TRITON_STREAM", "buffer")
    with pytest.raises(ValueError, match="OTFAST_TRITON_STREAM must be one of auto, absorbed, cost, points"):
        backend.stream_source(2, shapes, DEVICE)
