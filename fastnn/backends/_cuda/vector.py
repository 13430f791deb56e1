"""Vector (64/128-bit) loads and stores for the CUDA kernels.

Numba has no vector loads: an element of a float32 array, or of a complex64
view of it, compiles to scalar ``ld.global.f32`` instructions. The two helpers
here move ``n`` consecutive elements between a 1-D array and another 1-D array
(typically a per-thread ``cuda.local.array`` that lives in registers) with one
``<n x T>`` LLVM vector access per 16 bytes, which NVVM emits as
``ld.global.v4.f32`` / ``ld.shared.v4.f32`` (``.v2`` for float64 pairs).

* ``load_vec(dst, di, src, si, n)``: ``dst[di:di+n] = src[si:si+n]``,
  reading ``src`` with vector loads (``dst`` written element by element);
* ``store_vec(dst, di, src, si, n)``: the same copy, writing ``dst`` with
  vector stores (``src`` read element by element).

``n`` must be a compile-time constant (a closure constant of a kernel
factory). Kernels must reach these helpers as module globals
(``vector.load_vec``), never as closure variables: Numba's on-disk cache keys
a kernel on its pickled closure, and an intrinsic pickles with a
per-process id, so a closure holding one would never hit the cache.

The caller guarantees alignment: the vector side's address, i.e. the array's
base plus ``i * itemsize``, must be a multiple of ``min(n * itemsize, 16)``
bytes. A misaligned vector access is a hard fault on a GPU,
so the simulator twins below check exactly that and raise, which lets the
simulator tests prove the kernels' alignment reasoning without a GPU.

Shared arrays read with these helpers must be declared with
``alignment=SMEM_ALIGN`` where ``SHARED_ALIGN_KW`` (numba-cuda's
``cuda.shared.array`` keyword; Numba's older built-in CUDA target lacks it,
see ``SHARED_VECTORS``).
"""

from __future__ import annotations

import inspect
from typing import Any

import numba
from numba import cuda

#: Bytes a vector access moves at most (ld.global.v4.f32 / ld.global.v2.f64).
VECTOR_BYTES = 16
#: Alignment (bytes) that shared tiles read through the helpers are declared with.
SMEM_ALIGN = 16

SIM = bool(numba.config.ENABLE_CUDASIM)


def _shared_array_takes_alignment() -> bool:
    # numba-cuda declares ``array(shape, dtype, alignment=None)``; Numba's built-in
    # target (deprecated) only ``array(shape, dtype)``.
    try:
        return "alignment" in inspect.signature(cuda.shared.array).parameters
    except (AttributeError, TypeError, ValueError):
        return False


#: Whether shared tiles are declared with ``alignment=SMEM_ALIGN``. Never in the
#: simulator, which rejects the keyword (its NumPy-backed arrays are 16-byte
#: aligned by malloc anyway, and the twins above check every access).
SHARED_ALIGN_KW: bool = not SIM and _shared_array_takes_alignment()

#: Whether kernels read and write shared tiles with the vector helpers. On a GPU
#: that needs the alignment keyword; without it (Numba's built-in CUDA target)
#: kernels move shared data element by element (global memory still uses vector
#: loads). The simulator takes the vector path so its tests cover it.
SHARED_VECTORS: bool = SIM or SHARED_ALIGN_KW

#: Whether ``cuda.jit`` takes ``launch_bounds`` (numba-cuda; not the simulator).
LAUNCH_BOUNDS: bool = "launch_bounds" in inspect.signature(cuda.jit).parameters


def chunk_elems(n: int, itemsize: int) -> int:
    """Elements per vector access when moving ``n`` items of ``itemsize`` bytes."""
    return max(1, min(n, VECTOR_BYTES // itemsize))


if SIM:
    # ---- simulator twins: plain copies plus the alignment check ------------------
    # The simulator runs kernels as Python; these are what it calls instead of the
    # intrinsics below. Same semantics, same preconditions (checked).

    def _check_aligned(arr: Any, i: int, n: int, what: str) -> None:
        itemsize = arr.dtype.itemsize
        need = chunk_elems(n, itemsize) * itemsize
        addr = arr.ctypes.data + int(i) * itemsize
        if addr % need:
            raise AssertionError(
                f"{what}: vector access of {n} x {arr.dtype} at element {i} is not "
                f"{need}-byte aligned (address % {need} = {addr % need})"
            )

    def load_vec(dst: Any, di: int, src: Any, si: int, n: int) -> None:
        _check_aligned(src, si, n, "load_vec")
        for v in range(n):
            dst[di + v] = src[si + v]

    def store_vec(dst: Any, di: int, src: Any, si: int, n: int) -> None:
        _check_aligned(dst, di, n, "store_vec")
        for v in range(n):
            dst[di + v] = src[si + v]

else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _codegen(side: str) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            dst_ty, di_ty, src_ty, si_ty, n_ty = sig.args
            n = n_ty.literal_value
            dst = context.make_array(dst_ty)(context, builder, args[0])
            src = context.make_array(src_ty)(context, builder, args[2])
            di = context.cast(builder, args[1], di_ty, types.intp)
            si = context.cast(builder, args[3], si_ty, types.intp)
            elem = context.get_data_type(src_ty.dtype)
            itemsize = context.get_abi_sizeof(elem)
            chunk = chunk_elems(n, itemsize)
            vec_ty = ir.VectorType(elem, chunk)
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            for c0 in range(0, n, chunk):
                d0 = builder.add(di, ir.Constant(intp, c0))
                s0 = builder.add(si, ir.Constant(intp, c0))
                if side == "load":
                    vptr = builder.bitcast(builder.gep(src.data, [s0]), vec_ty.as_pointer())
                    vec = builder.load(vptr, align=chunk * itemsize)
                    for v in range(chunk):
                        ptr = builder.gep(dst.data, [builder.add(d0, ir.Constant(intp, v))])
                        builder.store(builder.extract_element(vec, ir.Constant(i32, v)), ptr)
                else:
                    vec = ir.Constant(vec_ty, ir.Undefined)
                    for v in range(chunk):
                        ptr = builder.gep(src.data, [builder.add(s0, ir.Constant(intp, v))])
                        vec = builder.insert_element(vec, builder.load(ptr), ir.Constant(i32, v))
                    vptr = builder.bitcast(builder.gep(dst.data, [d0]), vec_ty.as_pointer())
                    builder.store(vec, vptr, align=chunk * itemsize)
            return context.get_dummy_value()

        return codegen

    def _typer(name: str, dst: Any, di: Any, src: Any, si: Any, n: Any) -> Any:
        # Raising (not returning None) for a non-literal n makes Numba retry the
        # call with literal argument types, where a closure constant n arrives as
        # IntegerLiteral.
        ok = (
            isinstance(dst, types.Array) and isinstance(src, types.Array)
            and dst.ndim == 1 and src.ndim == 1 and dst.dtype == src.dtype
            and isinstance(di, types.Integer) and isinstance(si, types.Integer)
            and isinstance(n, types.IntegerLiteral) and n.literal_value > 0
        )
        if not ok:
            raise numba.core.errors.TypingError(
                f"{name}(dst, di, src, si, n): 1-D arrays of one dtype, integer offsets "
                f"and a constant n > 0; got {dst}, {di}, {src}, {si}, {n}"
            )
        return types.none(dst, di, src, si, n), _codegen(name[:-4])

    @intrinsic
    def load_vec(typingctx: Any, dst: Any, di: Any, src: Any, si: Any, n: Any) -> Any:
        return _typer("load_vec", dst, di, src, si, n)

    @intrinsic
    def store_vec(typingctx: Any, dst: Any, di: Any, src: Any, si: Any, n: Any) -> Any:
        return _typer("store_vec", dst, di, src, si, n)
