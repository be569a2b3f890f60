#!/usr/bin/env bash
# Everything that needs a GPU, in one call that fits a 15-minute lease (the steps' limits add up to 360 s on an
# H100/H200, JIT compiles included, and 60 more for a first check of a carried triton), ordered by value so that a
# cut-short run still returns the most important results: the accuracy matrix of every backend, the CUDA tests, the five
# Triton v2 goal points against POT and GeomLoss, where their time goes (benchmarks.breakdown: per kernel, per update,
# against the batch), the row split's CUDA test on its own (programs that wait for each other), then
# otfast[triton-nosplit] (one program per long pair), otfast[triton-exact] (the packed cost without its absorbed cost)
# and otfast[triton-tile32] (33 to 64 tokens streamed, not on the 64 tile) at the goal points, flash-sinkhorn there, the
# training-step benchmark, the tiny alignment run with bf16 autocast (retrieval must lift), the launches per loss call,
# and last the sweep within its time budget. Each step has its own timeout (seconds, below) and logs to its own section
# of $OUT_DIR/suite.log; CSV rows go to $OUT_DIR/results.csv, which `./dev python -m benchmarks.report --render
# OUT_DIR/results.csv --update-docs` turns into benchmarks/RESULTS.md, the accuracy matrix to $OUT_DIR/accuracy.json and
# the breakdown's rows to $OUT_DIR/breakdown.json: six files in all, with the report's table.md and plot-cuda.png, as a
# GPU machine lent here returns 8 at most (the alignment runs' folders go to a temporary folder; what the harness prints
# is their result). (The sm_90 resource check is not here: it needs no GPU, and the README says how it runs under each
# triton that pyproject.toml allows.) Benchmark providers whose packages are missing (POT, GeomLoss, flash-sinkhorn: no
# network on the GPU machines) are skipped and say so, and the harness needs `datasets`, `sacremoses` and what they pull
# in: `python -m benchmarks.carry` writes their wheels, small enough to travel, into .whl/ (README, "On a GPU machine");
# this script installs .whl/*.whl into a private folder ahead of site-packages first, so that a triton carried there
# (`--triton 3.9.0`: the image's 3.6 has no 64 tile) is the one every step runs under, unless it fails a small loss on
# this GPU first (then the image's triton runs them, and the output says so).
# GPU_SUITE_STEPS="goals step" runs only the steps named (a second call of a lease, after a fix). The whole suite, the
# install included, ends within GPU_SUITE_SECONDS (default 360: the six minutes of a 15-minute lease it may take): a
# step's limit is cut to what is left, and a step with under 5 s left is skipped and says so (the steps run in order
# of value, so those are the last ones).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
status=0
deadline=${GPU_SUITE_SECONDS:-360}
if ! "$PY" -c "import otfast.kernels" 2> /dev/null; then
  # kernels/ is installed as otfast.kernels: an offline editable install (it also builds the CPU kernel),
  # else a source copy that lays the tree out as installed, where everything below then runs.
  echo "== install: pip install -e ." >> "$out/suite.log"
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$out/suite.log" 2>&1; then
    echo "!! pip install -e . failed (see $out/suite.log): running from a source copy instead"
    rm -rf /tmp/otfast-src && cp -r . /tmp/otfast-src && cp -r kernels /tmp/otfast-src/otfast/kernels \
      && cd /tmp/otfast-src
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the carried wheels, ahead of site-packages: a triton among them is the one every step runs under
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/otfast-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/otfast-site"
fi
# A carried triton whose compiler this machine cannot run (its ptxas needs a newer driver, say) would fail every
# step: one small debiased loss and its gradient against the torch backend first (at most 60 s), else the
# image's triton
if [ -d /tmp/otfast-site/triton ] && ! { echo "== carried-triton: its first check"; timeout 60 "$PY" -c "
import torch, otfast
x, y = torch.randn(2, 9, 16, device='cuda'), torch.randn(2, 7, 16, device='cuda')
out = [otfast.sinkhorn_loss(x.requires_grad_(), y, backend=b) for b in ('triton', 'torch')]
grads = [torch.autograd.grad(v, x)[0] for v in out]
assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(*grads, atol=1e-4), (out, grads)
print('carried triton', __import__('triton').__version__, 'compiles and agrees with the torch backend')
"; } >> "$out/suite.log" 2>&1; then
  echo "!! the carried triton failed its first check (or took over 60 s; see $out/suite.log): every step runs" \
    "under the image's triton"
  rm -rf /tmp/otfast-site/triton /tmp/otfast-site/triton-*.dist-info
fi
step() {  # step NAME SECONDS COMMAND...: run under a timeout, log to $out/suite.log, remember failures, go on
  local name=$1 limit=$2; shift 2
  [[ -n ${GPU_SUITE_STEPS:-} && " $GPU_SUITE_STEPS " != *" $name "* ]] && return
  local left=$((deadline - SECONDS - 10))  # 10: the grace before a step that ignores its timeout is killed
  if (( left < 5 )); then
    echo "!! $name skipped: the suite's ${deadline} s (GPU_SUITE_SECONDS) are spent" | tee -a "$out/suite.log"
    status=1
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most ${limit} s): $*" | tee -a "$out/suite.log"
  local start=$SECONDS from
  from=$(($(wc -c < "$out/suite.log") + 1))
  timeout --kill-after=10 "$limit" "$@" >> "$out/suite.log" 2>&1
  local rc=$?
  (( rc == 124 || (rc == 137 && SECONDS - start >= limit) )) && echo "!! $name stopped at its ${limit} s limit"
  [ $rc -ne 0 ] && { echo "!! $name failed (exit $rc)"; status=1; }
  echo "   $name took $((SECONDS - start)) s"
  tail -c "+$from" "$out/suite.log" | tr '\r' '\n' | tail -n 4 | cut -c 1-400  # progress bars redraw with \r
}
# the report steps' rows share one run_id, so that `--render` shows them as one run
run_id=suite-$(date -u +%Y%m%dT%H%M%S)-cuda
goals() {  # goals STEP SECONDS PROVIDERS...: the five goal points, timed (benchmarks.report --goals)
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" -m benchmarks.report --goals --device cuda --out "$out" --budget 3 --repeats 10 \
    --note gpu_suite.sh --run-id "$run_id" "$@"
}
# pytest-xdist (in the GPU images) compiles the tests' kernels on several cores
xdist=$("$PY" -c "import xdist" 2> /dev/null && echo "-n 8")
step env 10 "$PY" -c "import torch, triton, otfast; print(torch.__version__, triton.__version__, triton.__file__)
print(torch.cuda.get_device_name(0)); print(otfast.backends())"
step accuracy 30 "$PY" -m benchmarks.accuracy --device cuda --json "$out/accuracy.json"
# the CUDA tests; not the compile-only ones (spills, SASS counts: CI compiles every configuration without a
# GPU) nor the accuracy cells (the accuracy step runs them)
step tests 60 "$PY" -m pytest -q $xdist tests/test_compile.py tests/test_triton_interpreter.py \
  tests/test_accuracy.py::test_gradient_on_nearly_aligned_points \
  -k "(triton or cuda) and not persistent_split_matches and not sm90 and not common_path and not reduction_per_step"
# (POT's per-pair loop and the unrolled PyTorch loss take seconds per call there: the sweep has them)
goals goals 60 --skip triton-,flash,sinkhorn_log,unrolled
step breakdown 25 "$PY" -m benchmarks.breakdown --device cuda --json "$out/breakdown.json"
# the row split (a persistent kernel) on its own, so that a hang costs only this step: its CUDA test (programs
# that wait for each other); then the goal points without it, without the absorbed cost and without the 64 tile
step split-test 20 "$PY" -m pytest -q tests/test_triton_interpreter.py -k persistent_split_matches
goals split 35 --only triton-
goals flash 15 --only flash
step step 30 "$PY" -m benchmarks.step --device cuda --quick --out "$out" --note "gpu_suite.sh"
# the triton backend's run alone: on the H200 the first run reached step 180 of 400 in 30 s (10 s of JIT), so a second
# backend's 400 steps do not fit the limit (the torch backend's share of a step is benchmarks.step's)
step harness 55 "$PY" -m benchmarks.harness_gpu --backends triton --out "$(mktemp -d)"
step launches 10 "$PY" -m benchmarks.launches --device cuda
step sweep 10 "$PY" -m benchmarks.report --device cuda --out "$out" --budget 1 --repeats 5 --note "gpu_suite.sh" \
  --run-id "$run_id" --skip triton-,flash
echo "logs and CSV in $out"
exit $status
