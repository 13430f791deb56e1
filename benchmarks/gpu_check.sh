#!/usr/bin/env bash
# One-shot GPU check for fastnn's cuda backend (sized for <= 5 minutes on an H200).
#
# Run from anywhere; it works from the repository root:
#     bash benchmarks/gpu_check.sh
# Stages (each runs even if an earlier one failed; the exit code is 1 if any failed):
#   1. env      nvidia-smi, Python and package versions
#   2. install  pip install --no-build-isolation --no-deps --no-index .   (offline)
#   3. config   python -c "import fastnn; fastnn.show_config()"
#   4. pytest   every test marked gpu (files that use the marker), from outside the
#               checkout so the installed package is what gets tested
#   5. bench    benchmarks/bench_gpu.py: ops vs cuBLAS / torch, JIT latency
#   6. train    python -m fastnn train --device cuda --epochs 1 --batch-size 128
# Data: $FASTNN_DATA_DIR (default .mnist, relative to the repository root).
# Output: stdout; with $OUT set, also $OUT/gpu_check.log, bench_gpu.{json,txt},
# pytest_gpu.xml (JUnit) and train_metrics.json.
# Stage time limits (seconds) can be overridden: T_INSTALL T_PYTEST T_BENCH T_TRAIN.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT_DIR="${OUT:-}"

PY="${PYTHON:-python3}"
export CUPY_TF32=0                  # cuBLAS baselines without TF32
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
DATA="${FASTNN_DATA_DIR:-.mnist}"
case "$DATA" in /*) ;; *) DATA="$REPO/$DATA" ;; esac
export FASTNN_DATA_DIR="$DATA"
WORK="$(mktemp -d)"                 # neutral cwd: imports resolve to the installed fastnn
RESULTS="${OUT_DIR:-$WORK}"

T_INSTALL="${T_INSTALL:-150}"
T_PYTEST="${T_PYTEST:-170}"
T_BENCH="${T_BENCH:-150}"
T_TRAIN="${T_TRAIN:-150}"

FAILED=()
START=$SECONDS
stage() {
  local name="$1"; shift
  local t0=$SECONDS
  echo
  echo "=== [$name] $(date +%H:%M:%S) $*"
  "$@"
  local rc=$?
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s (total $((SECONDS - START)) s)"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
  return 0
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" --version
  "$PY" - <<'EOF'
import importlib
for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest", "scikit_build_core",
             "pybind11"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:>18}: {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:>18}: unavailable ({type(exc).__name__}: {exc})")
EOF
}

install() {
  timeout -k 10 "$T_INSTALL" "$PY" -m pip install --no-build-isolation --no-deps --no-index . \
    && (cd "$WORK" && "$PY" -c "import fastnn, fastnn._C; print('installed', fastnn.__file__)")
}

show_config() {
  (cd "$WORK" && "$PY" -c "import fastnn; fastnn.show_config()")
}

gpu_tests() {
  # Only files that use the marker: other modules may import test-only packages
  # (hypothesis) that this machine lacks, which would abort collection.
  local files
  mapfile -t files < <(grep -l "mark\.gpu" "$REPO"/tests/test_*.py)
  echo "test files with gpu tests: ${files[*]##*/}"
  (cd "$WORK" && timeout -k 10 "$T_PYTEST" "$PY" -m pytest "${files[@]}" -m gpu -q -rfEs \
     -p no:cacheprovider --junitxml="$RESULTS/pytest_gpu.xml") | tee "$WORK/pytest.txt"
  local rc=${PIPESTATUS[0]}
  # All-skipped (no CuPy, no GPU visible) must not pass as a GPU check.
  if [ "$rc" -eq 0 ] && ! grep -qE "[0-9]+ passed" "$WORK/pytest.txt"; then
    echo "no gpu test ran (all skipped): CuPy or the GPU is not usable"
    return 1
  fi
  return "$rc"
}

bench() {
  (cd "$WORK" && timeout -k 10 "$T_BENCH" "$PY" "$REPO/benchmarks/bench_gpu.py" --out "$RESULTS")
}

train() {
  if [ ! -d "$DATA" ]; then
    echo "MNIST directory $DATA not found (set FASTNN_DATA_DIR or carry .mnist/)"
    return 1
  fi
  (cd "$WORK" && timeout -k 10 "$T_TRAIN" "$PY" -m fastnn train --device cuda --epochs 1 \
     --batch-size 128 --data-dir "$DATA" --no-progress \
     --metrics-json "$RESULTS/train_metrics.json")
}

main() {
  stage env env_info
  stage install install
  stage config show_config
  stage pytest gpu_tests
  stage bench bench
  stage train train
  echo
  echo "=== gpu_check finished in $((SECONDS - START)) s"
  if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "=== FAILED stages: ${FAILED[*]}"
    return 1
  fi
  echo "=== all stages passed"
  return 0
}

if [ -n "$OUT_DIR" ]; then
  mkdir -p "$OUT_DIR"
  main 2>&1 | tee "$OUT_DIR/gpu_check.log"
  rc=${PIPESTATUS[0]}
else
  main
  rc=$?
fi
rm -rf "$WORK"
exit "$rc"
