"""Runtime detection and kernel launching for the Numba-CUDA backend.

Two runtimes share the same kernels:

* ``gpu``: a real NVIDIA GPU. Arrays are CuPy arrays; kernels run on CuPy's
  current stream, so they order correctly with CuPy's own work and nothing
  here ever waits for the device.
* ``sim``: Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Numba
  is imported). Arrays are NumPy arrays and every kernel runs as Python code,
  one Python thread per CUDA thread: slow, but it executes the exact kernel
  source, shared memory and barriers included, which is what the simulator
  tests rely on.

Kernel-writing rules for this package (each one fixes a real failure mode):

* no builtin ``min``/``max`` inside kernels: Numba 0.68 types them through a
  ``*args`` overload that its CUDA target fails to compile; use ternaries;
* literals are ``T(...)`` of the array's dtype, never bare floats, so float32
  kernels do not promote to float64;
* never pass the same output array twice to one launch: the simulator copies
  every argument back after the launch and the stale copy would win.

Arrays cross into Numba through ``__cuda_array_interface__`` with
``sync=False``: by default Numba would synchronize the producer's stream on the
host for every kernel argument, which would stall the CPU on every launch.

Host cost. ``Runtime.launch`` converts every argument and lets Numba resolve
the overload from the argument types on each call (tens of microseconds on a
GPU). Hot paths that launch the same kernels on the same buffers every step
(the fused training step, the multi-tensor optimizer) build a
:class:`BoundLaunch` once instead: the device-array views are made once (and
cached per buffer by :meth:`Runtime.device_view`), the compiled overload is
picked once, the kernel arguments are marshalled once, and each call is a bare
driver launch on the current stream.

Launch recording. ``with rt.recording(execute=False) as rec:`` counts every
launch (both paths) in ``rec`` without running it: that is how launches per
training step and the Python cost of a step are measured without a GPU
(``fastnn bench --count-launches``). ``execute=True`` counts and runs.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from fastnn._array import is_cupy

_lock = threading.Lock()
_runtime: Runtime | None = None
_reason: str | None = None


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


class Runtime:
    """What the kernels run on: Numba's ``cuda`` module, the array module, sizes.

    Attributes
    ----------
    sim : bool
        True under Numba's CUDA simulator (NumPy arrays), False on a GPU (CuPy).
    cuda : module
        ``numba.cuda``.
    xp : module
        ``numpy`` under the simulator, ``cupy`` on a GPU.
    num_sms : int
        Streaming multiprocessors, used to size GEMM tiles and split-K. The
        simulator pretends to have 4 so that tiny test problems take the same
        small-tile / split-K paths a small problem takes on a real GPU.
    """

    def __init__(self, sim: bool, cuda: Any, xp: Any, num_sms: int) -> None:
        self.sim = sim
        self.cuda = cuda
        self.xp = xp
        self.num_sms = num_sms
        self._streams: dict[int, Any] = {}
        self._views: dict[tuple, Any] = {}
        #: Set by :meth:`recording`: the list launches are appended to, and
        #: whether they also run.
        self.record: LaunchRecord | None = None

    # -- arrays ------------------------------------------------------------
    def check(self, a: Any, name: str) -> None:
        """Raise TypeError unless ``a`` lives where the kernels run."""
        if a is None:
            return
        if self.sim:
            import numpy as np

            if not isinstance(a, np.ndarray):
                raise TypeError(
                    f"{name}: the CUDA simulator takes NumPy arrays, got {type(a).__name__}"
                )
        elif not is_cupy(a):
            raise TypeError(
                f"{name}: the cuda backend takes CuPy arrays, got {type(a).__name__}; "
                "move it to the GPU with cupy.asarray(...)"
            )

    def empty(self, shape: Any, dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape: Any, dtype: Any) -> Any:
        return self.xp.zeros(shape, dtype=dtype)

    @staticmethod
    def is_aligned(a: Any, nbytes: int) -> bool:
        """Whether ``a``'s first element sits on an ``nbytes`` boundary."""
        if hasattr(a, "data") and hasattr(a.data, "ptr"):  # cupy
            return a.data.ptr % nbytes == 0
        return a.ctypes.data % nbytes == 0

    def device_view(self, a: Any) -> Any:
        """Numba's device-array view of CuPy array ``a``, cached per buffer.

        Keyed by (pointer, shape, strides, dtype): a view describes memory, not
        an owner, so a buffer recycled by CuPy's pool at the same address and
        layout reuses its view. The cache is bounded (cleared when it grows
        past 4096 entries). Under the simulator arrays pass through.
        """
        if self.sim or not hasattr(a, "__cuda_array_interface__"):
            return a
        key = (a.data.ptr, a.shape, a.strides, a.dtype.char)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 4096:
                self._views.clear()
            v = self._views[key] = self.cuda.as_cuda_array(a, sync=False)
        return v

    @contextlib.contextmanager
    def recording(self, execute: bool = False) -> Iterator[LaunchRecord]:
        """Count every kernel launch inside the block; run them only if ``execute``."""
        prev = self.record
        rec = self.record = LaunchRecord(execute)
        try:
            yield rec
        finally:
            self.record = prev

    def _recorded(self, kernel: Any, grid: tuple[int, ...], block: Any,
                  bound: BoundLaunch | None = None) -> bool:
        """Note a launch when recording; True when it must not run."""
        rec = self.record
        if rec is None:
            return False
        rec.append((_kernel_name(kernel), grid, block))
        rec.bound.append(bound)
        return not rec.execute

    # -- launching ---------------------------------------------------------
    def stream(self) -> Any:
        """Numba's handle on CuPy's current stream (cached per stream pointer)."""
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        s = self._streams.get(ptr)
        if s is None:
            # 0 is CuPy's (legacy) null stream; anything else (including 2, the
            # per-thread default stream) is a handle Numba can wrap as is.
            s = self.cuda.legacy_default_stream() if ptr == 0 else self.cuda.external_stream(ptr)
            self._streams[ptr] = s
        return s

    def launch(self, kernel: Any, grid: tuple[int, ...], block: int, *args: Any) -> None:
        """Launch ``kernel[grid, block]`` on the current stream; empty grids do nothing.

        Array arguments are wrapped without the CUDA-array-interface stream
        sync (see the module docstring); scalars pass through and are typed by
        Numba (pass ``T(value)`` for a float of the array's dtype).
        """
        if min(grid) <= 0 or self._recorded(kernel, grid, block):
            return
        if self.sim:
            kernel[grid, block](*args)
            return
        as_array = self.cuda.as_cuda_array
        dev_args = [
            as_array(a, sync=False) if hasattr(a, "__cuda_array_interface__") else a
            for a in args
        ]
        kernel[grid, block, self.stream()](*dev_args)

    def copy_into(self, dst: Any, src: Any) -> None:
        """``dst[...] = src`` (same dtype and size, ``dst`` contiguous): one
        device-to-device memcpy on the current stream, no kernel (recorded as a
        copy in :meth:`recording`)."""
        if dst.dtype != src.dtype or dst.size != src.size:
            raise ValueError(f"copy_into: cannot copy {src.dtype}{tuple(src.shape)} into "
                             f"{dst.dtype}{tuple(dst.shape)}")
        rec = self.record
        if rec is not None:
            rec.copies += 1
            if not rec.execute:
                return
        if self.sim:
            dst.reshape(-1)[...] = src.reshape(-1)
            return
        if not src.flags.c_contiguous:
            src = self.xp.ascontiguousarray(src)
        dst.data.copy_from_device_async(src.data, src.nbytes)

    def bind(self, kernel: Any, grid: tuple[int, ...], block: int | tuple[int, ...],
             *args: Any) -> BoundLaunch:
        """A :class:`BoundLaunch` of ``kernel[grid, block](*args)`` (see there)."""
        return BoundLaunch(self, kernel, grid, block, args)


class LaunchRecord(list):
    """Launches seen inside :meth:`Runtime.recording`: ``(kernel name, grid, block)``."""

    def __init__(self, execute: bool) -> None:
        super().__init__()
        self.execute = execute
        self.copies = 0  # device-to-device copies (Runtime.copy_into)
        #: the BoundLaunch of each entry (None for Runtime.launch): replayable.
        self.bound: list[BoundLaunch | None] = []


def _kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "py_func", None) or getattr(kernel, "fn", None) or kernel
    # Kernels come from factories: "_adam_kernel.<locals>.kernel" -> "_adam_kernel".
    return getattr(fn, "__qualname__", type(kernel).__name__).split(".<locals>")[0]


class BoundLaunch:
    """One kernel launch whose grid, block and arguments are fixed once.

    Calling it launches the kernel on CuPy's current stream. On a GPU the
    compiled overload is chosen (and compiled, if the disk cache misses) at
    construction, from the types of the cached device views, and the kernel
    arguments are marshalled once: a call is one driver launch, with no
    per-call typing or conversion. It relies on Numba's ``_Kernel`` internals
    (``_prepare_args``, ``_codelibrary``); when they are missing (another
    numba-cuda version) it falls back to an ordinary dispatcher launch on the
    cached views, still without per-call conversion. Arguments must stay alive
    and at the same address for the life of the launch (static buffers).
    """

    def __init__(self, rt: Runtime, kernel: Any, grid: tuple[int, ...],
                 block: int | tuple[int, ...], args: tuple[Any, ...]) -> None:
        self.rt = rt
        self.kernel = kernel
        self.grid = tuple(int(g) for g in grid)
        self.block = block
        self.args = args  # keeps the buffers alive
        self.empty = min(self.grid) <= 0
        self._dev_args = tuple(rt.device_view(a) for a in args)
        self._fast: Any = None
        self._launchers: dict[int, Any] = {}
        if not rt.sim and not self.empty:
            self._fast = self._prepare()

    def _prepare(self) -> Any:
        try:
            from numba.cuda.cudadrv import driver

            argtypes = tuple(self.kernel.typeof_pyval(a) for a in self._dev_args)
            compiled = self.kernel.compile(argtypes)
            kernelargs: list[Any] = []
            retr: list[Any] = []
            for t, v in zip(compiled.argument_types, self._dev_args):
                compiled._prepare_args(t, v, 0, retr, kernelargs)
            if retr:  # host arrays need write-back: not a static launch
                return None
            handle = compiled._codelibrary.get_cufunc().handle
            block = self.block if isinstance(self.block, tuple) else (self.block,)
            dims = (*self.grid, *(1,) * (3 - len(self.grid)), *block, *(1,) * (3 - len(block)))
            return driver, handle, dims, kernelargs
        except Exception:  # noqa: BLE001 - any mismatch: use the dispatcher path
            return None

    def __call__(self) -> None:
        rt = self.rt
        if self.empty or rt._recorded(self.kernel, self.grid, self.block, self):
            return
        if rt.sim:
            self.kernel[self.grid, self.block](*self.args)
            return
        stream = rt.stream()
        fast = self._fast
        if fast is not None:
            driver, handle, dims, kernelargs = fast
            driver.launch_kernel(handle, *dims, 0, stream.handle, kernelargs)
            return
        self.kernel[self.grid, self.block, stream](*self._dev_args)


def _probe() -> tuple[Runtime | None, str | None]:
    try:
        import numba
        from numba import cuda
    except ImportError as exc:
        return None, f"Numba is not installed ({exc})"
    if numba.config.ENABLE_CUDASIM:
        import numpy

        return Runtime(sim=True, cuda=cuda, xp=numpy, num_sms=4), None
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not installed ({exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no CUDA device is visible"
        if not cuda.is_available():
            return None, "Numba cannot use the CUDA driver (numba.cuda.is_available() is False)"
        device = cupy.cuda.Device()
        num_sms = int(device.attributes["MultiProcessorCount"])
        # Numba and CuPy must share the device (both use its primary context).
        cuda.select_device(device.id)
    except Exception as exc:  # noqa: BLE001 - any driver error means unavailable
        return None, f"CUDA initialisation failed ({type(exc).__name__}: {exc})"
    # Numba warns on every launch with fewer blocks than ~2 waves; small layers
    # (and every launch at MNIST sizes) would flood the log.
    warnings.filterwarnings("ignore", message=r"Grid size .* will likely result in GPU")
    return Runtime(sim=False, cuda=cuda, xp=cupy, num_sms=num_sms), None


def runtime_or_none() -> tuple[Runtime | None, str | None]:
    """The runtime, or None and the reason it is unavailable (probed once)."""
    global _runtime, _reason
    if _runtime is None and _reason is None:
        with _lock:
            if _runtime is None and _reason is None:
                _runtime, _reason = _probe()
    return _runtime, _reason


def runtime() -> Runtime:
    """The runtime; raises RuntimeError saying why when no GPU or simulator is usable."""
    rt, reason = runtime_or_none()
    if rt is None:
        raise RuntimeError(
            f"fastnn's cuda backend is unavailable: {reason}. It needs an NVIDIA GPU with "
            "CuPy and numba-cuda, or Numba's simulator (set NUMBA_ENABLE_CUDASIM=1 before "
            "importing numba)."
        )
    return rt
