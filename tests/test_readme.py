"""The README's first example runs as printed, without a warning."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_usage_example_runs_without_warnings():
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(_usage_block(), "README.md (Usage)", "exec"), namespace)
    assert namespace["loss"].isfinite()
    assert namespace["x"].grad is not None and namespace["x"].grad.isfinite().all()
    res = namespace["res"]
    assert int(res.n_iters.max()) < 3000
    assert bool((res.marginal_error <= 2e-6).all())  # the final step may land a rounding above tol
