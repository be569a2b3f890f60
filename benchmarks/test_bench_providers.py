"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (the main test run collects only ``tests/``).

Every provider of ``benchmarks.providers`` on a small grid, both settings, forward and forward+backward,
on CUDA when there is one, else CPU. Each case first checks the provider's values (and gradients) against
the otfast torch reference and fails on a wrong answer, so only correct answers get timed.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from benchmarks.providers import SETTINGS, check, grads_checked, make_inputs, providers, reference
from benchmarks.report import run_once, timed_call
from benchmarks.timing import synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(8, 37, 41, 768), (32, 40, 40, 768)]
PROVIDERS = {p.label: p for p in providers()}


def shape_id(shape: tuple[int, int, int, int]) -> str:
    B, N, M, D = shape
    return f"B{B}-N{N}-M{M}-D{D}-fp32"


@lru_cache(maxsize=4)
def _case(setting: str, shape: tuple[int, int, int, int]):
    x, y = make_inputs(*shape, dtype=torch.float32, device=DEVICE)
    return x, y, reference(x, y, SETTINGS[setting], backward=True)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("mode", ["forward", "fwd+bwd"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("label", list(PROVIDERS))
def test_provider(benchmark, label, setting, mode, shape):
    provider, s = PROVIDERS[label], SETTINGS[setting]
    reason = provider.skip_reason(DEVICE, s)
    if reason:
        pytest.skip(reason)
    x, y, ref = _case(setting, shape)
    backward = mode == "fwd+bwd"
    values, grads = run_once(provider, x, y, s, backward)
    verdict = check(values, grads, ref, check_grad=grads_checked(provider, s))
    assert verdict.ok, f"{label} gives a wrong answer: {verdict.detail}"
    call = timed_call(provider, x, y, s, backward)

    def run():
        call()
        synchronize(DEVICE)

    benchmark.extra_info.update(provider=label, setting=setting, mode=mode, device=DEVICE,
                                value_err=verdict.value_err)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
