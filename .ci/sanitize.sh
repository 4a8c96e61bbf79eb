#!/usr/bin/env bash
# Sanitizer step: builds pyqsim._C with AddressSanitizer + UndefinedBehaviorSanitizer into a fresh virtual
# environment and runs the CPU property tests, the bad-input batteries, a short fuzz run and the CUDA kernels'
# property tests on the host SIMT emulator against it.
# Any sanitizer report -- in the test process or in a child process it starts -- fails the step: the runtime
# aborts (ASan) or exits 1 (UBSan) at the first report.
#
# Environment: PYTHON (default python3), CXX (default g++; its libasan/libubsan are preloaded),
# PYQSIM_SANITIZE_DIR (default build/asan: build tree and venv), PYQSIM_SANITIZE_EXTRA_FLAGS (extra compile
# flags, default none),
# PYQSIM_SANITIZE_FUZZ_SECONDS (default 30), PYQSIM_SANITIZE_JOBS (default 2).
# Extra arguments are passed to pytest (e.g. `.ci/sanitize.sh -x -k gemm`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
CXX_BIN=${CXX:-g++}
DIR=${PYQSIM_SANITIZE_DIR:-$ROOT/build/asan}
VENV=$DIR/venv
T0=$(date +%s)

echo "== sanitizer build (ASan + UBSan) into $DIR"
rm -rf "$VENV"
mkdir -p "$DIR"
# No system site packages: an editable install of pyqsim there would shadow the sanitized build.
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install --quiet --disable-pip-version-check "numpy>=1.24" "hypothesis>=6.80" "pytest>=7"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer ${PYQSIM_SANITIZE_EXTRA_FLAGS-}"
# -g1: line tables and function names, what a report's stack trace needs, at half the compile time of -g.
CMAKE_BUILD_PARALLEL_LEVEL=${PYQSIM_SANITIZE_JOBS:-2} CXX=$CXX_BIN \
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps . \
  -Cbuild-dir="$DIR/cmake" \
  -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.CMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
  -Ccmake.define.CMAKE_CXX_FLAGS="$SAN" \
  -Ccmake.define.CMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Ccmake.define.PYQSIM_CUDA=OFF
T1=$(date +%s)
echo "   built in $((T1 - T0)) s"

# The interpreter is not instrumented: the sanitizer runtimes must be loaded first.
ASAN_LIB=$("$CXX_BIN" -print-file-name=libasan.so)
UBSAN_LIB=$("$CXX_BIN" -print-file-name=libubsan.so)
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -f "$lib" ] || { echo "sanitizer runtime not found: $lib" >&2; exit 1; }
done
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB"
# allocator_may_return_null: a request for petabytes is a MemoryError in numpy, not an ASan abort.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYQSIM_FUZZ_SECONDS=${PYQSIM_SANITIZE_FUZZ_SECONDS:-30}
export PYQSIM_HYPOTHESIS_PROFILE=${PYQSIM_HYPOTHESIS_PROFILE:-ci}
export PYTHONUNBUFFERED=1

# The tests run from tests/ so that the source tree does not shadow the installed (sanitized) package.
cd "$ROOT/tests"
"$VPY" - <<'EOF'
import pathlib, sys
import pyqsim, pyqsim._C as C
so = pathlib.Path(C.__file__)
assert "site-packages" in so.parts, f"not the installed build: {so}"
assert "libasan" in open("/proc/self/maps").read(), "libasan is not loaded"
print(f"   testing {so} ({C.build_info()['isa']}, {C.build_info()['compiler']})")
EOF

set +e
# --capture=sys: a report is written by the runtime straight to file descriptor 2, which pytest's default
# fd capture would swallow when the process dies; this way it reaches the log. Reports in child processes
# fail the test that started them (it checks their exit status and prints their stderr).
"$VPY" -m pytest -p no:cacheprovider -q --capture=sys \
  test_cpu_ops.py test_cpu_build.py test_errors.py test_bindings_errors.py test_reliability.py test_fuzz.py test_memory.py \
  -k "not known_gap" "$@"
STATUS=$?
# The CUDA kernel sources on the host SIMT emulator (pyqsim._cuda_simt), sanitized too: the emulator's fault probes
# and the GPU property tests. ASan warns once that it does not fully support swapcontext; a report still fails.
"$VPY" -m pytest -p no:cacheprovider -q --capture=sys test_cuda_simt.py test_cuda_ops.py \
  -k "test_cuda_simt or (simt and equals_reference)"
STATUS=$((STATUS | $?))
set -e

T2=$(date +%s)
echo "== sanitizer step: build $((T1 - T0)) s, tests $((T2 - T1)) s, total $((T2 - T0)) s, status $STATUS"
exit $STATUS
