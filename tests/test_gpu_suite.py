"""``benchmarks/gpu_suite.sh`` without a GPU: its steps run a stand-in Python that writes what each real command
writes (``--out``, ``--json``), so that what the suite leaves in its output folder is checked here."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A GPU machine lent here returns at most 8 files from its output folder, none more than 2 folders down.
RETURNED_FILES, RETURNED_DEPTH = 8, 2

FAKE_PYTHON = r"""#!/usr/bin/env bash
# python3 as the suite calls it: imports succeed; -m MODULE writes what MODULE writes; benchmarks.accuracy fails
[ "$1" = -m ] || exit 0
module=$2; shift 2
echo "ran $module $*"
[ "$module" = benchmarks.accuracy ] && sleep "${FAKE_ACCURACY_SECONDS:-0}"
while [ $# -gt 0 ]; do
  case $1 in
    --json) touch "$2" ;;
    --out) if [ "$module" = benchmarks.harness_gpu ]; then
             for backend in triton torch; do  # a training run's folder (train.align)
               mkdir -p "$2/harness-$backend/model" "$2/harness-$backend/checkpoints/step-200" "$2/harness-$backend/tb"
               touch "$2/harness-$backend/"{metrics.json,metrics.csv,run_config.json,data_report.json} \
                 "$2/harness-$backend/model/"{config.json,model.safetensors,tokenizer.json,vocab.txt} \
                 "$2/harness-$backend/checkpoints/step-200/"{optimizer.pt,scheduler.pt} "$2/harness-$backend/tb/events"
             done
           else
             touch "$2/results.csv" "$2/table.md" "$2/plot-cuda.png"
           fi ;;
  esac
  shift
done
[ "$module" != benchmarks.accuracy ]
"""


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_suite_leaves_what_a_gpu_machine_returns(tmp_path):
    """Every step logs to its section of ``suite.log`` (a failing one too, and the suite goes on and exits 1),
    and the output folder holds no more files, nor deeper, than a GPU machine returns: the CSV, the two JSON
    files, the report's table and plot, the log; the alignment runs' folders go elsewhere."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), TMPDIR=str(tmp_path), GPU_SUITE_STEPS="")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "!! accuracy failed (exit 1)" in run.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["accuracy.json", "breakdown.json", "plot-cuda.png", "results.csv", "suite.log", "table.md"]
    assert len(files) <= RETURNED_FILES and all(f.count("/") <= RETURNED_DEPTH for f in files)
    log = (out / "suite.log").read_text()
    steps = ["env", "accuracy", "tests", "goals", "breakdown", "split-test", "split", "flash", "step", "harness",
             "launches", "sweep"]
    for step in steps:
        assert f"== {step} (at most" in log
    assert log.count("ran benchmarks.report") == 4
    assert "ran benchmarks.harness_gpu --backends triton " in log  # two backends' 400 steps overran its 55 s


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_the_suite_ends_within_its_seconds(tmp_path):
    """GPU_SUITE_SECONDS bounds the whole suite: a step's limit is cut to what is left (10 s kept for the kill
    grace), and the steps after the time is spent are skipped, each saying so, and the suite exits 1."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(python), TMPDIR=str(tmp_path), GPU_SUITE_STEPS="", GPU_SUITE_SECONDS="20",
               FAKE_ACCURACY_SECONDS="6")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    log = (out / "suite.log").read_text()
    cut = int(re.search(r"== accuracy \(at most (\d+) s\)", log).group(1))     # from 30: 20 - 10 - the s gone
    assert "== env (at most 10 s)" in log and cut in (9, 10), log
    for step in ("tests", "goals", "breakdown", "split-test", "split", "flash", "step", "harness", "launches",
                 "sweep"):
        assert f"!! {step} skipped: the suite's 20 s (GPU_SUITE_SECONDS) are spent" in log
        assert f"== {step} (at most" not in log


def test_the_cuda_tests_step_leaves_out_the_compile_only_tests():
    """The suite's CUDA tests step selects none of the tests that compile for sm_90 in a process of their own
    (SASS counts, spills: ``_compiling``), which CI runs without a GPU and which would take the step's time."""
    script = (ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    lines = script[script.index("step tests "):].splitlines()
    command = " ".join(lines[:next(i for i, line in enumerate(lines) if not line.endswith("\\")) + 1])
    files, expression = re.findall(r"tests/\S+", command), re.search(r'-k "([^"]+)"', command).group(1)
    compiling = set()
    for path in {f.split("::")[0] for f in files}:
        for node in ast.parse((ROOT / path).read_text()).body:
            calls = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and calls & {"_compiling",
                                                                                                "_sass_loops"}:
                compiling.add(node.name)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *files,
                          "-k", expression], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = {line.split("::")[1].split("[")[0] for line in run.stdout.splitlines() if "::" in line}
    assert compiling and collected, run.stdout + run.stderr
    assert not collected & compiling
