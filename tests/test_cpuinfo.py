"""CPU and cache detection, the gemm blocking derived from it, and the override.

The kernels must stay correct under any cache geometry (an AMD-like and an
Intel-like one are forced here whichever CPU runs the tests), and bit-for-bit
equal to the default blocking wherever the summation order is the same (the
same KC: MC and NC only change which tiles are packed together).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import NATIVE, PKG_ROOT

pytestmark = pytest.mark.skipif(not NATIVE, reason="needs the C++ extension")

# Geometries of real parts (L1d per core, L2 per core, L3): Zen 4, Emerald
# Rapids, Skylake client, and a small embedded-like one.
GEOMETRIES = {
    "zen4": "l1d=32K,l2=1M,l3=32M",
    "emr": "l1d=48K,l2=2M,l3=320M",
    "skl": "l1d=32K,l2=256K,l3=8M",
    "tiny": "l1d=16K,l2=128K,l3=1M",
}
# (ta, tb, M, N, K): the direct small path, the packed path with several K
# blocks and ragged edges, the MNIST linear shapes (K-split forward, narrow
# outputs), and a square one.
GEMMS = [
    (False, False, 33, 47, 29),
    (False, False, 200, 333, 700),
    (True, False, 190, 130, 515),
    (False, True, 128, 128, 5408),
    (True, False, 128, 5408, 128),
    (False, False, 128, 5408, 128),
    (False, True, 128, 10, 128),
    (False, False, 256, 256, 256),
]


@pytest.fixture
def cache_override():
    from fastnn import _C

    yield _C.set_cache_sizes
    _C.set_cache_sizes(os.environ.get("FASTNN_CACHE_SIZES", ""))


def _operands(rng, ta, tb, m, n, k, dtype):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    return a, b, ref


def test_cpu_info_is_plausible():
    from fastnn import _C

    info = _C.cpu_info()
    assert info["source"] in ("cpuid", "sysfs", "default")
    assert isinstance(info["vendor"], str) and info["vendor"]
    assert 4 << 10 <= info["l1d"] <= 4 << 20
    assert 64 << 10 <= info["l2"] <= 256 << 20
    assert info["l3"] >= 0 and info["l3_shared_by"] >= 1
    if sys.platform == "linux" and os.path.exists("/sys/devices/system/cpu/cpu0/cache/index0"):
        # sysfs and CPUID describe the same caches (a VM may round them; allow 2x).
        sysfs = {}
        for i in range(8):
            d = f"/sys/devices/system/cpu/cpu0/cache/index{i}"
            if not os.path.exists(d):
                break
            with open(f"{d}/level") as f:
                level = f.read().strip()
            with open(f"{d}/type") as f:
                kind = f.read().strip()
            with open(f"{d}/size") as f:
                size = f.read().strip()
            if kind != "Instruction" and size.endswith("K"):
                sysfs[level] = int(size[:-1]) << 10
        if "1" in sysfs and not os.environ.get("FASTNN_CACHE_SIZES"):
            assert sysfs["1"] / 2 <= info["l1d"] <= sysfs["1"] * 2


def test_override_changes_blocking_and_restores(cache_override):
    from fastnn import _C

    default = _C.gemm_blocking("float32")
    cache_override("l1d=32K,l2=1M,l3=32M")
    info = _C.cpu_info()
    assert (info["l1d"], info["l2"], info["l3"]) == (32 << 10, 1 << 20, 32 << 20)
    assert info["override"] == "l1d=32K,l2=1M,l3=32M"
    zen = _C.gemm_blocking("float32")
    cache_override("l1d=48k, L2=2MiB")  # case, spaces and KiB/MiB spellings
    emr = _C.gemm_blocking("float32")
    assert zen["KC"] < emr["KC"] and zen["NC"] <= emr["NC"]
    for b in (zen, emr):
        assert b["KC"] % 16 == 0 and b["MC"] % b["MR"] == 0 and b["NC"] % b["NR"] == 0
        # The A and B micro-panels fit the L1d the blocking was derived for.
        assert (b["MR"] + b["NR"]) * b["KC"] * 4 <= (48 << 10)
    cache_override("")
    assert _C.gemm_blocking("float32") == default
    assert _C.cpu_info()["override"] is None


# 17179869185G is 2^64 + 1 GiB: it once wrapped around to 1 GiB and was accepted.
@pytest.mark.parametrize(
    "spec", ["l1d", "l1d=", "l1d=abc", "l4=1M", "l2=1T", "l1d=512", "l3=17179869185G"]
)
def test_override_rejects_bad_specs(cache_override, spec):
    from fastnn import _C

    before = _C.cpu_info()
    with pytest.raises(ValueError, match="set_cache_sizes"):
        cache_override(spec)
    assert _C.cpu_info() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_gemm_correct_under_any_geometry(cache_override, rng, geometry, dtype):
    from fastnn import _C

    cache_override(GEOMETRIES[geometry])
    tol = 2e-4 if dtype == np.float32 else 1e-11
    for ta, tb, m, n, k in GEMMS:
        a, b, ref = _operands(rng, ta, tb, m, n, k, dtype)
        got = _C.matmul(a, b, ta, tb)
        scale = np.sqrt(k)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale,
                                   err_msg=f"{geometry} {(ta, tb, m, n, k)}")


@pytest.mark.parametrize("threads", [1, 2])
def test_same_kc_is_bit_identical_to_default(cache_override, rng, threads):
    """Other L2/L3 sizes with the same L1d change MC and NC but not the summation
    order: results must not change by a bit (and repeated calls never do)."""
    import fastnn
    from fastnn import _C

    old = fastnn.get_num_threads()
    fastnn.set_num_threads(threads)
    try:
        cache_override("")
        l1d = _C.cpu_info()["l1d"]
        base = _C.gemm_blocking("float32")
        cases = [_operands(rng, *g, np.float32)[:2] + (g,) for g in GEMMS]
        want = [_C.matmul(a, b, g[0], g[1]) for a, b, g in cases]
        for (a, b, g), w in zip(cases, want):  # repeated calls at a fixed thread count
            np.testing.assert_array_equal(_C.matmul(a, b, g[0], g[1]), w, err_msg=f"repeat {g}")
        changed = False
        for l2 in ("256K", "1M", "8M"):
            cache_override(f"l1d={l1d},l2={l2},l3=4M")
            blk = _C.gemm_blocking("float32")
            assert blk["KC"] == base["KC"]
            changed |= (blk["MC"], blk["NC"]) != (base["MC"], base["NC"])
            for (a, b, g), w in zip(cases, want):
                np.testing.assert_array_equal(_C.matmul(a, b, g[0], g[1]), w,
                                              err_msg=f"l2={l2} {g}")
        assert changed, "the geometries tried did not change the plan: the test proves nothing"
    finally:
        fastnn.set_num_threads(old)


def test_linear_relu_under_geometries(cache_override, rng):
    import fastnn
    import fastnn.functional as F

    x = rng.standard_normal((128, 5408)).astype(np.float32)
    w = (rng.standard_normal((128, 5408)) * 0.02).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    ref = np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b, 0)
    for spec in GEOMETRIES.values():
        cache_override(spec)
        with fastnn.backend("cpu"):
            got = F.linear_relu(x, w, b)
            unfused = F.relu(F.linear(x, w, b))
        np.testing.assert_array_equal(got, unfused, err_msg=spec)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=spec)


def _run(args, env_extra):
    env = dict(os.environ, PYTHONPATH=str(PKG_ROOT), **env_extra)
    return subprocess.run([sys.executable, *args], env=env, cwd=PKG_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_env_override_and_config_output():
    code = ("import json, fastnn; from fastnn import _C; "
            "print(json.dumps([_C.cpu_info(), _C.gemm_blocking('float32')]))")
    r = _run(["-c", code], {"FASTNN_CACHE_SIZES": "l1d=32K,l2=1M,l3=32M"})
    assert r.returncode == 0, r.stderr
    info, blk = json.loads(r.stdout)
    assert (info["l1d"], info["l2"], info["l3"]) == (32 << 10, 1 << 20, 32 << 20)
    r = _run(["-m", "fastnn", "config"], {"FASTNN_CACHE_SIZES": "l1d=32K,l2=1M,l3=32M"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "L1d 32 KiB, L2 1 MiB per core; L3 32 MiB" in out
    assert "override 'l1d=32K,l2=1M,l3=32M'" in out
    line = next(ln for ln in out.splitlines() if "gemm_float32" in ln)
    for key in ("MR", "NR", "KC", "MC", "NC"):
        assert f"{key}={blk[key]}" in line
    assert "gemm_float64" in out and "family" in out


def test_malformed_env_warns_and_is_ignored():
    code = ("import warnings, json\nwith warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n    import fastnn.backends.cpu\n"
            "from fastnn import _C\nprint(json.dumps([str(x.message) for x in w]))\n"
            "print(json.dumps(_C.cpu_info()))")
    r = _run(["-c", code], {"FASTNN_CACHE_SIZES": "l2=lots"})
    assert r.returncode == 0, r.stderr
    warns, info = (json.loads(ln) for ln in r.stdout.splitlines()[-2:])
    assert any("FASTNN_CACHE_SIZES" in w for w in warns)
    assert info["override"] is None and info["l2"] == info["detected"]["l2"]


def test_bench_machine_header_names_caches_and_blocking():
    from fastnn import _C
    from fastnn.bench import machine, report

    info = machine.machine_info()
    c = info["fastnn_cpu"]
    blk = _C.gemm_blocking("float32")
    assert c["gemm_float32"] == " ".join(f"{k}={blk[k]}" for k in ("MR", "NR", "KC", "MC", "NC"))
    text = report.format_machine(info)
    assert c["caches"] in text and c["gemm_float32"] in text and c["cpu"] in text
