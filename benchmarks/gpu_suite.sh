#!/usr/bin/env bash
# Everything that needs a GPU, in one call (GPU time is scarce): the CUDA tests of the Triton backend, the
# sm_90 resource check, the benchmark sweep and the end-to-end step benchmark. CSV files and logs go to
# the folder given as $1, else $OUT, else runs/gpu. Benchmark providers whose packages are missing (POT,
# GeomLoss, flash-sinkhorn have no network on the GPU machines) are skipped and say so; carry their wheels
# in .whl/ to include them: this script installs .whl/*.whl into a private folder first.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
status=0
if ! "$PY" -c "import otfast.kernels" 2> /dev/null; then
  # kernels/ is installed as otfast.kernels: an offline editable install (it also builds the CPU kernel),
  # else a source copy that lays the tree out as installed, where everything below then runs.
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$out/install.log" 2>&1; then
    echo "!! pip install -e . failed (see $out/install.log): running from a source copy instead"
    rm -rf /tmp/otfast-src && cp -r . /tmp/otfast-src && cp -r kernels /tmp/otfast-src/otfast/kernels \
      && cd /tmp/otfast-src
  fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/otfast-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/otfast-site"
fi
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failures, go on
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || { echo "!! $name failed (exit $?)"; status=1; }
  tail -n 5 "$out/$name.log"
}
step env "$PY" -c "import torch, triton, otfast; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0)); print(otfast.backends())"
step tests "$PY" -m pytest -q tests/test_triton_interpreter.py tests/test_core_properties.py
step resources "$PY" -m otfast.kernels.triton.resources
step bench "$PY" -m benchmarks.report --device cuda --out "$out" --note "gpu_suite.sh"
step step "$PY" -m benchmarks.step --device cuda --out "$out" --note "gpu_suite.sh"
echo "logs and CSV in $out"
exit $status
