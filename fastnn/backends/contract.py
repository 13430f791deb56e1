"""The backend contract, as code: :class:`Backend` and a conformance check.

Every backend module (``numpy_ref``, ``cpu``, ``cuda``) provides each method of
:class:`Backend` as a module-level function with the same parameter names, in
the same order, with the same defaults. ``tests/test_backend_contract.py``
checks that with :func:`conformance_errors`; ``cuda`` builds its ops from
:func:`signature` and :func:`doc`, so this file is the one home of each op's
shapes, layout and semantics.

Adding an op: one method with its docstring here, then the op in every backend
(a function in ``numpy_ref``, a ``py::arg``-named binding re-exported by
``cpu``, a row of ``cuda``'s table or a composed op).
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any, Callable, Protocol

Array = Any  # numpy.ndarray (numpy, cpu, cuda simulator) or cupy.ndarray (cuda)
Pair = tuple[int, int]


class Backend(Protocol):
    """The array-level ops of one backend.

    ``fastnn.functional`` validates and normalises the arguments first, so a
    backend may assume:

    * arrays are C-contiguous, of one float dtype (float32 or float64), 4-D NCHW
      for images and OIHW for conv weights;
    * ``stride``, ``padding``, ``dilation``, ``kernel_size``, ``input_hw``,
      ``kernel_hw`` and ``out_hw`` (and their ``pool_`` forms) are pairs of
      Python ints, padding is symmetric;
    * shapes are consistent (channels, groups, grad_out shape) and N may be 0.

    Each op returns a new C-contiguous array of the input's dtype (the in-place
    optimizer steps return None). A backend may check again and raise
    ValueError/TypeError naming the argument (``cpu`` does), but never converts.
    """

    def is_available(self) -> bool:
        """Whether this backend can run here (the extension is built, a GPU is usable)."""
        ...

    # -- convolution -----------------------------------------------------------
    def conv2d(
        self, x: Array, weight: Array, bias: Array | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
    ) -> Array:
        """x (N,C,H,W), weight (O,C//groups,KH,KW), bias (O,) or None -> y (N,O,OH,OW).

        OH = (H + 2*padding[0] - dilation[0]*(KH-1) - 1) // stride[0] + 1 (same for OW),
        cross-correlation as in torch.nn.functional.conv2d.
        """
        ...

    def conv2d_backward_input(
        self, grad_out: Array, weight: Array, input_hw: Pair,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
    ) -> Array:
        """grad_out (N,O,OH,OW), weight (O,C//groups,KH,KW) -> grad_x (N,C,H,W).

        (H,W) = input_hw; the transpose of conv2d with respect to x.
        """
        ...

    def conv2d_backward_weight(
        self, grad_out: Array, x: Array, kernel_hw: Pair,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
    ) -> Array:
        """grad_out (N,O,OH,OW), x (N,C,H,W) -> grad_w (O,C//groups,KH,KW).

        (KH,KW) = kernel_hw; summed over the batch.
        """
        ...

    # -- matmul ----------------------------------------------------------------
    def matmul(
        self, a: Array, b: Array, transpose_a: bool = False, transpose_b: bool = False
    ) -> Array:
        """op(a) @ op(b): 2-D (M,K)@(K,N) -> (M,N) or batched 3-D (B,M,K)@(B,K,N) -> (B,M,N).

        With transpose_a, ``a`` is stored (K,M) (or (B,K,M)); with transpose_b,
        ``b`` is stored (N,K) (or (B,N,K)). Both operands have the same ndim.
        K = 0 gives zeros.
        """
        ...

    # -- pooling ---------------------------------------------------------------
    def max_pool2d(
        self, x: Array, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
        out_hw: Pair,
    ) -> Array:
        """x (N,C,H,W) -> y (N,C,OH,OW), (OH,OW) = out_hw.

        out_hw already applies ceil_mode; windows are clipped to the input,
        padded cells never win. NaN propagates.
        """
        ...

    def max_pool2d_backward(
        self, grad_out: Array, x: Array, kernel_size: Pair, stride: Pair, padding: Pair,
        dilation: Pair,
    ) -> Array:
        """grad_out (N,C,OH,OW), x (N,C,H,W) -> grad_x (N,C,H,W).

        Recomputes each window's winner (as max_pool2d_with_indices) and routes
        its gradient there.
        """
        ...

    def max_pool2d_with_indices(
        self, x: Array, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
        out_hw: Pair,
    ) -> tuple[Array, Array]:
        """x (N,C,H,W) -> (y, indices), both (N,C,OH,OW); y as max_pool2d.

        indices are int64 flat h*W+w indices into each input plane of the
        window's winner: scanning in row-major window order, a real cell wins
        when it is greater than the running max or is NaN (the first maximum, or
        the last NaN: torch's rule). A window with no real cell gives -inf and
        the index of its first tap at or after the plane's top-left corner
        (torch's).
        """
        ...

    def avg_pool2d(
        self, x: Array, kernel_size: Pair, stride: Pair, padding: Pair, out_hw: Pair,
        count_include_pad: bool, divisor_override: int | None,
    ) -> Array:
        """x (N,C,H,W) -> y (N,C,OH,OW), (OH,OW) = out_hw, with torch's divisor rules.

        divisor_override is an int or None. With count_include_pad the divisor
        counts padded cells but not cells past the padded input (torch's
        ceil_mode rule).
        """
        ...

    def avg_pool2d_backward(
        self, grad_out: Array, input_hw: Pair, kernel_size: Pair, stride: Pair, padding: Pair,
        count_include_pad: bool, divisor_override: int | None,
    ) -> Array:
        """grad_out (N,C,OH,OW) -> grad_x (N,C,H,W), (H,W) = input_hw; divisors as avg_pool2d."""
        ...

    # -- fused conv2d + ReLU + max_pool2d --------------------------------------
    def conv2d_relu_max_pool2d(
        self, x: Array, weight: Array, bias: Array | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        pool_out_hw: Pair, return_argmax: bool = False,
    ) -> Array | tuple[Array, Array]:
        """max_pool2d(relu(conv2d(x, weight, bias, ...)), pool_...) -> (N,O,POH,POW).

        Bit-identical to the three ops. ``cpu`` fuses them without materialising
        the (N,O,OH,OW) conv output; ``numpy`` and ``cuda`` compose the
        separate ops (``fastnn.backends._composed``). With ``return_argmax``,
        returns ``(y, argmax)``: uint8 (N,O,POH,POW), each pooled output's
        winning window tap ``kh * KW + kw`` (the first maximum), or 255 where
        no gradient passes (the maximum is <= 0, or NaN).
        """
        ...

    def conv2d_relu_max_pool2d_backward(
        self, grad_out: Array, x: Array, weight: Array, bias: Array | None,
        stride: Pair, padding: Pair, dilation: Pair, groups: int,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        need_x: bool, need_w: bool, need_b: bool, argmax: Array | None = None,
    ) -> tuple[Array | None, Array | None, Array | None]:
        """(grad_x, grad_w, grad_b) of conv2d_relu_max_pool2d from grad_out (N,O,POH,POW).

        Each is None unless its ``need_`` flag is set. ``argmax``: the forward's
        codes (``return_argmax``); ``cpu`` routes the gradient by them instead
        of recomputing the conv (``bias`` is then unused). Without them, or on
        ``numpy`` and ``cuda``, the relu'd conv output is recomputed (``cpu``:
        image by image) rather than kept.
        """
        ...

    # -- fused linear + ReLU ---------------------------------------------------
    def linear_relu(self, x: Array, weight: Array, bias: Array | None) -> Array:
        """relu(x @ weight.T + bias): x (M,K), weight (N,K), bias (N,) or None -> (M,N).

        Equal to the separate ops (matmul, bias add, relu) within float rounding;
        ``cpu`` adds the bias and applies the ReLU in the gemm's epilogue
        (bit-identical to its separate ops); ``numpy`` and ``cuda`` compose them
        (``fastnn.backends._composed``).
        """
        ...

    def linear_relu_backward(
        self, grad_out: Array, x: Array, weight: Array, y: Array,
        need_x: bool = True, need_w: bool = True, need_b: bool = True,
    ) -> tuple[Array | None, Array | None, Array | None]:
        """(grad_x (M,K), grad_w (N,K), grad_b (N,)) of linear_relu from grad_out (M,N).

        ``y`` is linear_relu's output; the ReLU mask is ``y > 0``. Each result
        is None unless its ``need_`` flag is set.
        """
        ...

    # -- activations, loss -----------------------------------------------------
    def relu(self, x: Array) -> Array:
        """max(x, 0) elementwise, any shape; NaN stays NaN."""
        ...

    def relu_backward(self, grad_out: Array, y: Array) -> Array:
        """grad_out where the relu output y > 0, else 0 (same shape as y)."""
        ...

    def softmax_cross_entropy(self, logits: Array, labels: Array) -> tuple[Array, Array]:
        """logits (N,K), labels int64 (N,) -> (loss, grad_logits (N,K)).

        loss is the batch mean as a 0-d array on the same device (no host
        sync); grad_logits = (softmax - onehot) / N. An empty batch gives a NaN
        loss. A backend that would need a host sync to range-check the labels
        (``cuda``) does not: an out-of-range label makes the loss and its row
        of the gradient NaN; the others raise ValueError.
        """
        ...

    # -- activations, losses, dropout ------------------------------------------
    def sigmoid(self, x: Array) -> Array:
        """1 / (1 + exp(-x)) elementwise, any shape, without overflow for large |x|."""
        ...

    def sigmoid_backward(self, grad_out: Array, y: Array) -> Array:
        """grad_out * y * (1 - y), with y the forward output."""
        ...

    def tanh(self, x: Array) -> Array:
        """tanh(x) elementwise, any shape."""
        ...

    def tanh_backward(self, grad_out: Array, y: Array) -> Array:
        """grad_out * (1 - y**2), with y the forward output."""
        ...

    def log_softmax(self, x: Array, dim: int) -> Array:
        """log(softmax(x)) along ``dim`` (a non-negative int < x.ndim; x not empty),
        shifted by the maximum so that large values do not overflow."""
        ...

    def log_softmax_backward(self, grad_out: Array, y: Array, dim: int) -> Array:
        """grad_out - exp(y) * sum(grad_out, dim), with y the forward output."""
        ...

    def mse_loss(self, input: Array, target: Array) -> Array:  # noqa: A002 - torch's name
        """mean((input - target)**2) over all elements, as a 0-d array (same shapes)."""
        ...

    def mse_loss_backward(self, grad_out: Array, input: Array, target: Array) -> Array:  # noqa: A002
        """2 * (input - target) * grad_out / input.size, grad_out 0-d; the gradient
        of target is its negation."""
        ...

    def dropout_masked(self, x: Array, mask: Array) -> Array:
        """x * mask, where mask is dropout's scaled keep mask (0 or 1/(1-p), x's shape
        and dtype) drawn by ``fastnn.functional.dropout_mask``; the backward is the
        same product with grad_out."""
        ...

    # -- normalisation ---------------------------------------------------------
    def batch_norm2d(
        self, x: Array, weight: Array | None, bias: Array | None, mean: Array | None,
        var: Array | None, eps: float, training: bool,
    ) -> tuple[Array, Array, Array]:
        """x (N,C,H,W); weight, bias (C,) or None -> (y, mean, var), stats (C,).

        y = (x - mean) / sqrt(var + eps) * weight + bias per channel. training:
        mean/var are ignored (None) and the batch mean and biased variance over
        (N,H,W) (N*H*W >= 2) are computed (summed in float64), used and
        returned; else mean/var (C,) in x's dtype are used and returned.
        """
        ...

    def batch_norm2d_backward(
        self, grad_out: Array, x: Array, weight: Array | None, mean: Array, var: Array,
        eps: float, training: bool, need_x: bool, need_w: bool, need_b: bool,
    ) -> tuple[Array | None, Array | None, Array | None]:
        """(grad_x, grad_weight, grad_bias) of batch_norm2d, None where not needed.

        mean/var as the forward returned them; with training, grad_x includes the
        paths through the batch statistics.
        """
        ...

    def batch_norm2d_relu(
        self, x: Array, weight: Array | None, bias: Array | None, mean: Array | None,
        var: Array | None, eps: float, training: bool,
    ) -> tuple[Array, Array, Array]:
        """batch_norm2d followed by relu -> (relu(y), mean, var): the same arguments
        and statistics as batch_norm2d, and relu(y) equal to relu(batch_norm2d(...)[0])
        bit for bit."""
        ...

    def batch_norm2d_relu_backward(
        self, grad_out: Array, x: Array, weight: Array | None, bias: Array | None,
        mean: Array, var: Array, eps: float, training: bool, need_x: bool, need_w: bool,
        need_b: bool,
    ) -> tuple[Array | None, Array | None, Array | None]:
        """(grad_x, grad_weight, grad_bias) of batch_norm2d_relu, None where not needed:
        batch_norm2d_backward of relu_backward(grad_out, y), where y is the forward's
        output (recomputed from x, weight, bias, mean and var as the forward did).
        """
        ...

    def batch_norm2d_relu_max_pool2d(
        self, x: Array, weight: Array | None, bias: Array | None, mean: Array | None,
        var: Array | None, eps: float, training: bool,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        pool_out_hw: Pair, return_argmax: bool = False,
    ) -> tuple[Array, ...]:
        """max_pool2d(batch_norm2d_relu(x, ...)[0], pool_...) -> (y, mean, var), y
        (N,C,POH,POW), the statistics as batch_norm2d_relu returns them.

        Bit-identical to the two ops. ``cpu`` normalises and pools each plane in
        cache without writing the (N,C,H,W) BatchNorm output; ``numpy`` and
        ``cuda`` compose the separate ops (``fastnn.backends._composed``). With
        ``return_argmax``, returns ``(y, mean, var, argmax)``, argmax uint8 window
        codes as :meth:`conv2d_relu_max_pool2d`'s.
        """
        ...

    def batch_norm2d_relu_max_pool2d_backward(
        self, grad_out: Array, x: Array, weight: Array | None, bias: Array | None,
        mean: Array, var: Array, eps: float, training: bool,
        pool_kernel_size: Pair, pool_stride: Pair, pool_padding: Pair, pool_dilation: Pair,
        need_x: bool, need_w: bool, need_b: bool, argmax: Array | None = None,
    ) -> tuple[Array | None, Array | None, Array | None]:
        """(grad_x, grad_weight, grad_bias) of batch_norm2d_relu_max_pool2d from grad_out
        (N,C,POH,POW), None where not needed: batch_norm2d_relu_backward of
        max_pool2d_backward(grad_out). ``argmax``: the forward's codes; ``cpu``
        routes the gradient by them; without them, and on ``numpy`` and ``cuda``,
        the BatchNorm output is recomputed from x, weight, bias and the
        statistics (``cpu``: plane by plane, in cache) for the pool's backward.
        """
        ...

    # -- optimizer steps (in place) --------------------------------------------
    def sgd_step(
        self, param: Array, grad: Array, momentum_buf: Array | None,
        lr: float, momentum: float, weight_decay: float, nesterov: bool,
    ) -> None:
        """In place, torch.optim.SGD semantics with dampening 0.

        g = grad + wd*param; buf = momentum*buf + g (buf starts at zeros, which
        matches torch's first step); g = g + momentum*buf if nesterov else buf;
        param -= lr*g. momentum_buf may be None when momentum == 0. All arrays
        have param's shape.
        """
        ...

    def adam_step(
        self, param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array,
        step: int, lr: float, beta1: float, beta2: float, eps: float,
        weight_decay: float, decoupled: bool,
    ) -> None:
        """In place, torch.optim.Adam (decoupled=False, L2) / AdamW (decoupled=True).

        step is 1-based (bias correction uses it); all arrays have param's shape.
        """
        ...

    def sgd_step_multi(
        self, params: list[Array], grads: list[Array], momentum_bufs: list[Array] | None,
        lr: float, momentum: float, weight_decay: float, nesterov: bool,
    ) -> None:
        """sgd_step on each (params[i], grads[i], momentum_bufs[i]), in order: one
        optimizer parameter group in one call. Lists (or tuples) of equal length;
        momentum_bufs may be None when momentum == 0. Unlike the single-tensor
        ops, the backend checks every entry's arrays (as sgd_step's arguments,
        named ``params[i]``, ``grads[i]``, ...) before it updates any.
        """
        ...

    def adam_step_multi(
        self, params: list[Array], grads: list[Array], exp_avgs: list[Array],
        exp_avg_sqs: list[Array], steps: list[int], lr: float, beta1: float, beta2: float,
        eps: float, weight_decay: float, decoupled: bool,
    ) -> None:
        """adam_step on each (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]) at
        its own 1-based steps[i], in order: one optimizer parameter group in one
        call. Lists (or tuples) of equal length. Unlike the single-tensor ops,
        the backend checks every entry's arrays (as adam_step's arguments, named
        ``params[i]``, ``grads[i]``, ...) before it updates any.
        """
        ...

    # -- data --------------------------------------------------------------------
    def lookup_u8(self, images: Array, rows: Array | None, table: Array) -> Array:
        """images (n, ...) uint8, rows (B,) int64 in [0, n) or None (B = n, the rows in
        order), table (256,) float32/float64 -> out (B, ...) of table's dtype with
        out[b] = table[images[rows[b]]]: a data loader's shuffled gather and pixel
        normalisation in one pass. The one op whose input is not float."""
        ...


# --------------------------------------------------------------------------
# Introspection: what the contract asks for, and whether a module provides it
# --------------------------------------------------------------------------


@functools.cache
def ops() -> tuple[str, ...]:
    """The names of the contract's ops (``is_available`` included), in definition order."""
    return tuple(
        name for name, value in vars(Backend).items()
        if inspect.isfunction(value) and not name.startswith("_")
    )


@functools.cache
def signature(name: str) -> inspect.Signature:
    """Op ``name``'s signature as a module function provides it (no ``self``)."""
    sig = inspect.signature(getattr(Backend, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def doc(name: str) -> str:
    """Op ``name``'s docstring: its shapes, layout and semantics."""
    return inspect.getdoc(getattr(Backend, name)) or ""


def _param_token(p: inspect.Parameter) -> str:
    """``name`` or ``name=default``; other parameter kinds are marked, so they never match."""
    if p.kind is p.VAR_POSITIONAL:
        return f"*{p.name}"
    if p.kind is p.VAR_KEYWORD:
        return f"**{p.name}"
    token = p.name if p.default is p.empty else f"{p.name}={p.default!r}"
    if p.kind is p.KEYWORD_ONLY:
        return f"(keyword-only) {token}"
    if p.kind is p.POSITIONAL_ONLY:
        return f"(positional-only) {token}"
    return token


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:])
    return [p.strip() for p in parts]


def _pybind_tokens(fn: Callable[..., Any]) -> list[str] | None:
    """Parameter tokens from a pybind11 docstring ``name(a: T, b: U = False) -> R``.

    pybind11 functions have no ``inspect.signature``; their first docstring line
    spells the ``py::arg`` names and defaults (as ``repr``). None if it does not.
    """
    first = (getattr(fn, "__doc__", None) or "").lstrip().split("\n", 1)[0]
    name = getattr(fn, "__name__", "")
    if not first.startswith(f"{name}(") or ") -> " not in first:
        return None
    args = first[len(name) + 1: first.rindex(") -> ")]
    tokens = []
    for part in _split_top_level(args):
        head, eq, default = part.partition(" = ")
        pname = head.split(":", 1)[0].strip()
        tokens.append(f"{pname}={default.strip()}" if eq else pname)
    return tokens


def parameter_tokens(fn: Callable[..., Any]) -> list[str] | None:
    """``fn``'s parameters as ``name`` / ``name=default`` tokens, None if unknowable."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a text signature (pybind11)
        return _pybind_tokens(fn)
    return [_param_token(p) for p in sig.parameters.values()]


def op_error(name: str, fn: Any, label: str) -> str | None:
    """Why ``fn`` cannot serve as op ``name`` (parameter names, order, defaults), or None."""
    if not callable(fn):
        return f"{label}: {name} is not callable"
    want = [_param_token(p) for p in signature(name).parameters.values()]
    got = parameter_tokens(fn)
    if got is None:
        return f"{label}: {name}: cannot read its signature"
    if got != want:
        return (f"{label}: {name}({', '.join(got)}) does not match the contract "
                f"{name}({', '.join(want)})")
    return None


def conformance_errors(module: ModuleType | Any, label: str | None = None) -> list[str]:
    """What ``module`` lacks or gets wrong against :class:`Backend`; empty if it conforms.

    Every op must be a callable attribute with the contract's parameter names,
    in order, and the same defaults (pybind11 functions are read from their
    docstrings). One message per op that does not.
    """
    label = label or getattr(module, "__name__", repr(module))
    errors = []
    for name in ops():
        fn = getattr(module, name, None)
        error = f"{label}: missing op {name}" if fn is None else op_error(name, fn, label)
        if error is not None:
            errors.append(error)
    return errors
