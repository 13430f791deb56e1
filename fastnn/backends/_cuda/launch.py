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
"""

from __future__ import annotations

import threading
import warnings
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
        if min(grid) <= 0:
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
