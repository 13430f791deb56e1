#!/usr/bin/env bash
# Build fastnn._C with AddressSanitizer + UndefinedBehaviorSanitizer and run the
# kernel-facing tests against it. Fails (exit != 0) on any sanitizer finding or
# test failure.
#
# The sanitized extension is built in build/asan and loaded from a private copy
# of the package in a temporary directory, so the in-tree dev build
# (fastnn/_C*.so, build/dev) that everyone else uses is never touched.
#
# Usage: tools/sanitize.sh [extra pytest args]
#   SANITIZE_TESTS   test files to run (default: functional, validation, fuzz,
#                    concurrency, memory, autograd)
#   SANITIZE_JOBS    parallel compile jobs (default 2)
#   FASTNN_FUZZ_PROFILE  hypothesis profile for tests/test_fuzz.py (default ci)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
build=build/asan
t0=$(date +%s)

# --- build ---------------------------------------------------------------------
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTNN_SANITIZE=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$build" -j"${SANITIZE_JOBS:-2}"
so=$(ls "$build"/_C*.so)
grep -q "FASTNN_SANITIZE:BOOL=ON" "$build/CMakeCache.txt" || {
  echo "sanitize.sh: FASTNN_SANITIZE is not ON in $build (CMakeLists.txt changed?)" >&2; exit 2; }
t_build=$(date +%s)

# --- sanitizer runtimes --------------------------------------------------------
# Python itself is not instrumented, so the ASan runtime must be loaded first.
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
runtime() { "${cxx:-c++}" -print-file-name="$1"; }
asan=$(runtime libasan.so)
ubsan=$(runtime libubsan.so)
for lib in "$asan" "$ubsan"; do
  [[ -f $lib ]] || { echo "sanitize.sh: sanitizer runtime $lib not found (gcc needed)" >&2; exit 2; }
done
# Not grep -q: under pipefail its early exit can SIGPIPE ldd and fail the check.
ldd "$so" | grep libasan >/dev/null || {
  echo "sanitize.sh: $so is not linked with ASan" >&2; exit 2; }

# --- private package copy --------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/fastnn-asan.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp -r fastnn tests pyproject.toml "$work"/
rm -f "$work"/fastnn/_C*.so
cp "$so" "$work"/fastnn/
find "$work" -name __pycache__ -prune -exec rm -rf {} +

# Only the Python processes get the runtimes (not grep, ldd, ...).
preload="$asan $ubsan"
# Python "leaks" by design; huge allocations must return NULL (-> MemoryError)
# rather than abort, because tests/test_memory.py asks for petabytes on purpose.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONMALLOC=malloc  # let ASan see Python's own allocations too
export PYTHONPATH="$work"
export FASTNN_SANITIZED=1 FASTNN_REQUIRE_NATIVE=1
# Fresh scratch holds NaN, so an element a kernel never wrote cannot pass
# unnoticed (ASan does not report reads of uninitialised memory).
export FASTNN_POISON_SCRATCH=1
export FASTNN_FUZZ_PROFILE="${FASTNN_FUZZ_PROFILE:-ci}"
export FASTNN_DATA_DIR="${FASTNN_DATA_DIR:-$repo/../shared/data/mnist}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

cd "$work"
# The tests must load the sanitized copy, with the ASan runtime active.
LD_PRELOAD=$preload python3 - <<'EOF'
import ctypes, os, fastnn._C as c
assert c.__file__.startswith(os.environ["PYTHONPATH"]), c.__file__
assert hasattr(ctypes.CDLL(None), "__asan_init"), "ASan runtime not loaded"
print(f"sanitize.sh: {c.__file__} (ISA {c.active_isa()}, threads {c.get_num_threads()})")
EOF

default_tests="tests/test_functional.py tests/test_validation.py tests/test_fuzz.py
  tests/test_concurrency.py tests/test_memory.py tests/test_autograd.py
  tests/test_conv_small.py tests/test_native_bindings.py tests/test_fused.py tests/test_isa.py
  tests/test_batchnorm.py tests/test_batchnorm_relu.py tests/test_bn_relu_pool.py
  tests/test_geometry.py tests/test_memory_pool.py tests/test_lookup_u8.py"
read -r -a tests <<<"$(echo ${SANITIZE_TESTS:-$default_tests})"
existing=()
for t in "${tests[@]}"; do [[ -f $t ]] && existing+=("$t"); done

# One pytest process per file, so a sanitizer that halts the process loses at
# most that file's summary. --capture=sys leaves fd 2 alone: sanitizer reports
# (written to fd 2 by the runtime) reach the log even when the process dies.
log="$repo/$build/sanitize.log"
: >"$log"
status=0
for t in "${existing[@]}"; do
  set +e
  LD_PRELOAD=$preload python3 -m pytest "$t" -v --capture=sys -p no:cacheprovider \
    -W ignore::DeprecationWarning "$@" 2>&1 | tee -a "$log" | grep -vE " (PASSED|SKIPPED|XFAIL)( |$)"
  s=${PIPESTATUS[0]}
  set -e
  if [[ $s -ne 0 ]]; then
    echo "sanitize.sh: $t failed (exit $s)" | tee -a "$log" >&2
    status=1
  fi
done
t_end=$(date +%s)

# Any report fails the run, even one from a subprocess or fork child that pytest
# did not notice. ("failed to allocate" warnings are expected: MemoryError tests.)
pattern="ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: [A-Za-z]*Sanitizer"
if grep -qE "$pattern" "$log"; then
  grep -nE "$pattern" "$log" | head -n 20 >&2
  echo "sanitize.sh: sanitizer findings (full log: $log)" >&2
  status=1
fi
echo "sanitize.sh: build $((t_build - t0)) s, tests $((t_end - t_build)) s, exit $status"
exit "$status"
