"""What the benchmark providers compute, against the libraries' own way of computing it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import otfast
from benchmarks.providers import SETTINGS, _pot_cost, _pot_solve_batch, check, make_inputs, reference


def test_pot_provider_is_pots_envelope_mode_bit_for_bit():
    """The POT provider solves on the detached cost and adds the envelope term, where ``grad="envelope"`` keeps
    the autograd graph of every update: the value and gradients are POT's own, bit for bit."""
    ot = pytest.importorskip("ot")
    setting = SETTINGS["fixed"]  # POT has no annealing: the paper setting skips it
    x, y = make_inputs(3, 7, 9, 16, seed=4)

    def pots(u, v):
        return ot.solve_batch(_pot_cost(u, v, setting), reg=setting.eps, max_iter=setting.n_iters, tol=0.0,
                              method="log_sinkhorn", reg_type="kl", grad="envelope").value

    runs = []
    for fn in (pots, lambda u, v: _pot_solve_batch(u, v, setting)):
        u, v = x.clone().requires_grad_(), y.clone().requires_grad_()
        value = fn(u, v)
        runs.append((value.detach(), *torch.autograd.grad(value.sum(), (u, v))))
    for want, got in zip(*runs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name, change", [("fixed", dict(n_iters=1)), ("paper", dict(debias=False))],
                         ids=["one-update", "no-debias"])
def test_the_value_check_catches_a_provider_that_skips_work(name, change):
    """A provider that runs one update of the fixed setting's 100, or leaves out the paper setting's debiased
    terms, is reported wrong (not timed); the tolerances used to pass both (2e-3 / 2e-2)."""
    setting = SETTINGS[name]
    x, y = make_inputs(8, 16, 16, 768)
    ref = reference(x, y, setting, backward=True)
    u, v = x.clone().requires_grad_(), y.clone().requires_grad_()
    values = otfast.sinkhorn_loss(u, v, reduction="none", backend="torch",
                                  **dataclasses.replace(setting, **change).otfast_kwargs())
    result = check(values, torch.autograd.grad(values.sum(), (u, v)), ref)
    assert not result.ok and "value rel. err" in result.detail, result


def test_the_thread_benchmark_runs_each_policy_in_a_process_of_its_own():
    """``benchmarks.threads`` times the spinning default and the passive policy in fresh processes: libgomp's
    own report (``GOMP_SPINCOUNT``) says which one each process ran under."""
    from benchmarks.threads import SETTINGS as POLICIES
    from benchmarks.threads import measure

    spins = {name: measure(threads, policy, (2, 5, 6, 8), steps=1) for name, threads, policy in POLICIES[1:]}
    counts = [count for _, count in spins.values()]
    if None in counts:
        pytest.skip("torch's OpenMP runtime is not GNU libgomp (no GOMP_SPINCOUNT in its OMP_DISPLAY_ENV report)")
    assert counts[0] > 0 and counts[1] == 0, spins
    assert all(ms > 0 for ms, _ in spins.values())
