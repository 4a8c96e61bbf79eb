#!/usr/bin/env bash
# The GPU check in one run: build pyqsim with the CUDA kernels for the visible GPU, run the GPU half of the CUDA
# property suites, verify whole programs on the `cuda` backend against the reference, and run the CUDA benchmark.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [PROGRAM.npz ...]
#   OUT_DIR      receives summary.txt (one line per step: status and seconds), build.log, tests.log, verify.log,
#                bench.log, bench_cuda-<device>.json and bench_cuda.md
#   PROGRAM.npz  parameter files to verify on the GPU (`pyqsim verify --backends cuda`), e.g. from
#                `pyqsim calibrate repq-vit --out vit.npz`
# Environment: PYTHON (default python3), CUDA_ARCH (default: the build's, sm_80 and sm_90; tests/test_cuda_build.py
# expects those), and per-step limits in
# seconds BUILD_S (400), TESTS_S (300), VERIFY_S (120), BENCH_S (240).
# The build uses the interpreter's own packages (no index, no build isolation): numpy, numba, scikit-build-core,
# pybind11, pytest, hypothesis, and torch with CUDA for the tensor tests and the benchmark.
# Exit status: 0 all steps passed; 1 a step failed; 2 no GPU visible (nothing built).
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [PROGRAM.npz ...]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
summary="$out/summary.txt"
: > "$summary"
failed=0

step() {  # step NAME LOG SECONDS CMD...: run CMD under a time limit, append its output to LOG, record the status
  local name=$1 log=$2 secs=$3 t0 rc
  shift 3
  t0=$(date +%s)
  echo "== $name: $*" >> "$log"
  timeout -k 15 "$secs" "$@" >> "$log" 2>&1
  rc=$?
  echo "$name: status $rc in $(( $(date +%s) - t0 )) s$([ "$rc" = 124 ] && echo " (time limit $secs s)")" \
    | tee -a "$summary"
  [ "$rc" = 0 ] || failed=1
  return "$rc"
}

if [ -z "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null)" ]; then
  echo "no GPU visible (nvidia-smi lists none): nothing built or run" | tee -a "$summary"
  exit 2
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
    --format=csv
  nvcc --version | tail -n 2
  "$py" -c 'import sys, numpy, torch; print("python", sys.version.split()[0], "numpy", numpy.__version__,
"torch", torch.__version__, "cuda", torch.version.cuda)'
  nproc
} > "$out/build.log" 2>&1

export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
step build "$out/build.log" "${BUILD_S:-400}" "$py" -m pip install --no-build-isolation --no-deps --no-index -e . \
  -Ccmake.define.PYQSIM_CUDA=ON ${CUDA_ARCH:+-Ccmake.define.PYQSIM_CUDA_ARCHITECTURES="$CUDA_ARCH"} \
  -Ccmake.define.PYQSIM_CUDA_SIMT=OFF || { echo "build failed: see build.log" | tee -a "$summary"; exit 1; }
step info "$out/build.log" 60 "$py" -m pyqsim info

# The GPU half of every suite that runs the cuda backend (the host-emulator half is CI's).
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
step tests "$out/tests.log" "${TESTS_S:-300}" "$py" -m pytest -q -rfEs -p no:cacheprovider --timeout 120 \
  "${xdist[@]}" -k "not simt" tests/test_cuda_ops.py tests/test_batched.py tests/test_float_ops.py \
  tests/test_errors.py tests/test_cuda_build.py

for prog in "$@"; do
  step "verify $(basename "$prog")" "$out/verify.log" "${VERIFY_S:-120}" "$py" -m pyqsim verify "$prog" --n 8 \
    --backends cuda cpu
done

step bench "$out/bench.log" "${BENCH_S:-240}" "$py" benchmarks/bench_cuda.py --markdown "$out/bench_cuda.md" \
  --out "$out/bench_cuda-$("$py" -c 'import torch, re; print(re.sub("[^A-Za-z0-9]+", "_",
torch.cuda.get_device_name()))').json"
exit "$failed"
