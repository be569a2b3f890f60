"""otfast benchmarks: providers, the pytest-benchmark suite, the report CLI and the encoder-step benchmark.

- ``benchmarks.providers``: every implementation compared, as callables on the same inputs, and the
  value check against the otfast torch reference.
- ``benchmarks.results``: the CSV schema and everything generated from the CSV (markdown table, PNG plot,
  ``benchmarks/RESULTS.md``, the README table).
- ``python -m benchmarks.report``: the sweep. ``python -m benchmarks.step``: one encoder alignment step.
  ``python -m benchmarks.launches``: the kernel launches of one loss call. ``python -m benchmarks.threads``: the
  OpenMP wait policy on a busy machine.
- ``pytest benchmarks/ --benchmark-only``: the pytest-benchmark suite (not collected by the main test run).

Importing it imports ``train`` first, which sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a
policy (``train``'s docstring says why), as ``./dev`` does (README, "Threads on a busy machine").
"""

import train  # noqa: F401  (the OpenMP wait policy, before anything imports torch)
