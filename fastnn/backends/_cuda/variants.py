"""Every CUDA kernel variant fastnn compiles, with the Numba signature it is launched with.

One list, three users:

* the lowering test (``tests/test_cuda_sim.py``) types and lowers each
  variant for the real CUDA target, no GPU and no NVVM needed;
* the PTX test (``tests/test_cuda_ptx.py``) compiles the GEMM variants to PTX
  for sm_90 and checks vector loads, unrolling, registers and spills;
* ``benchmarks/jit_compile.py`` (the JIT stage of ``benchmarks/gpu_check.sh``)
  compiles each one on a GPU, timing it and filling Numba's on-disk cache.

The signatures are those the launch sites produce (flat C-contiguous arrays,
Python ints as int64, float scalars as ``T(...)``), so a variant compiled from
this list is a cache hit for the real launch.

``core()`` covers every kernel family, every GEMM tile config and transpose,
wide and scalar loads, bias, float32 and float64, in a few dozen variants;
``every()`` adds the rest of the GEMM flag cross product and the optimiser
and direct-conv flag combinations (a few hundred, minutes to compile).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numba
from numba import types

from fastnn.backends._cuda import conv, gemm, pool
from fastnn.backends._cuda import elementwise as ew

_I64 = types.int64
_B1 = types.boolean


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel.

    Attributes
    ----------
    name : str
        ``family[flags]``, unique within a list, e.g. ``gemm[large,float32,ta0,tb1,wa1,wb1,bias0]``.
    family : str
        The kernel factory's short name (``gemm``, ``im2col``, ``sgd``, ...).
    kernel : numba dispatcher
        What the factory returned (``kernel.py_func`` is the Python source).
    sig : tuple
        Numba argument types, as launched.
    dtype : str
        ``"float32"`` or ``"float64"``.
    f64_ok : bool
        True where float64 arithmetic in a float32 kernel is intended (the
        cross-entropy loss accumulates per-row losses in float64).
    """

    name: str
    family: str
    kernel: Any
    sig: tuple
    dtype: str
    f64_ok: bool = False


def _arr(t: Any) -> Any:
    return types.Array(t, 1, "C")


def gemm_variant(T: Any, config: str, ta: bool, tb: bool, wa: bool, wb: bool,
                 bias: bool) -> Variant:
    """The GEMM kernel for one tile config and flag set (see ``gemm._gemm_kernel``)."""
    k = gemm._gemm_kernel(T, gemm.CONFIGS[config], ta, tb, wa, wb, bias)
    flags = f"ta{ta:d},tb{tb:d},wa{wa:d},wb{wb:d},bias{bias:d}"
    return Variant(f"gemm[{config},{T},{flags}]", "gemm", k, (_arr(T),) * 4 + (_I64,) * 16,
                   str(T))


def _families(T: Any, direct: list[tuple[int, int, int, bool]],
              sgd: list[tuple[bool, bool, bool]], adam: list[tuple[bool, bool]]) -> list[Variant]:
    A = _arr(T)
    name = str(T)
    out = [
        Variant(f"sum_splits[{name}]", "sum_splits", gemm._sum_splits_kernel(T),
                (A, A, _I64, _I64), name),
        Variant(f"im2col[{name}]", "im2col", conv._im2col_kernel(T), (A, A) + (_I64,) * 15, name),
        Variant(f"col2im[{name}]", "col2im", conv._col2im_kernel(T), (A, A) + (_I64,) * 15, name),
        *(Variant(f"max_fwd[{name},indices{idx:d}]", "max_fwd", pool._max_fwd_kernel(T, idx),
                  (A, A, _arr(_I64)) + (_I64,) * 13, name) for idx in (False, True)),
        Variant(f"max_bwd[{name}]", "max_bwd", pool._max_bwd_kernel(T), (A,) * 3 + (_I64,) * 13,
                name),
        Variant(f"avg_fwd[{name}]", "avg_fwd", pool._avg_fwd_kernel(T),
                (A, A) + (_I64,) * 11 + (_B1, _B1, _I64), name),
        Variant(f"avg_bwd[{name}]", "avg_bwd", pool._avg_bwd_kernel(T),
                (A, A) + (_I64,) * 11 + (_B1, _B1, _I64), name),
        Variant(f"relu[{name}]", "relu", ew._relu_kernel(T), (A, A, _I64), name),
        Variant(f"relu_bwd[{name}]", "relu_bwd", ew._relu_bwd_kernel(T), (A,) * 3 + (_I64,), name),
    ]
    rows, mean = ew._softmax_ce_kernels(T)
    f64 = _arr(numba.float64)
    out += [
        Variant(f"ce_rows[{name}]", "ce_rows", rows, (A, _arr(_I64), A, f64, _I64, _I64), name,
                f64_ok=True),
        Variant(f"ce_mean[{name}]", "ce_mean", mean, (f64, A, _I64), name, f64_ok=True),
    ]
    for cg, kh, kw, bias in direct:
        out.append(Variant(f"direct[{name},cg{cg},{kh}x{kw},bias{bias:d}]", "direct",
                           conv._direct_kernel(T, cg, kh, kw, bias), (A,) * 4 + (_I64,) * 14,
                           name))
    for wd, mom, nest in sgd:
        out.append(Variant(f"sgd[{name},wd{wd:d},m{mom:d},nesterov{nest:d}]", "sgd",
                           ew._sgd_kernel(T, wd, mom, nest), (A,) * 3 + (_I64, T, T, T), name))
    for l2, dec in adam:
        out.append(Variant(f"adam[{name},l2{l2:d},decoupled{dec:d}]", "adam",
                           ew._adam_kernel(T, l2, dec), (A,) * 4 + (_I64,) + (T,) * 9, name))
    return out


#: Representative GEMM flag sets (ta, tb, wa, wb, bias) per config: between them
#: every transpose, wide and scalar loads on both operands, and the fused bias.
_CORE_GEMM = {
    "large": [(0, 0, 1, 1, 1), (1, 1, 0, 0, 0), (0, 1, 1, 1, 0), (1, 0, 1, 1, 0)],
    "medium": [(1, 0, 1, 0, 0), (0, 1, 0, 1, 1)],
    "small": [(0, 1, 0, 1, 0), (1, 1, 1, 1, 0)],
}


def core() -> list[Variant]:
    """Every kernel family once per dtype plus representative GEMM variants (about 50)."""
    out: list[Variant] = []
    for T in (numba.float32, numba.float64):
        for config, flag_sets in _CORE_GEMM.items():
            for flags in flag_sets:
                out.append(gemm_variant(T, config, *(bool(f) for f in flags)))
        out += _families(T, direct=[(1, 3, 3, True)], sgd=[(True, True, True)],
                         adam=[(True, False)])
    return out


def every() -> list[Variant]:
    """``core()`` first, then every other GEMM / optimiser / direct-conv flag combination."""
    out = core()
    seen = {v.name for v in out}
    extra: list[Variant] = []
    sgd = [(wd, m, n) for wd, m, n in itertools.product((False, True), repeat=3) if m or not n]
    adam = [(False, False), (True, False), (False, True)]
    direct = [(1, kh, kh, bias) for kh in (3, 5) for bias in (False, True)]
    for T in (numba.float32, numba.float64):
        for config in gemm.CONFIGS:
            for flags in itertools.product((False, True), repeat=5):
                extra.append(gemm_variant(T, config, *flags))
        extra += _families(T, direct, sgd, adam)
    for v in extra:
        if v.name not in seen:
            seen.add(v.name)
            out.append(v)
    return out


def ptx(v: Variant, cc: tuple[int, int] = (9, 0)) -> str:
    """``v`` compiled to PTX for compute capability ``cc`` (needs NVVM, not a GPU).

    Passes the kernel's launch bounds (numba-cuda), so the PTX carries the same
    ``.maxntid`` / ``.minnctapersm`` register budget as the launched kernel.
    """
    from numba import cuda

    opts = {}
    bounds = getattr(v.kernel, "targetoptions", {}).get("launch_bounds")
    if bounds is not None:
        opts["launch_bounds"] = bounds
    code, _ = cuda.compile_ptx(v.kernel.py_func, v.sig, cc=cc, **opts)
    return code
