#!/usr/bin/env bash
# Developer build without pip: compiles fastnn._C into build/dev and copies it
# next to the Python sources, so `PYTHONPATH=$PWD python ...` uses it.
# Users install with `pip install .` (or `pip install --no-build-isolation -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v python3)" "$@" >/dev/null
cmake --build build/dev -j2
# Copy then rename: overwriting the .so in place would crash processes that
# have it loaded (a running test session, say).
for so in build/dev/_C*.so; do
  cp "$so" "fastnn/.$(basename "$so").tmp"
  mv -f "fastnn/.$(basename "$so").tmp" "fastnn/$(basename "$so")"
done
echo "built $(ls fastnn/_C*.so)"
