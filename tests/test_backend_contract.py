"""Every backend provides every op of fastnn.backends.contract.Backend, with its signature.

numpy_ref always; cpu when ``fastnn._C`` is built (its ops are the pybind11
functions, whose parameter names come from their docstrings); cuda always, since
importing it needs neither Numba nor CuPy. Its kernel launchers (which import
Numba) are checked in a child running Numba's CUDA simulator, when Numba is
installed. The negative tests show that a missing op, swapped or renamed
arguments, a lost default or a ``*args`` wrapper are all reported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from conftest import NATIVE, PKG_ROOT

from fastnn.backends import contract, get_backend

BACKENDS = ["numpy", "cuda"] + (["cpu"] if NATIVE else [])
needs_native = pytest.mark.skipif(not NATIVE, reason="fastnn._C is not built")


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    child_env = dict(os.environ, PYTHONPATH=str(PKG_ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=PKG_ROOT,
                          env=child_env, capture_output=True, text=True, timeout=300)


def _as_namespace(module: types.ModuleType, **override: object) -> types.SimpleNamespace:
    """The contract's ops of ``module`` as a fake backend, with some replaced (None: removed)."""
    ops = {name: getattr(module, name) for name in contract.ops()}
    ops.update(override)
    return types.SimpleNamespace(**{k: v for k, v in ops.items() if v is not None})


# --------------------------------------------------------------------------- #
# The contract itself
# --------------------------------------------------------------------------- #


def test_every_op_is_documented_and_takes_no_self_in_its_signature() -> None:
    assert contract.ops()[0] == "is_available"
    for name in contract.ops():
        assert len(contract.doc(name)) > 20, f"{name} has no docstring in the contract"
        assert "self" not in contract.signature(name).parameters


# --------------------------------------------------------------------------- #
# The backends
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_conforms(name: str) -> None:
    assert contract.conformance_errors(get_backend(name)) == []


@needs_native
def test_pybind11_parameters_are_read_from_the_docstring() -> None:
    from fastnn import _C

    assert contract.parameter_tokens(_C.matmul) == [
        "a", "b", "transpose_a=False", "transpose_b=False"]
    assert contract.parameter_tokens(_C.relu_backward) == ["grad_out", "y"]
    # Pairs are spelled with nested brackets and commas in pybind11's docstrings.
    assert contract.parameter_tokens(_C.max_pool2d) == [
        "x", "kernel_size", "stride", "padding", "dilation", "out_hw"]


def test_cuda_ops_carry_the_contract_docstrings() -> None:
    cuda = get_backend("cuda")
    for name in contract.ops()[1:]:
        assert getattr(cuda, name).__doc__ == contract.doc(name), name
    assert set(contract.ops()) <= set(cuda.__all__)


def test_importing_cuda_imports_neither_numba_nor_cupy() -> None:
    proc = _child("""
        import sys
        import fastnn.backends.cuda
        loaded = sorted({"numba", "cupy"} & set(sys.modules))
        assert not loaded, loaded
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# find_spec, not an import: Numba must not be imported here before the simulator is set.
@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_cuda_launchers_conform_under_the_simulator() -> None:
    """Every row of cuda's op table names a launcher taking the contract's arguments,
    and the generated ops accept keywords and defaults."""
    proc = _child("""
        import importlib
        import numpy as np
        from fastnn.backends import contract, cuda

        errors = []
        for name, (module, _) in cuda._OPS.items():
            launcher = getattr(importlib.import_module(cuda.launcher_module(module)), name)
            errors.append(contract.op_error(name, launcher, module))
        errors = [e for e in errors if e]
        assert not errors, errors

        rng = np.random.default_rng(0)
        a = rng.standard_normal((3, 5)).astype(np.float32)
        b = rng.standard_normal((4, 5)).astype(np.float32)
        got = cuda.matmul(a, b=b, transpose_b=True)
        np.testing.assert_allclose(got, a @ b.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cuda.relu(x=a), np.maximum(a, 0))
        try:
            cuda.relu(a.tolist())
        except TypeError as exc:
            assert "x:" in str(exc), exc
        else:
            raise AssertionError("a list reached the kernel")
        print("ok")
    """, NUMBA_ENABLE_CUDASIM="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --------------------------------------------------------------------------- #
# The check can fail
# --------------------------------------------------------------------------- #


def _one_error(fake: object) -> str:
    errors = contract.conformance_errors(fake, "fake")
    assert len(errors) == 1, errors
    return errors[0]


def test_missing_op_is_reported() -> None:
    ref = get_backend("numpy")
    assert _one_error(_as_namespace(ref, relu=None)) == "fake: missing op relu"


def test_swapped_argument_names_are_reported() -> None:
    def relu_backward(y, grad_out):  # the wrong order, on purpose
        raise AssertionError("never called")

    error = _one_error(_as_namespace(get_backend("numpy"), relu_backward=relu_backward))
    assert "relu_backward(y, grad_out) does not match" in error
    assert "relu_backward(grad_out, y)" in error


def test_renamed_argument_lost_default_and_varargs_are_reported() -> None:
    def conv2d(x, w, bias, stride, padding, dilation, groups):
        raise AssertionError("never called")

    def matmul(a, b, transpose_a, transpose_b):
        raise AssertionError("never called")

    def relu(*args):
        raise AssertionError("never called")

    fake = _as_namespace(get_backend("numpy"), conv2d=conv2d, matmul=matmul, relu=relu,
                         sgd_step=np.float32(0.1))
    errors = contract.conformance_errors(fake, "fake")
    assert len(errors) == 4, errors
    assert any("conv2d(x, w, bias" in e for e in errors), errors
    assert any("matmul(a, b, transpose_a, transpose_b) does not match" in e for e in errors)
    assert any("relu(*args)" in e for e in errors), errors
    assert "fake: sgd_step is not callable" in errors


@needs_native
def test_native_function_with_other_arguments_is_reported() -> None:
    from fastnn import _C

    cpu = get_backend("cpu")
    error = _one_error(_as_namespace(cpu, relu_backward=_C.relu))
    assert "relu_backward(x) does not match" in error
    error = _one_error(_as_namespace(cpu, conv2d=_C.conv2d_backward_input))
    assert "conv2d(grad_out, weight, input_hw" in error
