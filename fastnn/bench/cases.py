"""Benchmark cases: what is timed, its FLOP and byte counts, and how to set it up.

A :class:`Case` is plain data (op name, a shape label, JSON-able geometry), so a
worker process can rebuild it from JSON. :func:`prepare` turns a case into a
zero-argument callable for one backend:

* ``numpy`` -- :mod:`fastnn.backends.numpy_ref`, the reference (for ``matmul``
  plain ``numpy.matmul``: there the reference *is* NumPy's BLAS);
* ``cpu`` / ``cuda`` -- fastnn's C++ and Numba-CUDA backends, called through the
  backend contract of :mod:`fastnn.backends` (no validation overhead, and the two
  conv2d backward passes can be timed separately);
* ``torch`` -- PyTorch on the CPU as a peer, calling the same ATen kernels its
  autograd runs in training.

Training cases (``train_step``, ``train_mnist``) run the very step ``fastnn
train`` runs (:func:`fastnn.training.train_step`, :func:`~fastnn.training.run_epoch`);
their setup lives in :mod:`fastnn.bench.train_cases`.

Layouts: activations NCHW, conv weights OIHW, matrices row-major; all inputs are
standard-normal of the chosen float dtype, drawn from a fixed seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from fastnn._array import is_cupy, to_host
from fastnn.geometry import conv_out_size as _out

#: op families accepted by ``--ops`` (an op also matches its own full name).
FAMILIES = ("conv2d", "matmul", "max_pool2d", "avg_pool2d", "elementwise", "train")
#: tags ``--ops`` also accepts: ``strong`` = the strong preset's conv layers and step.
TAG_SELECTORS = ("strong",)
BACKENDS = ("numpy", "cpu", "cuda", "torch")
#: the MNIST seed model: conv 1->32 3x3, relu, maxpool 2, linear 5408->128, relu, linear 128->10.
SEED_HIDDEN = 128
SEED_FEATURES = 32 * 13 * 13


class Unsupported(Exception):
    """This backend cannot run this case here (reported, not fatal)."""


@dataclass
class Case:
    """One timed operation at one shape.

    ``metric`` says which throughput the report shows: ``gflops`` (compute-bound
    ops), ``gb_s`` (memory-bound ops: bytes is the minimum traffic, each input
    read once and each output written once) or ``images_s`` (training).
    """

    op: str
    shape: str
    params: dict[str, Any]
    metric: str
    flops: float = 0.0
    bytes: float = 0.0
    tags: tuple[str, ...] = ()
    #: batch images per call, for ``images_s``.
    images: int = 0
    family: str = field(default="")

    def __post_init__(self) -> None:
        self.tags = tuple(self.tags)
        if not self.family:
            self.family = _family(self.op)

    @property
    def key(self) -> tuple[str, str]:
        return (self.op, self.shape)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        return cls(**d)


def _family(op: str) -> str:
    for fam in ("conv2d", "matmul", "max_pool2d", "avg_pool2d"):
        if op.startswith(fam):
            return fam
    return "train" if op.startswith("train") else "elementwise"


# --------------------------------------------------------------------------- #
# Case constructors
# --------------------------------------------------------------------------- #


def conv_case(
    op: str, n: int, c: int, hw: int, o: int, k: int = 3, stride: int = 1, padding: int = 0,
    tags: tuple[str, ...] = (), itemsize: int = 4,
) -> Case:
    """conv2d ``op`` (conv2d_fwd / conv2d_bwd_input / conv2d_bwd_weight), square images."""
    oh = _out(hw, k, stride, padding)
    flops = 2.0 * n * o * oh * oh * c * k * k
    x, w, y = n * c * hw * hw, o * c * k * k, n * o * oh * oh
    traffic = {"conv2d_fwd": x + w + y + o, "conv2d_bwd_input": y + w + x,
               "conv2d_bwd_weight": y + x + w}[op]
    label = f"N{n} {c}->{o} {k}x{k} {hw}x{hw}" + (f" s{stride}" if stride != 1 else "")
    label += f" p{padding}" if padding else ""
    params = {"N": n, "C": c, "H": hw, "W": hw, "O": o, "K": k, "stride": stride,
              "padding": padding}
    return Case(op, label, params, "gflops", flops, traffic * itemsize, tags)


def matmul_case(
    m: int, k: int, n: int, *, ta: bool = False, tb: bool = False, op: str = "matmul",
    tags: tuple[str, ...] = (), itemsize: int = 4,
) -> Case:
    """op(A) (M,K) @ op(B) (K,N); A stored (K,M) when ``ta``, B stored (N,K) when ``tb``."""
    label = f"{m}x{k}x{n}" + (" A^T" if ta else "") + (" B^T" if tb else "")
    params = {"M": m, "K": k, "N": n, "ta": ta, "tb": tb}
    return Case(op, label, params, "gflops", 2.0 * m * n * k,
                (m * k + k * n + m * n) * itemsize, tags)


def pool_case(
    op: str, n: int, c: int, hw: int, k: int = 2, stride: int | None = None, padding: int = 0,
    tags: tuple[str, ...] = (), itemsize: int = 4,
) -> Case:
    """Pooling ``op`` (max_pool2d_fwd/bwd, avg_pool2d_fwd/bwd) over square images."""
    s = k if stride is None else stride
    oh = _out(hw, k, s, padding)
    x, y = n * c * hw * hw, n * c * oh * oh
    # max bwd re-reads x to find each window's argmax; avg bwd needs only grad_out.
    traffic = {"fwd": x + y, "bwd": y + x + (x if op.startswith("max") else 0)}[op[-3:]]
    label = f"N{n} C{c} {hw}x{hw} k{k} s{s}" + (f" p{padding}" if padding else "")
    params = {"N": n, "C": c, "H": hw, "W": hw, "K": k, "stride": s, "padding": padding}
    return Case(op, label, params, "gb_s", float(y * k * k), traffic * itemsize, tags)


def elementwise_case(op: str, shape: tuple[int, ...], tags: tuple[str, ...] = (),
                     itemsize: int = 4) -> Case:
    """relu_fwd, relu_bwd, softmax_xent (shape (N, K)), sgd_step, adam_step (shape (P,))."""
    numel = math.prod(shape)
    # arrays streamed per element: relu x->y; relu_bwd gy,y->gx; xent logits->grad;
    # sgd (momentum) p,g,buf->p,buf; adam p,g,m,v->p,m,v.
    passes = {"relu_fwd": 2, "relu_bwd": 3, "softmax_xent": 2, "sgd_step": 5,
              "adam_step": 7}[op]
    flops = {"relu_fwd": 1, "relu_bwd": 1, "softmax_xent": 6, "sgd_step": 4,
             "adam_step": 12}[op] * numel
    label = "x".join(str(s) for s in shape)
    if op in ("sgd_step", "adam_step"):
        label = f"{numel} params"
    return Case(op, label, {"shape": list(shape)}, "gb_s", float(flops),
                float(passes * numel * itemsize), tags)


def seed_flops(n: int) -> float:
    """FLOPs of one seed-model training step: forward plus the backward passes it needs
    (no input gradient for the first conv)."""
    conv = 2.0 * n * 32 * 26 * 26 * 9
    fc1 = 2.0 * n * SEED_FEATURES * SEED_HIDDEN
    fc2 = 2.0 * n * SEED_HIDDEN * 10
    return 2 * conv + 3 * fc1 + 3 * fc2


def strong_flops(n: int) -> float:
    """FLOPs of one ``strong``-preset training step: each conv's forward and weight
    gradient, every conv but the first's input gradient, and the two Linear layers'
    three products each (BatchNorm, ReLU and pooling are not counted)."""
    convs = [(1, 28, 32)] + [(c, hw, o) for _, c, hw, o in STRONG_CONVS]
    flops = [2.0 * n * o * (hw - 2) ** 2 * c * 9 for c, hw, o in convs]
    fc = 2.0 * n * (64 * 4 * 4 * 256 + 256 * 10)
    return 2 * sum(flops) + sum(flops[1:]) + 3 * fc


#: train_step's model presets and their FLOPs per step at batch n.
_STEP_FLOPS = {"seed": seed_flops, "strong": strong_flops}


def train_step_case(n: int = 128, tags: tuple[str, ...] = (), model: str = "seed") -> Case:
    """One Adam step (forward, backward, update) of preset ``model`` on a fixed batch
    of ``n`` images: :func:`fastnn.training.train_step`, the step ``fastnn train``
    runs (torch: the same architecture as nn.Module + autograd + optim)."""
    if model not in _STEP_FLOPS:
        raise ValueError(f"model must be one of {sorted(_STEP_FLOPS)}, got {model!r}")
    return Case("train_step", f"{model} N{n}", {"N": n, "model": model}, "images_s",
                _STEP_FLOPS[model](n), 0.0, tags, images=n)


def train_mnist_case(n: int = 128, steps: int = 200, tags: tuple[str, ...] = ()) -> Case:
    """``steps`` consecutive seed-model Adam steps over shuffled MNIST batches (real data
    when found, else random data of MNIST's shape): :func:`fastnn.training.run_epoch`
    over a DataLoader, as ``fastnn train`` runs an epoch; ``epoch_s`` in the report
    scales it to 60,000 images."""
    return Case("train_mnist", f"seed N{n} {steps} steps", {"N": n, "steps": steps},
                "images_s", seed_flops(n) * steps, 0.0, tags, images=n * steps)


# --------------------------------------------------------------------------- #
# Case sets
# --------------------------------------------------------------------------- #

CONV_PASSES = ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight")
POOL_PASSES = ("max_pool2d_fwd", "max_pool2d_bwd", "avg_pool2d_fwd", "avg_pool2d_bwd")
#: (N, C, HW, O, padding): the MNIST first layer at two batch sizes, and a deeper layer.
MNIST_CONVS = ((32, 1, 28, 32, 0), (128, 1, 28, 32, 0), (128, 32, 13, 64, 1))
#: (N, C, HW, O): the ``strong`` preset's conv layers past the first (which is
#: MNIST_CONVS' 128 1->32 28x28): 3x3, stride 1, no padding.
STRONG_CONVS = ((128, 32, 26, 32), (128, 32, 12, 64), (128, 64, 10, 64))
MNIST_POOL = (128, 32, 26)
SQUARES = (256, 512, 1024, 2048)


def mnist_linear_cases(tags: tuple[str, ...] = ()) -> list[Case]:
    """The seed model's Linear(5408, 128) at batch 128: forward x @ W^T, then the two
    backward products grad_x = g @ W and grad_W = g^T @ x."""
    n, f, h = 128, SEED_FEATURES, SEED_HIDDEN
    return [
        matmul_case(n, f, h, tb=True, op="matmul_linear_fwd", tags=tags),
        matmul_case(n, h, f, op="matmul_linear_bwd_input", tags=tags),
        matmul_case(h, n, f, ta=True, op="matmul_linear_bwd_weight", tags=tags),
    ]


def small_matmul_cases(tags: tuple[str, ...] = ()) -> list[Case]:
    """Small or skinny products where packing is overhead (32^3; the seed model's
    Linear(128, 10) at batch 128)."""
    return [matmul_case(32, 32, 32, op="matmul_small", tags=tags),
            matmul_case(128, 128, 10, tb=True, op="matmul_small", tags=tags)]


def elementwise_cases(tags: tuple[str, ...] = ()) -> list[Case]:
    """The training loop's elementwise ops at the seed model's sizes."""
    act = (128, 32, 26, 26)
    params = (SEED_FEATURES * SEED_HIDDEN + SEED_HIDDEN + 32 * 9 + 32 + SEED_HIDDEN * 10 + 10,)
    return [elementwise_case("relu_fwd", act, tags), elementwise_case("relu_bwd", act, tags),
            elementwise_case("softmax_xent", (128, 10), tags),
            elementwise_case("sgd_step", params, tags), elementwise_case("adam_step", params, tags)]


def standard_cases() -> list[Case]:
    """The MNIST layer shapes, square matmuls 256..2048, small/skinny matmuls, the
    elementwise ops and the training step/throughput. ``quick`` marks the subset
    ``--quick`` runs."""
    out: list[Case] = []
    for n, c, hw, o, p in MNIST_CONVS:
        quick = ("quick",) if n == 128 else ()
        strong = ("strong",) if (n, c, hw, o, p) == (128, 1, 28, 32, 0) else ()
        out += [conv_case(op, n, c, hw, o, 3, 1, p, ("mnist",) + quick + strong)
                for op in CONV_PASSES]
    for n, c, hw, o in STRONG_CONVS:
        out += [conv_case(op, n, c, hw, o, tags=("mnist", "strong")) for op in CONV_PASSES]
    out += mnist_linear_cases(("mnist", "quick"))
    out += [matmul_case(s, s, s, tags=("square",) + (("quick",) if s == 512 else ()))
            for s in SQUARES]
    out += small_matmul_cases(("small", "quick"))
    out += [pool_case(op, *MNIST_POOL, tags=("mnist", "quick")) for op in POOL_PASSES]
    out += elementwise_cases(("elementwise", "quick"))
    out.append(train_step_case(128, ("train", "quick")))
    out.append(train_step_case(128, ("train", "strong"), model="strong"))
    out.append(train_mnist_case(128, 200, ("train",)))
    return out


def sweep_cases() -> list[Case]:
    """Wider sweeps for the full run. ``heavy`` cases skip the slow NumPy reference
    unless it is asked for by name."""
    out: list[Case] = []
    for s in (64, 128, 384, 768, 1536):
        heavy = ("heavy",) if s > 1024 else ()
        out.append(matmul_case(s, s, s, tags=("sweep", "square") + heavy))
    for m, k, n in ((1024, 1024, 64), (64, 1024, 1024), (4096, 256, 256), (256, 4096, 256)):
        out.append(matmul_case(m, k, n, tags=("sweep", "rect")))
    for n in (1, 8, 64, 256):
        out += [conv_case(op, n, 1, 28, 32, tags=("sweep",)) for op in CONV_PASSES]
    for c, o in ((16, 32), (64, 128)):
        out += [conv_case(op, 64, c, 13, o, 3, 1, 1, ("sweep",)) for op in CONV_PASSES]
    out += [conv_case(op, 32, 64, 32, 64, 3, 1, 1, ("sweep", "heavy")) for op in CONV_PASSES]
    for n, c, hw in ((32, 32, 26), (128, 64, 56)):
        out += [pool_case(op, n, c, hw, tags=("sweep",)) for op in POOL_PASSES]
    out += [pool_case(op, 128, 32, 26, 3, 2, 1, ("sweep",)) for op in POOL_PASSES]
    return out


def tiny_cases() -> list[Case]:
    """Seconds-long smoke set covering every op (used by the tests and ``--tiny``)."""
    out = [conv_case(op, 2, 3, 8, 4, 3, 1, 1, ("tiny",)) for op in CONV_PASSES]
    out += [matmul_case(16, 24, 8, tags=("tiny",)),
            matmul_case(8, 16, 12, ta=True, op="matmul_linear_bwd_weight", tags=("tiny",))]
    out += [pool_case(op, 2, 3, 8, tags=("tiny",)) for op in POOL_PASSES]
    out += [elementwise_case(op, (4, 10) if op == "softmax_xent" else (2, 3, 8, 8), ("tiny",))
            for op in ("relu_fwd", "relu_bwd", "softmax_xent", "sgd_step", "adam_step")]
    out += [train_step_case(4, ("tiny",)), train_mnist_case(8, 3, ("tiny",))]
    return out


def select_cases(mode: str = "full", ops: list[str] | None = None) -> list[Case]:
    """Cases for a run: ``quick`` (the quick-tagged MNIST subset), ``standard``,
    ``full`` (standard plus sweeps) or ``tiny``; filtered by ``ops``, whose items
    are families (``conv2d``, ``matmul``, ``max_pool2d``, ``avg_pool2d``,
    ``elementwise``, ``train``), full op names, op-name prefixes or a tag of
    :data:`TAG_SELECTORS` (``strong``)."""
    if mode == "tiny":
        cases = tiny_cases()
    elif mode == "quick":
        cases = [c for c in standard_cases() if "quick" in c.tags]
    elif mode == "standard":
        cases = standard_cases()
    elif mode == "full":
        cases = standard_cases() + sweep_cases()
    else:
        raise ValueError(f"mode must be quick, standard, full or tiny, got {mode!r}")
    if ops:
        cases = [c for c in cases if any(_matches(c, o) for o in ops)]
    return cases


def _matches(case: Case, item: str) -> bool:
    return (item in (case.family, case.op) or case.op.startswith(item + "_")
            or (item in TAG_SELECTORS and item in case.tags))


def known_op_names() -> set[str]:
    """Everything ``--ops`` accepts."""
    names = set(FAMILIES) | set(TAG_SELECTORS)
    for c in standard_cases() + sweep_cases():
        parts = c.op.split("_")
        names.update("_".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


# --------------------------------------------------------------------------- #
# Setup per backend
# --------------------------------------------------------------------------- #


@dataclass
class Prepared:
    """A ready-to-time case: ``fn()`` runs it once; ``timer`` (``wall`` or ``cupy``)
    names how to time it."""

    fn: Callable[[], Any]
    timer: str = "wall"
    #: e.g. where train_mnist's data came from ("mnist" or "random").
    note: str = ""
    #: long runs (train_mnist) are timed once per round after ``warmup_fn``, not repeated.
    single_shot: bool = False
    warmup_fn: Callable[[], Any] | None = None


def _rand(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape, dtype=np.float64).astype(dtype)


def prepare(case: Case, backend: str, dtype: str = "float32") -> Prepared:
    """Build inputs for ``case`` on ``backend`` and return the callable to time.

    Raises :class:`Unsupported` when the backend is not usable here.
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    if backend == "torch":
        from fastnn.bench import torch_peer

        return torch_peer.prepare(case, dtype)
    if backend not in ("numpy", "cpu", "cuda"):
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mod, put, timer = _fastnn_backend(backend)
    if case.family == "train":
        from fastnn.bench import train_cases

        return train_cases.prepare(case, backend, dtype)
    builders = {"conv2d": _conv, "matmul": _matmul, "max_pool2d": _pool, "avg_pool2d": _pool,
                "elementwise": _elementwise}
    if case.family == "matmul" and backend == "numpy":
        mod = _NumpyMatmul
    return Prepared(builders[case.family](case, mod, put, dtype), timer)


def _fastnn_backend(name: str) -> tuple[Any, Callable[[np.ndarray], Any], str]:
    from fastnn.backends import get_backend

    try:
        mod = get_backend(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        raise Unsupported(f"backend {name!r} does not import: {exc}") from exc
    check = getattr(mod, "is_available", None)
    if check is not None and not check():
        raise Unsupported(f"backend {name!r} is not available here")
    if name == "cuda":
        import cupy

        return mod, cupy.asarray, "cupy"
    return mod, (lambda a: a), "wall"


class _NumpyMatmul:
    """The ``numpy`` peer for matmul is NumPy itself (``np.matmul`` on transposed views),
    so its GFLOP/s is the installed BLAS's, with no output copy."""

    @staticmethod
    def matmul(a: np.ndarray, b: np.ndarray, ta: bool, tb: bool) -> np.ndarray:
        return np.matmul(a.T if ta else a, b.T if tb else b)


def conv_arrays(p: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Host inputs of a conv case: x, weight, bias and grad_out (NCHW / OIHW)."""
    n, c, h, w, o, k = p["N"], p["C"], p["H"], p["W"], p["O"], p["K"]
    oh, ow = _out(h, k, p["stride"], p["padding"]), _out(w, k, p["stride"], p["padding"])
    return {"x": _rand((n, c, h, w), dtype, 1), "w": _rand((o, c, k, k), dtype, 2) * 0.1,
            "b": _rand((o,), dtype, 3), "gy": _rand((n, o, oh, ow), dtype, 4)}


def _conv(case: Case, mod: Any, put: Callable, dtype: str) -> Callable[[], Any]:
    p = case.params
    a = {name: put(v) for name, v in conv_arrays(p, dtype).items()}
    s, pad, d = (p["stride"],) * 2, (p["padding"],) * 2, (1, 1)
    if case.op == "conv2d_fwd":
        return lambda: mod.conv2d(a["x"], a["w"], a["b"], s, pad, d, 1)
    if case.op == "conv2d_bwd_input":
        hw = (p["H"], p["W"])
        return lambda: mod.conv2d_backward_input(a["gy"], a["w"], hw, s, pad, d, 1)
    khw = (p["K"], p["K"])
    return lambda: mod.conv2d_backward_weight(a["gy"], a["x"], khw, s, pad, d, 1)


def matmul_arrays(p: dict[str, Any], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Stored operands: A (M,K) or (K,M) when transposed; B (K,N) or (N,K)."""
    m, k, n = p["M"], p["K"], p["N"]
    a = _rand((k, m) if p["ta"] else (m, k), dtype, 5)
    b = _rand((n, k) if p["tb"] else (k, n), dtype, 6)
    return a, b


def _matmul(case: Case, mod: Any, put: Callable, dtype: str) -> Callable[[], Any]:
    a, b = (put(v) for v in matmul_arrays(case.params, dtype))
    ta, tb = case.params["ta"], case.params["tb"]
    return lambda: mod.matmul(a, b, ta, tb)


def pool_arrays(p: dict[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Host inputs of a pooling case: x (N,C,H,W) and grad_out (N,C,OH,OW)."""
    oh = _out(p["H"], p["K"], p["stride"], p["padding"])
    ow = _out(p["W"], p["K"], p["stride"], p["padding"])
    return {"x": _rand((p["N"], p["C"], p["H"], p["W"]), dtype, 7),
            "gy": _rand((p["N"], p["C"], oh, ow), dtype, 8), "out_hw": (oh, ow)}


def _pool(case: Case, mod: Any, put: Callable, dtype: str) -> Callable[[], Any]:
    p = case.params
    arr = pool_arrays(p, dtype)
    x, gy, out_hw = put(arr["x"]), put(arr["gy"]), arr["out_hw"]
    k, s, pad, d, hw = (p["K"],) * 2, (p["stride"],) * 2, (p["padding"],) * 2, (1, 1), x.shape[2:]
    return {
        "max_pool2d_fwd": lambda: mod.max_pool2d(x, k, s, pad, d, out_hw),
        "max_pool2d_bwd": lambda: mod.max_pool2d_backward(gy, x, k, s, pad, d),
        "avg_pool2d_fwd": lambda: mod.avg_pool2d(x, k, s, pad, out_hw, True, None),
        "avg_pool2d_bwd": lambda: mod.avg_pool2d_backward(gy, hw, k, s, pad, True, None),
    }[case.op]


def _elementwise(case: Case, mod: Any, put: Callable, dtype: str) -> Callable[[], Any]:
    shape = tuple(case.params["shape"])
    x = put(_rand(shape, dtype, 9))
    g = put(_rand(shape, dtype, 10))
    if case.op == "relu_fwd":
        return lambda: mod.relu(x)
    if case.op == "relu_bwd":
        return lambda: mod.relu_backward(g, x)
    if case.op == "softmax_xent":
        labels = put(np.random.default_rng(11).integers(0, shape[1], shape[0]).astype(np.int64))
        return lambda: mod.softmax_cross_entropy(x, labels)
    g *= 1e-3  # keep repeated in-place updates of x small and finite
    if case.op == "sgd_step":
        buf = put(np.zeros(shape, dtype))
        return lambda: mod.sgd_step(x, g, buf, 0.01, 0.9, 0.0, False)
    m, v = put(np.zeros(shape, dtype)), put(np.zeros(shape, dtype))
    step = [0]

    def adam() -> None:
        step[0] += 1
        mod.adam_step(x, g, m, v, step[0], 1e-3, 0.9, 0.999, 1e-8, 0.0, False)

    return adam


def output_arrays(out: Any) -> list[np.ndarray]:
    """A case's return value as host NumPy arrays, for checking peers agree: tuples
    are flattened and ``None`` dropped; CuPy and torch arrays are copied to NumPy."""
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    arrays = []
    for a in items:
        if a is None:
            continue
        if is_cupy(a):
            a = to_host(a)
        elif type(a).__module__.startswith("torch"):
            a = a.detach().cpu().numpy()
        arrays.append(np.asarray(a))
    return arrays
