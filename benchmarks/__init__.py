"""otfast benchmarks: providers, the pytest-benchmark suite, the report CLI and the encoder-step benchmark.

- ``benchmarks.providers``: every implementation compared, as callables on the same inputs, and the
  value check against the otfast torch reference.
- ``benchmarks.results``: the CSV schema and everything generated from the CSV (markdown table, PNG plot,
  ``benchmarks/RESULTS.md``, the README table).
- ``python -m benchmarks.report``: the sweep. ``python -m benchmarks.step``: one encoder alignment step.
  ``python -m benchmarks.launches``: the kernel launches of one loss call.
- ``pytest benchmarks/ --benchmark-only``: the pytest-benchmark suite (not collected by the main test run).
"""
