#!/usr/bin/env python3
"""Benchmark fastnn's cuda backend against cuBLAS (CuPy) and torch/cuDNN on one GPU.

Reports, for float32 unless noted:

* matmul 4096^2 (NN, NT, TN; float64 NN) as TFLOP/s and % of ``cupy.matmul``
  (cuBLAS), plus torch.matmul;
* every op of an MNIST training step at batch 128, forward and backward, for
  the ``seed`` model (conv 1->32 3x3, relu, maxpool 2, fc 5408->128->10) and
  the ``strong`` model's 32/64-channel convs, vs torch (cuDNN);
* a whole training step of the seed model (forward, backward, SGD) vs torch;
* first-call JIT latency: a fresh process with an empty Numba cache
  (compile), then a second process with that cache (load);
* GEMM kernel resources: registers and local memory per thread (spills) and
  the vector (.v4 / .v2) global and shared loads in the PTX;
* launch overhead (``bench_launch.py``): microseconds per launch of an empty
  Numba kernel with 1 and 4 CuPy arguments, and of ``F.relu`` on a small array.

Timing uses CUDA events around a loop of calls on the current stream, so it
includes the host's launch overhead whenever the GPU outruns it. TF32 is off
everywhere: ``CUPY_TF32=0`` (set here before CuPy is imported) and torch's
``allow_tf32`` flags. Results print to stdout and, with ``--out DIR`` (default
``$OUT``), go to ``DIR/bench_gpu.json`` and ``DIR/bench_gpu.txt``, both
rewritten after every section (a run cut short keeps what it measured;
``"complete": false`` until the end).

Usage (from anywhere; fastnn must be importable): ``python benchmarks/bench_gpu.py``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from functools import partial
from typing import Any, Callable

os.environ["CUPY_TF32"] = "0"  # before cupy is imported: no TF32 in cuBLAS

import numpy as np  # noqa: E402

LINES: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


def time_ms(fn: Callable[[], Any], events: tuple[Callable, Callable], min_ms: float = 150.0,
            max_iters: int = 500) -> float:
    """Mean milliseconds per call of ``fn`` between two recorded events."""
    make_event, sync = events
    for _ in range(2):
        fn()
    sync()
    start, end = make_event(), make_event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(_elapsed(start, end), 1e-3)
    iters = int(max(3, min(max_iters, min_ms / one)))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return _elapsed(start, end) / iters


def _elapsed(start: Any, end: Any) -> float:
    if type(start).__module__.startswith("torch"):
        return start.elapsed_time(end)
    import cupy

    return cupy.cuda.get_elapsed_time(start, end)


class Bench:
    def __init__(self, torch_mod: Any) -> None:
        import cupy

        self.cp = cupy
        self.torch = torch_mod
        self.results: list[dict] = []
        self.cp_events = (cupy.cuda.Event, cupy.cuda.get_current_stream().synchronize)
        if torch_mod is not None:
            self.t_events = (lambda: torch_mod.cuda.Event(enable_timing=True),
                             torch_mod.cuda.synchronize)

    def run(self, op: str, shape: str, fastnn_fn: Callable, peer: str | None = None,
            peer_fn: Callable | None = None, flops: float = 0.0, dtype: str = "float32") -> dict:
        row: dict = {"op": op, "shape": shape, "dtype": dtype}
        try:
            row["fastnn_ms"] = time_ms(fastnn_fn, self.cp_events)
        except Exception as exc:  # noqa: BLE001 - report and keep going
            row["fastnn_error"] = f"{type(exc).__name__}: {exc}"
        if peer_fn is not None:
            try:
                events = self.cp_events if peer == "cublas" else self.t_events
                row[f"{peer}_ms"] = time_ms(peer_fn, events)
            except Exception as exc:  # noqa: BLE001
                row[f"{peer}_error"] = f"{type(exc).__name__}: {exc}"
        if flops and "fastnn_ms" in row:
            row["fastnn_tflops"] = flops / row["fastnn_ms"] / 1e9
            if f"{peer}_ms" in row:
                row[f"{peer}_tflops"] = flops / row[f"{peer}_ms"] / 1e9
        if peer and "fastnn_ms" in row and f"{peer}_ms" in row:
            row["pct_of_peer"] = 100.0 * row[f"{peer}_ms"] / row["fastnn_ms"]
            row["peer"] = peer
        self.results.append(row)
        self._print(row)
        return row

    @staticmethod
    def _print(row: dict) -> None:
        def ms(key: str) -> str:
            if key in row:
                return f"{row[key]:9.3f}"
            return "    error" if key.replace("_ms", "_error") in row else "        -"

        peer = row.get("peer", "")
        extra = ""
        if "fastnn_tflops" in row:
            extra += f"  {row['fastnn_tflops']:6.2f} TFLOP/s"
        if "pct_of_peer" in row:
            extra += f"  {row['pct_of_peer']:6.1f}% of {peer}"
        err = row.get("fastnn_error") or row.get(f"{peer}_error")
        if err:
            extra += f"  [{err[:120]}]"
        log(f"{row['op']:<24} {row['shape']:<30} {row['dtype']:<8} fastnn {ms('fastnn_ms')} ms"
            f"  {peer or 'peer':>6} {ms(f'{peer}_ms') if peer else '        -'} ms{extra}")


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #


def bench_matmul(b: Bench, rng: np.random.Generator, n: int) -> None:
    from fastnn.backends import cuda as cb

    cp, torch = b.cp, b.torch
    log(f"\n## matmul {n}x{n}x{n} vs cuBLAS (cupy.matmul, TF32 off) and torch")
    for dtype, variants in ((np.float32, ("NN", "NT", "TN")), (np.float64, ("NN",))):
        a = cp.asarray(rng.standard_normal((n, n)).astype(dtype))
        c = cp.asarray(rng.standard_normal((n, n)).astype(dtype))
        flops = 2.0 * n**3
        for v in variants:
            ta, tb = v[0] == "T", v[1] == "T"
            opa = a.T if ta else a
            opc = c.T if tb else c
            b.run(f"matmul_{v}", f"{n}^3", partial(cb.matmul, a, c, ta, tb), "cublas",
                  partial(cp.matmul, opa, opc), flops, np.dtype(dtype).name)
        if torch is not None:
            ta_, tc_ = torch.as_tensor(a, device="cuda"), torch.as_tensor(c, device="cuda")
            b.run("matmul_NN", f"{n}^3", partial(cb.matmul, a, c), "torch",
                  partial(torch.matmul, ta_, tc_), flops, np.dtype(dtype).name)


def _conv_flops(n, c, o, k, oh, ow):
    return 2.0 * n * o * oh * ow * c * k * k


def bench_mnist_layers(b: Bench, rng: np.random.Generator, batch: int) -> None:
    from fastnn.backends import cuda as cb

    cp, torch = b.cp, b.torch
    have_torch = torch is not None
    F = torch.nn.functional if have_torch else None

    def t(a):
        return torch.as_tensor(a, device="cuda") if have_torch else None

    def dev(*shape, scale=1.0):
        return cp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    log(f"\n## MNIST layers at batch {batch}, float32, fastnn vs torch (cuDNN, TF32 off)")
    geo = ((1, 1), (0, 0), (1, 1), 1)
    convs = [("seed.conv1", 1, 32, 28), ("strong.conv2", 32, 32, 26),
             ("strong.conv3", 32, 64, 12), ("strong.conv4", 64, 64, 10)]
    for name, c, o, hw in convs:
        x, w, bias = dev(batch, c, hw, hw), dev(o, c, 3, 3, scale=0.1), dev(o)
        oh = hw - 2
        gy = dev(batch, o, oh, oh)
        fl = _conv_flops(batch, c, o, 3, oh, oh)
        shape = f"N{batch} {c}->{o} 3x3 {hw}x{hw}"
        tx, tw, tb, tgy = t(x), t(w), t(bias), t(gy)

        def aten_bwd(mask, tx=tx, tw=tw, tgy=tgy):
            return torch.ops.aten.convolution_backward(
                tgy, tx, tw, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)

        b.run(f"{name}_fwd", shape, lambda x=x, w=w, bias=bias: cb.conv2d(x, w, bias, *geo),
              "torch", partial(F.conv2d, tx, tw, tb) if have_torch else None, fl)
        b.run(f"{name}_bwd_input", shape,
              lambda gy=gy, w=w, hw=hw: cb.conv2d_backward_input(gy, w, (hw, hw), *geo),
              "torch", (lambda: aten_bwd([True, False, False])) if have_torch else None, fl)
        b.run(f"{name}_bwd_weight", shape,
              lambda gy=gy, x=x: cb.conv2d_backward_weight(gy, x, (3, 3), *geo),
              "torch", (lambda: aten_bwd([False, True, False])) if have_torch else None, fl)

    a = cp.maximum(dev(batch, 32, 26, 26), 0)
    ga = dev(batch, 32, 26, 26)
    ta, tga = t(a), t(ga)
    shape = f"N{batch} 32x26x26"
    b.run("relu_fwd", shape, lambda: cb.relu(a), "torch",
          (lambda: torch.relu(ta)) if have_torch else None)
    b.run("relu_bwd", shape, lambda: cb.relu_backward(ga, a), "torch",
          (lambda: torch.ops.aten.threshold_backward(tga, ta, 0)) if have_torch else None)
    pool = ((2, 2), (2, 2), (0, 0), (1, 1))
    gh = dev(batch, 32, 13, 13)
    tgh = t(gh)
    if have_torch:
        _, idx = torch.ops.aten.max_pool2d_with_indices(ta, [2, 2], [2, 2])
    b.run("maxpool2_fwd", shape, lambda: cb.max_pool2d(a, *pool, (13, 13)), "torch",
          (lambda: F.max_pool2d(ta, 2)) if have_torch else None)
    b.run("maxpool2_bwd", shape, lambda: cb.max_pool2d_backward(gh, a, *pool), "torch",
          (lambda: torch.ops.aten.max_pool2d_with_indices_backward(
              tgh, ta, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)) if have_torch else None)

    for name, fin, fout in (("seed.fc1", 5408, 128), ("seed.fc2", 128, 10)):
        x, w, g = dev(batch, fin), dev(fout, fin, scale=0.05), dev(batch, fout)
        tx, tw, tg = t(x), t(w), t(g)
        fl = 2.0 * batch * fin * fout
        shape = f"N{batch} {fin}->{fout}"
        b.run(f"{name}_fwd", shape, lambda x=x, w=w: cb.matmul(x, w, False, True), "torch",
              partial(torch.matmul, tx, tw.t()) if have_torch else None, fl)
        b.run(f"{name}_bwd_input", shape, lambda g=g, w=w: cb.matmul(g, w), "torch",
              partial(torch.matmul, tg, tw) if have_torch else None, fl)
        b.run(f"{name}_bwd_weight", shape, lambda g=g, x=x: cb.matmul(g, x, True, False),
              "torch", partial(torch.matmul, tg.t(), tx) if have_torch else None, fl)

    logits, labels = dev(batch, 10, scale=3.0), cp.asarray(rng.integers(0, 10, batch))
    tl, tlab = t(logits), t(labels)

    def torch_ce():
        tl.requires_grad_(True)
        loss = F.cross_entropy(tl, tlab)
        return torch.autograd.grad(loss, tl)

    b.run("softmax_ce_fwd_bwd", f"N{batch} K10", lambda: cb.softmax_cross_entropy(logits, labels),
          "torch", torch_ce if have_torch else None)

    sizes = ((32, 1, 3, 3), (32,), (128, 5408), (128,), (10, 128), (10,))
    params = [dev(*s, scale=0.01) for s in sizes]
    grads = [dev(*s) for s in sizes]
    bufs = [cp.zeros_like(p) for p in params]
    sq = [cp.zeros_like(p) for p in params]
    nparam = sum(int(p.size) for p in params)

    def sgd():
        for p, g, m in zip(params, grads, bufs):
            cb.sgd_step(p, g, m, 0.01, 0.9, 0.0, False)

    def adam():
        for p, g, m, v in zip(params, grads, bufs, sq):
            cb.adam_step(p, g, m, v, 10, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)

    peer_sgd = peer_adam = None
    if have_torch:
        tparams = [torch.zeros(s, device="cuda", requires_grad=True) for s in sizes]
        for p in tparams:
            p.grad = torch.randn_like(p)
        opt_sgd = torch.optim.SGD(tparams, lr=0.01, momentum=0.9)
        opt_adam = torch.optim.Adam(tparams, lr=1e-3)
        peer_sgd, peer_adam = opt_sgd.step, opt_adam.step
    b.run("sgd_step", f"{len(sizes)} tensors {nparam} params", sgd, "torch", peer_sgd)
    b.run("adam_step", f"{len(sizes)} tensors {nparam} params", adam, "torch", peer_adam)


def bench_train_step(b: Bench, rng: np.random.Generator, batch: int) -> None:
    """The seed model's full training step on raw backend ops vs a torch module."""
    from fastnn.backends import cuda as cb

    cp, torch = b.cp, b.torch
    log(f"\n## seed-model training step at batch {batch} (fwd + bwd + SGD momentum)")
    x = cp.asarray(rng.random((batch, 1, 28, 28), dtype=np.float32))
    labels = cp.asarray(rng.integers(0, 10, batch))
    shapes = ((32, 1, 3, 3), (32,), (128, 5408), (128,), (10, 128), (10,))
    params = [cp.asarray((rng.standard_normal(s) * 0.05).astype(np.float32)) for s in shapes]
    bufs = [cp.zeros_like(p) for p in params]
    geo = ((1, 1), (0, 0), (1, 1), 1)
    pool = ((2, 2), (2, 2), (0, 0), (1, 1))

    def step():
        w1, b1, w2, b2, w3, b3 = params
        a1 = cb.relu(cb.conv2d(x, w1, b1, *geo))
        h1 = cb.max_pool2d(a1, *pool, (13, 13))
        f = h1.reshape(batch, -1)
        z2 = cb.matmul(f, w2, False, True)
        z2 += b2
        a2 = cb.relu(z2)
        z3 = cb.matmul(a2, w3, False, True)
        z3 += b3
        loss, g3 = cb.softmax_cross_entropy(z3, labels)
        gw3, gb3 = cb.matmul(g3, a2, True, False), g3.sum(axis=0)
        g2 = cb.relu_backward(cb.matmul(g3, w3), a2)
        gw2, gb2 = cb.matmul(g2, f, True, False), g2.sum(axis=0)
        gh = cb.matmul(g2, w2).reshape(h1.shape)
        ga = cb.relu_backward(cb.max_pool2d_backward(gh, a1, *pool), a1)
        gw1, gb1 = cb.conv2d_backward_weight(ga, x, (3, 3), *geo), ga.sum(axis=(0, 2, 3))
        for p, g, m in zip(params, (gw1, gb1, gw2, gb2, gw3, gb3), bufs):
            cb.sgd_step(p, g, m, 0.01, 0.9, 0.0, False)
        return loss

    peer = None
    if torch is not None:
        nn = torch.nn
        model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(5408, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        tx, tlab = torch.as_tensor(x, device="cuda"), torch.as_tensor(labels, device="cuda")

        def peer():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(tx), tlab)
            loss.backward()
            opt.step()
            return loss

    row = b.run("train_step_seed", f"N{batch}", step, "torch", peer)
    if "fastnn_ms" in row:
        log(f"   -> one 60k-image epoch of steps: fastnn {row['fastnn_ms'] * 469 / 1e3:.2f} s"
            + (f", torch {row['torch_ms'] * 469 / 1e3:.2f} s" if "torch_ms" in row else ""))


_JIT_PROBE = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import cupy as cp, numpy as np
    from fastnn.backends import cuda as cb
    cb.is_available()
    out = {"import_s": time.perf_counter() - t0}
    rng = np.random.default_rng(0)
    a = cp.asarray(rng.standard_normal((256, 256)).astype(np.float32))
    x = cp.asarray(rng.standard_normal((128, 1, 28, 28)).astype(np.float32))
    w = cp.asarray(rng.standard_normal((32, 1, 3, 3)).astype(np.float32))
    g = cp.asarray(rng.standard_normal((128, 32, 26, 26)).astype(np.float32))
    lab = cp.asarray(rng.integers(0, 10, 128))
    geo = ((1, 1), (0, 0), (1, 1), 1)
    ops = {
        "matmul_256": lambda: cb.matmul(a, a),
        "conv2d_direct": lambda: cb.conv2d(x, w, None, *geo),
        "conv2d_bwd_weight": lambda: cb.conv2d_backward_weight(g, x, (3, 3), *geo),
        "max_pool2d": lambda: cb.max_pool2d(g, (2, 2), (2, 2), (0, 0), (1, 1), (13, 13)),
        "relu": lambda: cb.relu(g),
        "softmax_ce": lambda: cb.softmax_cross_entropy(a[:128, :10].copy(), lab),
    }
    for name, fn in ops.items():
        t0 = time.perf_counter(); fn(); cp.cuda.Device().synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter(); fn(); cp.cuda.Device().synchronize()
        out[name] = {"first_s": first, "second_s": time.perf_counter() - t0}
    print("JSON" + json.dumps(out))
    """
)


def bench_jit(b: Bench) -> dict:
    log("\n## first-call latency (JIT): fresh Numba cache (compile) vs warm cache (load)")
    out: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for phase in ("cold_cache", "warm_cache"):
            try:
                proc = subprocess.run([sys.executable, "-c", _JIT_PROBE], env=env,
                                      capture_output=True, text=True, timeout=240)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")]
                if proc.returncode != 0 or not line:
                    raise RuntimeError(proc.stderr[-1500:])
                out[phase] = json.loads(line[-1][4:])
            except Exception as exc:  # noqa: BLE001
                out[phase] = {"error": str(exc)}
                log(f"{phase}: error {exc}")
    cold, warm = out.get("cold_cache", {}), out.get("warm_cache", {})
    log(f"{'op':<20} {'compile+1st call':>17} {'cached 1st call':>16} {'2nd call':>10}")
    for name, v in cold.items():
        if isinstance(v, dict) and "first_s" in v:
            w = warm.get(name, {})
            cached = w.get("first_s", float("nan")) * 1e3
            log(f"{name:<20} {v['first_s'] * 1e3:14.0f} ms {cached:13.0f} ms"
                f" {v['second_s'] * 1e3:7.2f} ms")
    if "import_s" in cold:
        log(f"(import fastnn.backends.cuda + runtime probe: {cold['import_s']:.2f} s)")
    return out


def kernel_resources() -> list[dict]:
    """Registers, local memory (spills) and vector loads of the GEMM kernels compiled so far."""
    import re

    from numba import float32

    from fastnn.backends._cuda import gemm as G

    log("\n## GEMM kernel resources (float32 variants compiled in this process)")
    rows = []
    for cfg_name in ("large", "medium", "small"):
        for flags in ((False, False, True, True, False), (False, True, False, False, False),
                      (True, False, True, True, False), (False, True, True, True, False),
                      (False, False, True, True, True), (True, True, True, True, False)):
            k = G._gemm_kernel(float32, G.CONFIGS[cfg_name], *flags)
            if not getattr(k, "overloads", None):
                continue
            row: dict = {"config": cfg_name, "ta_tb_wa_wb_bias": flags}
            try:
                # Without a signature these return {signature: value} for every overload.
                row["regs"] = list(k.get_regs_per_thread().values())
                row["local_bytes"] = list(k.get_local_mem_per_thread().values())
                asm = "\n".join(k.inspect_asm().values())
                for key, pat in (("ld_global_v4", r"ld\.global(\.nc)?\.v4"),
                                 ("ld_global_v2", r"ld\.global(\.nc)?\.v2"),
                                 ("ld_global_f32", r"ld\.global(\.nc)?\.f32"),
                                 ("ld_shared_v4", r"ld\.shared\.v4"),
                                 ("ld_local", r"ld\.local"), ("fma_f32", r"fma\.rn\.f32")):
                    row[key] = len(re.findall(pat, asm))
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            log(f"{cfg_name:<7} {row}")
    if not rows:
        log("(none compiled)")
    return rows


def bench_launch_overhead(doc: dict) -> None:
    from bench_launch import format_rows, launch_overhead

    log("\n## launch overhead (us per launch, host side; see bench_launch.py)")
    doc["launch"] = launch_overhead()
    for row in format_rows(doc["launch"]):
        log(row)
    errors = [k for k, v in doc["launch"].items() if "error" in v]
    if errors:
        raise RuntimeError(f"launch cases failed: {errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for results")
    parser.add_argument("--size", type=int, default=4096, help="square matmul size")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-jit", action="store_true", help="skip the JIT latency probe")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    doc: dict = {"complete": False, "sections": {}, "results": []}

    def save() -> None:
        """(Re)write the JSON and text reports: called after every section."""
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_gpu.json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        with open(os.path.join(args.out, "bench_gpu.txt"), "w") as f:
            f.write("\n".join(LINES) + "\n")

    try:
        import cupy
    except ImportError as exc:
        log(f"bench_gpu needs CuPy: {exc}")
        doc["error"] = f"CuPy unavailable: {exc}"
        save()
        return 1

    import fastnn
    from fastnn.backends import cuda as cb

    if not cb.is_available():
        log(f"cuda backend unavailable: {cb.device_info()}")
        doc["error"] = f"cuda backend unavailable: {cb.device_info()}"
        save()
        return 1
    torch = None
    if not args.no_torch:
        try:
            import torch as torch_mod

            if torch_mod.cuda.is_available():
                torch = torch_mod
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cudnn.benchmark = True
        except ImportError:
            pass
    info = cb.device_info()
    doc["device"] = info
    log("# fastnn GPU benchmark")
    log(f"fastnn {fastnn.__version__}; " + "; ".join(f"{k}={v}" for k, v in info.items()))
    log(f"CUPY_TF32={os.environ.get('CUPY_TF32')}; cupy {cupy.__version__}; torch "
        + (f"{torch.__version__} (cuDNN {torch.backends.cudnn.version()}, TF32 off)"
           if torch is not None else "absent (no torch column)"))

    b = Bench(torch)
    doc["results"] = b.results  # (the same list: rows appear as they are measured)
    rng = np.random.default_rng(0)

    def resources() -> None:
        doc["kernel_resources"] = kernel_resources()

    def jit() -> None:
        doc["jit"] = bench_jit(b)

    sections = [("launch", lambda: bench_launch_overhead(doc)),
                ("matmul", lambda: bench_matmul(b, rng, args.size)),
                ("mnist_layers", lambda: bench_mnist_layers(b, rng, args.batch)),
                ("train_step", lambda: bench_train_step(b, rng, args.batch)),
                ("kernel_resources", resources)]
    if not args.no_jit:
        sections.append(("jit", jit))
    failed = []
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            fn()
            doc["sections"][name] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the rest
            failed.append(name)
            log(f"section {name} failed: {type(exc).__name__}: {exc}")
            doc["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        doc["sections"][name]["seconds"] = time.perf_counter() - t0
        save()

    head = [r for r in b.results if r["op"] == "matmul_NN" and r.get("peer") == "cublas"
            and r["dtype"] == "float32"]
    if head and "pct_of_peer" in head[0]:
        log(f"\nHEADLINE: matmul {args.size}^2 float32 = {head[0]['pct_of_peer']:.1f}% of cuBLAS "
            f"({head[0]['fastnn_tflops']:.2f} vs {head[0]['cublas_tflops']:.2f} TFLOP/s)")
    errors = [r for r in b.results if "fastnn_error" in r]
    log(f"bench_gpu: {len(b.results)} rows, {len(errors)} fastnn errors, "
        f"failed sections {failed or 'none'}, {time.perf_counter() - t_start:.0f} s")
    doc["complete"] = True
    save()
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
