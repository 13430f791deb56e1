#!/usr/bin/env bash
# One-shot GPU check for fastnn's cuda backend, sized for one command on a lent
# GPU machine: each stage runs under `timeout` as one process group, the stage
# limits add up to 440 s, plus 5 s kill grace per stage, so the whole run ends
# within 470 s (under 8 minutes) by construction (`--budget` prints the sum).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   bash benchmarks/gpu_check.sh --budget      # print the stage limits and their sum
#
# Results: OUT_DIR (first argument), else $OUT, else benchmarks/results/gpu/<UTC time>.
# Every stage's files are there as soon as it ends (logs stream while it runs), and
# summary.json is rewritten after every stage, so a run cut short keeps the rest.
# Stages (each runs even if an earlier one failed; the exit code is 1 if any failed):
#   env      nvidia-smi, numba.cuda.detect(), NVVM and ptxas versions, installed
#            numba/cupy/nvidia/cuda packages                              -> env.log
#   install  pip install --no-build-isolation --no-deps --no-index . (offline); if the
#            native build fails, the later stages import fastnn from the source tree
#            (PYTHONPATH; the cuda backend does not need fastnn._C)       -> install.log
#   jit      benchmarks/jit_compile.py: NVVM check, then every kernel variant compiled
#            once (core ones first), each timed; fills the Numba cache
#                                                                -> jit.json, jit.log
#   pytest   each test file that uses the gpu marker, one pytest run per file,
#            verbose, --durations              -> pytest.log, pytest/<file>.xml (JUnit)
#   bench    benchmarks/bench_gpu.py, its JSON rewritten after each section (launch
#            overhead, matmul vs cuBLAS, MNIST layers, train step, GEMM resources)
#                                                     -> bench_gpu.{json,txt}, bench.log
#   train    fastnn train --device cuda --epochs 2: epoch 1 (cold: compiles / cache
#            loads) and epoch 2 (warm) timed apart        -> train_metrics.json, train.log
# Overall log: gpu_check.log. Data: $FASTNN_DATA_DIR (default .mnist in the repo root).
# Stage limits (s) can be overridden: T_ENV T_INSTALL T_JIT T_PYTEST T_BENCH T_TRAIN.
# FASTNN_GPU_CHECK_DRY_RUN=1 skips the pip install (taking the source-tree fallback)
# and runs everything else as is: without a GPU every stage fails fast, still writing
# its files (tests/test_gpu_check.py runs it that way).
# The stage functions below run through `bash -c` (export -f), which shellcheck
# cannot follow:
# shellcheck disable=SC2317
set -uo pipefail

T_ENV="${T_ENV:-10}"
T_INSTALL="${T_INSTALL:-60}"
T_JIT="${T_JIT:-60}"
T_PYTEST="${T_PYTEST:-120}"
T_BENCH="${T_BENCH:-110}"
T_TRAIN="${T_TRAIN:-80}"
KILL_GRACE=5
STAGES=(env install jit pytest bench train)

stage_limit() {
  case "$1" in
    env) echo "$T_ENV" ;;
    install) echo "$T_INSTALL" ;;
    jit) echo "$T_JIT" ;;
    pytest) echo "$T_PYTEST" ;;
    bench) echo "$T_BENCH" ;;
    train) echo "$T_TRAIN" ;;
  esac
}

if [ "${1:-}" = "--budget" ]; then
  total=0
  for s in "${STAGES[@]}"; do
    lim=$(stage_limit "$s")
    echo "stage $s $lim"
    total=$((total + lim + KILL_GRACE))
  done
  echo "kill_grace $KILL_GRACE"
  echo "total $total"
  exit 0
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
RESULTS="${1:-${OUT:-$REPO/benchmarks/results/gpu/$(date -u +%Y%m%d-%H%M%S)}}"
mkdir -p "$RESULTS/pytest" || exit 1
RESULTS="$(cd "$RESULTS" && pwd)"

PY="${PYTHON:-python3}"
DRY_RUN="${FASTNN_GPU_CHECK_DRY_RUN:-0}"
export CUPY_TF32=0                  # cuBLAS baselines without TF32
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
DATA="${FASTNN_DATA_DIR:-.mnist}"
case "$DATA" in /*) ;; *) DATA="$REPO/$DATA" ;; esac
export FASTNN_DATA_DIR="$DATA"
WORK="$(mktemp -d)"                 # neutral cwd: imports resolve to the installed fastnn
trap 'rm -rf "$WORK"' EXIT
# One Numba cache for every stage: the jit stage fills it, the later ones load from it.
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$WORK/numba-cache}"
# What the stage functions need: each runs in its own `bash -c` under timeout.
export REPO RESULTS PY DRY_RUN DATA WORK T_JIT T_PYTEST
INSTALL_MODE="not run"
FAILED=()
START=$SECONDS
SUMMARY_ROWS=""

write_summary() {
  "$PY" - "$RESULTS/summary.json" "$1" "$INSTALL_MODE" "$((SECONDS - START))" \
    "$SUMMARY_ROWS" <<'EOF' || echo "(summary.json not written)"
import json, os, sys
path, finished, mode, elapsed, rows = sys.argv[1:6]
stages = []
for line in rows.strip().splitlines():
    name, rc, secs, limit = line.split()
    stages.append({"stage": name, "rc": int(rc), "seconds": int(secs), "limit_s": int(limit)})
doc = {"finished": finished == "1", "install_mode": mode, "elapsed_s": int(elapsed),
       "stages": stages, "failed": [s["stage"] for s in stages if s["rc"] != 0]}
with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

# `stage NAME FUNCTION`: FUNCTION in its own bash under `timeout` (SIGTERM to its
# whole process group at the stage limit, SIGKILL KILL_GRACE s later), its output
# in NAME.log and on stdout; then summary.json is rewritten.
stage() {
  local name="$1" fn="$2" t0=$SECONDS limit rc
  limit=$(stage_limit "$name")
  echo
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit} s"
  timeout -k "$KILL_GRACE" "$limit" bash -c "$fn" 2>&1 | tee "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "(stage $name stopped at its ${limit} s limit)" | tee -a "$RESULTS/$name.log"
  fi
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s (total $((SECONDS - START)) s)"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name(rc=$rc)"); fi
  SUMMARY_ROWS+="$name $rc $((SECONDS - t0)) $limit"$'\n'
  write_summary 0
  return 0
}

env_info() {
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  echo "dry run: $DRY_RUN"
  echo "--- nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap \
      --format=csv || echo "(nvidia-smi failed)"
  else
    echo "nvidia-smi: not found"
  fi
  echo "--- ptxas"
  local ptxas rc
  ptxas="$(command -v ptxas || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ptxas")"
  if [ -x "$ptxas" ]; then "$ptxas" --version | tail -n 2; else echo "ptxas: not found"; fi
  echo "--- python"
  "$PY" --version
  "$PY" - <<'EOF'
import contextlib, importlib, io, sys
for name in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest", "cuda.bindings",
             "cuda.core", "cuda.pathfinder"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:>18}: {getattr(mod, '__version__', 'installed')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:>18}: unavailable ({type(exc).__name__}: {exc})")
ok = True
try:
    from numba.cuda.cudadrv import nvvm
    print(f"{'NVVM':>18}: {'.'.join(map(str, nvvm.NVVM().get_version()))}")
except Exception as exc:  # noqa: BLE001
    print(f"{'NVVM':>18}: unavailable ({type(exc).__name__}: {exc})")
    ok = False
try:
    from numba import cuda
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        found = cuda.detect()
    print("--- numba.cuda.detect()\n" + buf.getvalue().rstrip() + f"\n(returned {found})")
    ok = ok and bool(found)
except Exception as exc:  # noqa: BLE001
    print(f"numba.cuda.detect() failed: {type(exc).__name__}: {exc}")
    ok = False
sys.exit(0 if ok else 1)
EOF
  rc=$?
  echo "--- packages (pip list: numba / cupy / nvidia / cuda / torch)"
  "$PY" -m pip list 2>/dev/null | grep -iE "numba|cupy|nvidia|cuda|^torch " || true
  return "$rc"
}

install() {
  local rc
  if [ "$DRY_RUN" = "1" ]; then
    echo "dry run: pip install skipped"
    rc=1
  else
    "$PY" -m pip install --no-build-isolation --no-deps --no-index . \
      && (cd "$WORK" && "$PY" -c "import fastnn, fastnn._C; print('installed', fastnn.__file__)")
    rc=$?
  fi
  if [ "$rc" -ne 0 ]; then
    # The cuda backend is pure Python (Numba kernels): the source tree serves.
    echo "install failed (rc=$rc): the later stages import fastnn from $REPO (PYTHONPATH)"
    echo "$REPO" > "$WORK/source-tree"
    (cd "$WORK" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
       "import fastnn; print('using', fastnn.__file__)") || return 1
  fi
  return "$rc"
}

jit() {
  cd "$WORK" || return 1
  "$PY" "$REPO/benchmarks/jit_compile.py" --out "$RESULTS/jit.json" --budget "$((T_JIT - 10))"
}

gpu_tests() {
  # Only files that use the marker: other modules may import test-only packages
  # (hypothesis) that this machine lacks, which would abort collection.
  local files f name rc=0 one left deadline=$((SECONDS + T_PYTEST - 3))
  mapfile -t files < <(grep -l "mark\.gpu" "$REPO"/tests/test_*.py)
  echo "test files with gpu tests: ${files[*]##*/}"
  cd "$WORK" || return 1
  for f in "${files[@]}"; do
    name="$(basename "$f" .py)"
    left=$((deadline - SECONDS))
    if [ "$left" -le 2 ]; then
      echo "--- $name: not run (stage time limit spent)"
      rc=1
      continue
    fi
    echo "--- $name (up to $left s)"
    # One run per file: a file cut short by the limit leaves the others' JUnit.
    timeout "$left" "$PY" -m pytest "$f" -m gpu -v -rfEs --durations=15 \
      -p no:cacheprovider --junitxml="$RESULTS/pytest/$name.xml" | tee "$WORK/pytest-$name.txt"
    one=${PIPESTATUS[0]}
    # 5: nothing selected in this file (the all-skipped check below still applies).
    if [ "$one" -ne 0 ] && [ "$one" -ne 5 ]; then rc=$one; fi
  done
  # All-skipped (no CuPy, no GPU visible) must not pass as a GPU check.
  if [ "$rc" -eq 0 ] && ! cat "$WORK"/pytest-*.txt | grep -qE "[0-9]+ passed"; then
    echo "no gpu test ran (all skipped): CuPy or the GPU is not usable"
    return 1
  fi
  return "$rc"
}

bench() {
  cd "$WORK" || return 1
  "$PY" "$REPO/benchmarks/bench_gpu.py" --out "$RESULTS" --no-jit
}

train() {
  local rc
  if [ ! -d "$DATA" ]; then
    echo "MNIST directory $DATA not found (set FASTNN_DATA_DIR or carry .mnist/)"
    return 1
  fi
  cd "$WORK" || return 1
  "$PY" -m fastnn train --device cuda --epochs 2 --batch-size 128 --data-dir "$DATA" \
    --no-progress --metrics-json "$RESULTS/train_metrics.json"
  rc=$?
  "$PY" - "$RESULTS/train_metrics.json" <<'EOF' || true
import json, sys
try:
    epochs = json.load(open(sys.argv[1]))["epochs"]
except Exception as exc:  # noqa: BLE001
    sys.exit(f"no per-epoch metrics ({type(exc).__name__}: {exc})")
for e, label in zip(epochs, ("cold: compiles / cache loads included", "warm")):
    print(f"epoch {e['epoch']} ({label}): {e['seconds']:.2f} s train, "
          f"{e['images_per_second']:.0f} img/s, eval {e['eval_seconds']:.2f} s, "
          f"test accuracy {e['test_accuracy']:.4f}")
EOF
  return "$rc"
}

export -f env_info install jit gpu_tests bench train

main() {
  echo "=== gpu_check: results in $RESULTS (dry run: $DRY_RUN)"
  stage env env_info
  stage install install
  if [ -f "$WORK/source-tree" ]; then
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    # Running without the native module is the point of this fallback.
    unset FASTNN_REQUIRE_NATIVE
    INSTALL_MODE="source-tree"
  else
    INSTALL_MODE="installed"
  fi
  stage jit jit
  stage pytest gpu_tests
  stage bench bench
  stage train train
  write_summary 1
  echo
  echo "=== gpu_check finished in $((SECONDS - START)) s; results in $RESULTS"
  if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "=== FAILED stages: ${FAILED[*]}"
    return 1
  fi
  echo "=== all stages passed"
  return 0
}

main 2>&1 | tee "$RESULTS/gpu_check.log"
exit "${PIPESTATUS[0]}"
