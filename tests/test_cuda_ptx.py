"""The GEMM kernels' PTX for sm_90: vector loads, an unrolled k loop, registers.

NVVM compiles PTX without a GPU (``numba.cuda.compile_ptx``), so these run on
any machine with numba-cuda (or Numba's CUDA target) and libNVVM, and skip,
saying so, where NVVM cannot be loaded. Register and spill counts come from
``ptxas -v``: the one beside the NVVM in use (the ``nvidia-cuda-nvcc`` wheel of
the test extra, or a CUDA toolkit), else one on PATH or under ``$CUDA_HOME``.

What is checked, per GEMM variant of ``variants.core()``:

* wide operands are fetched with vector loads (``ld.global.v4.f32`` for the
  128x128 and 32x32 tiles, ``.v2`` for 64x64, ``.v2.f64`` for float64) and,
  without a fused bias, with no scalar global load at all;
* shared tiles are read with ``ld.shared.v4.f32`` (4 per k step on the large
  tile) where numba-cuda can align them;
* the k loop is unrolled: at least 8 steps of TM*TN FMAs in the PTX;
* nothing lives in local memory;
* float32 kernels fit 128 registers with no spills, i.e. two 256-thread
  blocks of the large tile per SM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = pytest.mark.skipif(SIM, reason="needs Numba's real CUDA target, not the simulator")

numba = pytest.importorskip("numba")


def _nvvm_problem() -> str | None:
    """None if a trivial kernel compiles to PTX here, else why not."""
    try:
        from numba import cuda, types

        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe, (types.Array(types.float32, 1, "C"),), cc=(9, 0))
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable NVVM
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


@pytest.fixture(scope="module")
def gemm_ptx() -> dict:
    """{variant: PTX} for the GEMM variants of variants.core()."""
    problem = _nvvm_problem()
    if problem is not None:
        pytest.skip(f"NVVM is unavailable, so no PTX can be compiled here ({problem})")
    import types as pytypes

    import numba.cuda.dispatcher as dispatcher

    from fastnn.backends._cuda import variants

    with pytest.MonkeyPatch.context() as mp:
        if hasattr(dispatcher, "get_current_device"):
            # Numba's built-in target types device-function calls for the current
            # device's compute capability; there is none here.
            mp.setattr(dispatcher, "get_current_device",
                       lambda: pytypes.SimpleNamespace(compute_capability=(9, 0)))
        return {v: variants.ptx(v) for v in variants.core() if v.family == "gemm"}


def _count(pattern: str, code: str) -> int:
    return len(re.findall(pattern, code))


def _flags(v) -> dict:
    return dict(re.findall(r"(ta|tb|wa|wb|bias)(\d)", v.name))


def test_gemm_ptx_vector_loads_and_unrolled_k_loop(gemm_ptx) -> None:
    from fastnn.backends._cuda import gemm, vector

    report = []
    for v, code in gemm_ptx.items():
        config = v.name.split("[")[1].split(",")[0]
        cfg = gemm.CONFIGS[config]
        bk, tm, tn = cfg[2], cfg[3], cfg[4]
        f = _flags(v)
        suffix = "f32" if v.dtype == "float32" else "f64"
        width = {op: gemm.vector_width(numba.float32 if suffix == "f32" else numba.float64,
                                       cfg, op) for op in ("a", "b")}
        vec_g = {w: _count(rf"ld\.global(\.nc)?\.v{w}\.{suffix}", code) for w in (2, 4)}
        scalar_g = _count(rf"ld\.global(\.nc)?\.{suffix}", code)
        vec_s = _count(rf"ld\.shared\.v[24]\.{suffix}", code)
        fma = _count(rf"fma\.rn\.{suffix}", code)
        report.append(f"{v.name}: ld.global.v2 {vec_g[2]} v4 {vec_g[4]} scalar {scalar_g}, "
                      f"ld.shared.v* {vec_s}, fma {fma}")

        for op, wide in (("a", f["wa"] == "1"), ("b", f["wb"] == "1")):
            if wide and width[op] > 1:
                assert vec_g[width[op]] >= 1, f"{v.name}: no ld.global.v{width[op]} for {op}"
        if f["wa"] == f["wb"] == "1" and f["bias"] == "0":
            assert scalar_g == 0, f"{v.name}: {scalar_g} scalar global loads left"
        if f["wa"] == f["wb"] == "0":
            assert vec_g[2] == vec_g[4] == 0, f"{v.name}: vector loads on unaligned operands"
        if vector.SHARED_VECTORS:
            # (TM + TN) / 4 runs of 4 per k step, 8 steps per unrolled pass;
            # float64 runs of 4 are two .v2 loads each.
            per_step = (tm + tn) // 4 * (1 if suffix == "f32" else 2)
            assert vec_s >= 8 * per_step, f"{v.name}: {vec_s} vector shared loads"
        assert fma >= min(8, bk) * tm * tn, f"{v.name}: k loop not unrolled ({fma} FMAs)"
        assert _count(r"(ld|st)\.local", code) == 0, f"{v.name}: local memory"
    print("\n".join(report))


def _ptxas() -> str | None:
    """The ptxas of the toolkit whose NVVM made the PTX, else one on PATH / $CUDA_HOME."""
    candidates = []
    try:
        from numba.cuda.cuda_paths import get_cuda_paths

        nvvm = getattr(get_cuda_paths().get("nvvm"), "info", None)
        if nvvm:  # <toolkit>/lib/libnvvm.so -> <toolkit>/bin/ptxas
            candidates.append(Path(nvvm).resolve().parents[1] / "bin" / "ptxas")
    except Exception:  # noqa: BLE001 - then only PATH and CUDA_HOME
        pass
    if shutil.which("ptxas"):
        candidates.append(Path(shutil.which("ptxas")))
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(Path(home) / "bin" / "ptxas")
    return next((str(c) for c in candidates if c.is_file()), None)


def test_gemm_float32_registers_fit_two_blocks_per_sm(gemm_ptx, tmp_path) -> None:
    from fastnn.backends._cuda import vector

    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not found: register counts need it")
    if not vector.LAUNCH_BOUNDS:
        pytest.skip("Numba's built-in CUDA target has no launch_bounds (numba-cuda sets the cap)")
    report = []
    for v, code in gemm_ptx.items():
        if v.dtype != "float32":
            continue
        src = tmp_path / "k.ptx"
        src.write_text(code)
        proc = subprocess.run([ptxas, "-v", "-arch=sm_90", str(src), "-o", str(tmp_path / "k.o")],
                              capture_output=True, text=True, timeout=300)
        if "Unsupported .version" in proc.stderr:
            pytest.skip(f"{ptxas} is older than the NVVM that wrote the PTX: "
                        f"{proc.stderr.strip().splitlines()[0]}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
        report.append(f"{v.name}: {regs} registers, spill bytes {spills}")
        assert regs <= 128 and not any(spills), f"{v.name}: {regs} registers, spills {spills}"
    print("\n".join(report))
