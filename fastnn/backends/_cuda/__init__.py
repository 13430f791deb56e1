"""Numba-CUDA kernels behind :mod:`fastnn.backends.cuda`.

Every module here imports Numba at import time, so only import them after
:func:`fastnn.backends._cuda.launch.runtime` has confirmed that a GPU (or
Numba's CUDA simulator) is usable; :mod:`fastnn.backends.cuda` does that lazily.

* ``launch``      -- runtime detection, CuPy stream hand-off, kernel launching.
* ``gemm``        -- tiled, register-blocked GEMM (batched, split-K, fused bias).
* ``vector``      -- 64/128-bit vector loads and stores (an intrinsic; a checked
  scalar twin under the simulator).
* ``variants``    -- every kernel variant with its launch signature (tests, JIT stage).
* ``conv``        -- im2col / col2im and a direct kernel for small-channel convs.
* ``pool``        -- max and average pooling, forward and backward.
* ``elementwise`` -- relu, softmax cross-entropy, SGD and Adam steps.
* ``fused``       -- the fused training step's kernels (conv+ReLU+pool from
  uint8, linear with bias/ReLU epilogues, one-kernel softmax-CE, backwards).
* ``multi_tensor``-- one-launch Adam/SGD over flat buffers (graph-replayable).

Kernels are generated per dtype and per compile-time configuration by small
factory functions (``functools.lru_cache``-d), so every literal inside a kernel
is of the array's dtype (``T(0)``) and a float32 kernel never promotes to
float64.
"""
