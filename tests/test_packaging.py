"""The sdist ships sources, tests, benchmarks and docs, never a virtual
environment or build tree that sits in the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dst: Path) -> None:
    keep = ("pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", ".gitignore")
    for name in keep:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    for d in ("csrc", "fastnn", "tests", "docs", "tools", "benchmarks"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.so"))


def test_sdist_holds_only_sources(tmp_path: Path) -> None:
    pytest.importorskip("scikit_build_core", reason="scikit-build-core is in the test extra")
    src = tmp_path / "src"
    src.mkdir()
    _source_copy(src)
    # What a new user's checkout may hold beside the sources.
    for junk in (".venv/lib/python3.11/site-packages/x.py", "venv/bin/python",
                 "build/cp311/CMakeCache.txt", "fastnn/_C.cpython-311-x86_64-linux-gnu.so",
                 "data/mnist/train-images-idx3-ubyte.gz", "fastnn/__pycache__/x.pyc",
                 "scratch/notes.txt", "runs/seed.json"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(b"x")
    out = subprocess.run(
        [sys.executable, "-c",
         "from scikit_build_core.build import build_sdist; print(build_sdist('dist'))"],
        cwd=src, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sdist = src / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", ".gitignore",
                    "PKG-INFO", "csrc", "fastnn", "tests", "docs", "tools", "benchmarks"}, tops
    assert not [n for n in names if n.endswith((".so", ".pyc", ".gz"))]
    for required in ("pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp",
                     "fastnn/__init__.py", "fastnn/_C.pyi", "tests/test_packaging.py"):
        assert required in names, required
