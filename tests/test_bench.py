"""Fast tests of the benchmark machinery (fastnn.bench): case sets, FLOP/byte
counts, timing structure, alternation, report rows, JSON schema, --compare,
--plot and the worker process. No timing assertions: only structure and the
arithmetic that turns timings into numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PKG_ROOT

from fastnn.bench import cli, machine, report
from fastnn.bench.cases import (
    Case,
    Prepared,
    Unsupported,
    conv_case,
    known_op_names,
    matmul_case,
    output_arrays,
    pool_case,
    prepare,
    select_cases,
    standard_cases,
    sweep_cases,
    tiny_cases,
    train_step_case,
)
from fastnn.bench.runners import (
    InProcessRunner,
    Result,
    WorkerError,
    WorkerRunner,
    backend_status,
    run_cases,
)
from fastnn.bench.timing import Timing, measure

REPO = Path(__file__).resolve().parents[1]
OP_PREFIXES = ("conv2d", "matmul", "max_pool2d", "avg_pool2d", "relu", "softmax", "sgd",
               "adam", "train")


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #


def test_case_keys_unique_and_counts_positive() -> None:
    for cases in (standard_cases() + sweep_cases(), tiny_cases()):
        keys = [c.key for c in cases]
        assert len(keys) == len(set(keys))
        for c in cases:
            assert c.op.startswith(OP_PREFIXES)
            assert c.metric in ("gflops", "gb_s", "images_s")
            assert c.flops > 0
            assert c.bytes > 0 or c.metric == "images_s"


def test_issue_shapes_are_in_the_standard_set() -> None:
    shapes = {(c.op, c.shape) for c in standard_cases()}
    for op in ("conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight"):
        assert (op, "N32 1->32 3x3 28x28") in shapes
        assert (op, "N128 1->32 3x3 28x28") in shapes
        assert (op, "N128 32->64 3x3 13x13 p1") in shapes
    for op in ("max_pool2d_fwd", "max_pool2d_bwd", "avg_pool2d_fwd", "avg_pool2d_bwd"):
        assert (op, "N128 C32 26x26 k2 s2") in shapes
    for s in (256, 512, 1024, 2048):
        assert ("matmul", f"{s}x{s}x{s}") in shapes
    assert ("matmul_linear_fwd", "128x5408x128 B^T") in shapes
    assert ("matmul_linear_bwd_input", "128x128x5408") in shapes
    assert ("matmul_linear_bwd_weight", "128x128x5408 A^T") in shapes
    assert ("train_step", "seed N128") in shapes


def test_conv_flops_match_direct_count() -> None:
    c = conv_case("conv2d_fwd", 2, 3, 9, 5, 3, 2, 1)
    oh = (9 + 2 - 3) // 2 + 1
    assert c.flops == 2 * 2 * 5 * oh * oh * 3 * 9
    y = prepare(c, "numpy").fn()
    assert y.shape == (2, 5, oh, oh)


def test_matmul_and_pool_counts() -> None:
    m = matmul_case(4, 6, 5, ta=True)
    assert m.flops == 2 * 4 * 6 * 5 and m.bytes == (24 + 30 + 20) * 4
    assert prepare(m, "numpy").fn().shape == (4, 5)
    p = pool_case("avg_pool2d_fwd", 2, 3, 8)
    assert p.bytes == (2 * 3 * 64 + 2 * 3 * 16) * 4
    assert prepare(p, "numpy").fn().shape == (2, 3, 4, 4)


def test_select_cases_filters() -> None:
    quick = select_cases("quick")
    assert quick and all("quick" in c.tags for c in quick)
    assert len(select_cases("full")) > len(select_cases("standard")) > len(quick)
    conv = select_cases("full", ["conv2d"])
    assert conv and all(c.op.startswith("conv2d") for c in conv)
    fwd = select_cases("full", ["conv2d_fwd", "max_pool2d"])
    assert {c.op for c in fwd} == {"conv2d_fwd", "max_pool2d_fwd", "max_pool2d_bwd"}
    mm = select_cases("standard", ["matmul"])
    assert {"matmul", "matmul_small", "matmul_linear_fwd"} <= {c.op for c in mm}
    with pytest.raises(ValueError, match="mode"):
        select_cases("nope")


def test_strong_selects_its_conv_layers_and_step() -> None:
    strong = select_cases("full", ["strong"])
    convs = {c.shape for c in strong if c.family == "conv2d"}
    assert convs == {"N128 1->32 3x3 28x28", "N128 32->32 3x3 26x26", "N128 32->64 3x3 12x12",
                     "N128 64->64 3x3 10x10"}
    assert len(strong) == 3 * 4 + 1
    (step,) = [c for c in strong if c.op == "train_step"]
    assert step.shape == "strong N128" and step.params["model"] == "strong"
    # forward 2*N*O*OH*OW*C*9 per conv, twice for the first (no input gradient),
    # three times for the rest; three products per Linear.
    convs_fwd = [2 * 128 * o * (hw - 2) ** 2 * c * 9
                 for c, hw, o in ((1, 28, 32), (32, 26, 32), (32, 12, 64), (64, 10, 64))]
    fc = 2 * 128 * (1024 * 256 + 256 * 10)
    assert step.flops == 2 * convs_fwd[0] + 3 * sum(convs_fwd[1:]) + 3 * fc
    with pytest.raises(ValueError, match="model must be one of"):
        train_step_case(128, model="nope")
    assert "strong" in known_op_names()  # what the CLI checks --ops against


def test_torch_peer_strong_model_is_fastnns() -> None:
    """The torch peer's strong preset computes fastnn's strong preset (eval mode, same
    initial weights and buffers)."""
    torch = pytest.importorskip("torch")
    import fastnn
    from fastnn.bench.torch_peer import preset_model
    from fastnn.models import build_model

    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ours = build_model("strong", 0).eval()
    theirs = preset_model(torch, "float32", "strong").eval()
    with fastnn.no_grad():
        want = ours(x).data
    with torch.no_grad():
        got = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_case_json_round_trip() -> None:
    for c in tiny_cases():
        back = Case.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back == c


@pytest.mark.parametrize("case", tiny_cases(), ids=lambda c: c.op)
def test_every_tiny_case_runs_on_numpy(case: Case) -> None:
    prepared = prepare(case, "numpy")
    out = prepared.fn()
    if case.family not in ("train",) and case.op not in ("sgd_step", "adam_step"):
        arrays = output_arrays(out)
        assert arrays and all(np.isfinite(a).all() for a in arrays)


def test_cpu_backend_matches_numpy_on_tiny_cases() -> None:
    ok, why = backend_status("cpu")
    if not ok:
        pytest.skip(why)
    for case in tiny_cases():
        if case.family == "train" or case.op in ("sgd_step", "adam_step"):
            continue
        ref = output_arrays(prepare(case, "numpy").fn())
        got = output_arrays(prepare(case, "cpu").fn())
        for r, g in zip(ref, got):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=case.op)


def test_unknown_backend_and_dtype() -> None:
    c = tiny_cases()[0]
    with pytest.raises(ValueError, match="backend"):
        prepare(c, "tpu")
    with pytest.raises(ValueError, match="dtype"):
        prepare(c, "numpy", "int8")


# --------------------------------------------------------------------------- #
# Timing and alternation
# --------------------------------------------------------------------------- #


def test_measure_structure() -> None:
    calls = []
    t = measure(Prepared(lambda: calls.append(1)), warmup=2, warmup_s=0.0, target_s=0.01,
                min_repeats=3, max_repeats=5, min_sample_s=1e-4)
    assert 3 <= len(t.samples) <= 5
    assert t.inner >= 1 and len(calls) >= 3 + 2
    assert all(s > 0 for s in t.samples) and t.best <= t.median


def test_measure_single_shot_runs_warmup_then_once() -> None:
    log: list[str] = []
    p = Prepared(lambda: log.append("run"), single_shot=True,
                 warmup_fn=lambda: log.append("warm"))
    t = measure(p)
    assert log == ["warm", "run"] and len(t.samples) == 1


class _FakeRunner:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def measure(self, case: Case, dtype: str = "float32", **opts: object) -> tuple[Timing, str]:
        self.log.append(self.name)
        if self.fail:
            raise Unsupported("not here")
        return Timing([1.0 if self.name == "numpy" else 0.25], 1), ""

    def release(self) -> None:
        pass


def test_run_cases_alternates_and_records_errors() -> None:
    log: list[str] = []
    runners = {"numpy": _FakeRunner("numpy", log), "cpu": _FakeRunner("cpu", log),
               "torch": _FakeRunner("torch", log, fail=True)}
    case = conv_case("conv2d_fwd", 1, 1, 5, 1)
    results = run_cases([case], runners, rounds=3)
    # The order rotates each round; the failing backend is tried once only.
    assert log == ["numpy", "cpu", "torch", "cpu", "numpy", "numpy", "cpu"]
    by = {r.backend: r for r in results}
    assert len(by["numpy"].timing.samples) == 3 and by["torch"].error.startswith("unsupported")
    heavy = conv_case("conv2d_fwd", 1, 1, 5, 1, tags=("heavy",))
    assert {r.backend for r in run_cases([heavy], runners, rounds=1)} == {"cpu", "torch"}


# --------------------------------------------------------------------------- #
# Rows, tables, compare, plot
# --------------------------------------------------------------------------- #


def _results() -> list[Result]:
    conv = conv_case("conv2d_fwd", 2, 3, 8, 4)
    pool = pool_case("max_pool2d_fwd", 2, 3, 8)
    out = []
    for case in (conv, pool):
        out.append(Result(case, "numpy", "float32", Timing([2e-3, 4e-3, 3e-3])))
        out.append(Result(case, "cpu", "float32", Timing([1e-3, 1e-3, 1e-3])))
        out.append(Result(case, "torch", "float32", Timing([2e-3])))
    out.append(Result(conv, "cuda", "float32", error="unsupported: no GPU"))
    return out


def test_result_rows_arithmetic() -> None:
    ceilings = {"sgemm_gflops": 100.0, "copy_gb_s": 20.0}
    rows = report.result_rows(_results(), ceilings)
    cpu_conv = next(r for r in rows if r["op"] == "conv2d_fwd" and r["backend"] == "cpu")
    flops = cpu_conv["flops"]
    assert cpu_conv["median_s"] == 1e-3
    assert math.isclose(cpu_conv["gflops"], flops / 1e-3 / 1e9)
    assert math.isclose(cpu_conv["pct_peak"], 100 * cpu_conv["gflops"] / 100.0)
    assert math.isclose(cpu_conv["speedup_vs_numpy"], 3.0)
    assert math.isclose(cpu_conv["speedup_vs_torch"], 2.0)
    cpu_pool = next(r for r in rows if r["op"] == "max_pool2d_fwd" and r["backend"] == "cpu")
    assert "gb_s" in cpu_pool and "gflops" not in cpu_pool
    assert math.isclose(cpu_pool["pct_peak"], 100 * cpu_pool["gb_s"] / 20.0)
    err = next(r for r in rows if r["backend"] == "cuda")
    assert "error" in err and "median_s" not in err
    table = report.format_table(rows)
    assert "vs torch" in table and "error" in table and "3.00x" in table
    assert report.format_table(rows, markdown=True).startswith("| op |")


def test_compare_statuses() -> None:
    new = report.result_rows(_results())
    old = [dict(r) for r in new if "median_s" in r]
    for r in old:
        r["median_s"] *= {"numpy": 2.0, "cpu": 0.5, "torch": 1.02}[r["backend"]]
    old.append({"op": "matmul", "shape": "1x1x1", "backend": "cpu", "median_s": 1.0})
    cmp = report.compare(old, new, tolerance=0.1)
    status = {(r["op"], r["backend"]): r["status"] for r in cmp["rows"]}
    assert status[("conv2d_fwd", "numpy")] == "faster"
    assert status[("conv2d_fwd", "cpu")] == "slower"
    assert status[("conv2d_fwd", "torch")] == "same"
    assert cmp["only_old"] == [("matmul", "1x1x1", "cpu", "float32")]
    text = report.format_compare(cmp)
    assert "2 faster, 2 slower (regressed), 2 within 10%" in text


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    report.plot(report.result_rows(_results()), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_json_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="results"):
        report.load_json(bad)


def test_openblas_note_reads_the_given_environment() -> None:
    assert machine.openblas_note({}) is None
    note = machine.openblas_note({"OPENBLAS_CORETYPE": "Haswell"})
    assert note is not None and "OPENBLAS_CORETYPE=Haswell" in note


# --------------------------------------------------------------------------- #
# CLI and worker (tiny runs: seconds)
# --------------------------------------------------------------------------- #


def _tiny(tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "run.json"
    code = cli.main(["--tiny", "--backends", "numpy", "--ops", "conv2d,matmul,max_pool2d",
                     "--no-progress", "--json", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else {}


def test_cli_tiny_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _tiny(tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    assert "conv2d_fwd" in printed and "GFLOP/s" in printed and "GB/s" in printed
    m = doc["machine"]
    for key in ("cpu", "cores", "numpy", "sgemm_gflops", "copy_gb_s", "date"):
        assert key in m
    assert doc["results"]
    for r in doc["results"]:
        assert r["op"].startswith(("conv2d", "matmul", "max_pool2d"))
        assert r["backend"] == "numpy"
        assert r["median_s"] > 0 and r["samples"] >= 1
        assert ("gflops" in r) != ("gb_s" in r)
        assert math.isclose(r["speedup_vs_numpy"], 1.0)


def test_cli_compare_reports_faster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = _tiny(tmp_path)
    assert code == 0
    for r in doc["results"]:
        r["median_s"] *= 1000.0  # an old run a thousand times slower
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    capsys.readouterr()
    code, _ = _tiny(tmp_path, "--compare", str(old))
    assert code == 0
    n = len(doc["results"])
    assert f"{n} faster, 0 slower" in capsys.readouterr().out


def test_cli_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    code, _ = _tiny(tmp_path, "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    assert cli.main(["--tiny", "--ops", "convolution"]) == 2
    assert cli.main(["--tiny", "--backends", "tpu"]) == 2
    (tmp_path / "x.json").write_text("[]")
    assert cli.main(["--tiny", "--backends", "numpy", "--compare", str(tmp_path / "x.json")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--full"])


def test_in_process_runner_caches_inputs() -> None:
    runner = InProcessRunner("numpy")
    case = tiny_cases()[0]
    runner.measure(case, warmup_s=0.0, target_s=0.001)
    first = runner._prepared
    runner.measure(case, warmup_s=0.0, target_s=0.001)
    assert runner._prepared is first
    runner.release()
    assert runner._prepared is None


def test_worker_process_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTNN_BENCH_TEST_DROP", "1")
    monkeypatch.setenv("FASTNN_BENCH_TEST_KEEP", "2")
    w = WorkerRunner("numpy", drop_env=["FASTNN_BENCH_TEST_DROP"])
    try:
        assert w.env(["FASTNN_BENCH_TEST_DROP", "FASTNN_BENCH_TEST_KEEP"]) == {
            "FASTNN_BENCH_TEST_DROP": None, "FASTNN_BENCH_TEST_KEEP": "2"}
        timing, _ = w.measure(tiny_cases()[0], warmup_s=0.0, target_s=0.001)
        assert timing.samples and timing.inner >= 1
        assert w.info()["pid"] != os.getpid()
    finally:
        w.close()
    bad = WorkerRunner("tpu")
    try:
        with pytest.raises(WorkerError, match="backend must be one of"):
            bad.measure(tiny_cases()[0])
    finally:
        bad.close()


def test_python_m_fastnn_bench_lists_cases() -> None:
    env = dict(os.environ, PYTHONPATH=str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastnn.bench", "--quick", "--list"],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "conv2d_bwd_weight" in proc.stdout and "train_step" in proc.stdout


def _targets_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_cpu_targets", REPO / "benchmarks" / "bench_cpu_targets.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while executing it
    spec.loader.exec_module(mod)
    return mod


def test_cpu_targets_verdicts() -> None:
    t = _targets_module()
    conv = conv_case("conv2d_fwd", 2, 1, 8, 4)
    fwd, bwd = pool_case("max_pool2d_fwd", 2, 3, 8), pool_case("max_pool2d_bwd", 2, 3, 8)
    tgts = [t.Target("conv2d", "fwd", [conv], {"numpy": 10.0, "torch": 2.0}),
            t.Target("pool", "fwd+bwd", [fwd, bwd], {"copy": 0.5, "torch": 3.0}),
            t.Target("conv2d", "no torch", [conv], {"torch": 2.0})]
    medians = {(conv.op, conv.shape, "cpu"): 1.0, (conv.op, conv.shape, "numpy"): 20.0,
               (conv.op, conv.shape, "torch"): 1.5,
               (fwd.op, fwd.shape, "cpu"): 1e-6, (bwd.op, bwd.shape, "cpu"): 1e-6,
               (fwd.op, fwd.shape, "torch"): 1e-5, (bwd.op, bwd.shape, "torch"): 1e-5}
    rows = t.evaluate(tgts, medians, {"sgemm_gflops": 100.0, "copy_gb_s": 1.0})
    assert rows[0]["result"] == "FAIL (torch)" and math.isclose(rows[0]["vs_numpy"], 20.0)
    # Summed fwd+bwd: 2 us for both passes against 20 us of torch, bytes over 2 us vs 1 GB/s.
    assert math.isclose(rows[1]["cpu_s"], 2e-6) and math.isclose(rows[1]["vs_torch"], 10.0)
    assert math.isclose(rows[1]["copy_frac"], (fwd.bytes + bwd.bytes) / 2e-6 / 1e9)
    assert rows[1]["result"] == "PASS"
    medians.pop((conv.op, conv.shape, "torch"))
    assert t.evaluate(tgts[2:], medians, {})[0]["result"].startswith("n/a")


def test_best_ceilings_takes_the_best_of_each() -> None:
    a = {"sgemm_n": 256, "sgemm_gflops": 10.0, "copy_mib": 8, "copy_gb_s": 5.0,
         "copy_cache_gb_s": 50.0}
    b = dict(a, sgemm_gflops=20.0, copy_gb_s=4.0)
    best = machine.best_ceilings(a, b)
    assert (best["sgemm_gflops"], best["copy_gb_s"], best["copy_cache_gb_s"]) == (20.0, 5.0, 50.0)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_foreign_cpu_counts_other_processes_not_our_own() -> None:
    import time

    fc = machine.ForeignCPU()
    # An unreaped busy child counts as foreign until it is waited for.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.time()\nwhile time.time() - t < 0.4: pass"])
    time.sleep(0.3)
    share = fc.share()
    child.wait()
    assert share is not None and 0.05 < share <= 1.0
    assert machine.foreign_note(share) is not None and machine.foreign_note(0.0) is None


# --------------------------------------------------------------------------- #
# per-op step profile (fastnn.bench.profile)
# --------------------------------------------------------------------------- #


def test_op_cost_counts_gemm_and_conv_flops() -> None:
    from fastnn.bench.profile import op_cost

    a, b = np.zeros((128, 5408), np.float32), np.zeros((128, 5408), np.float32)
    flops, moved = op_cost("matmul", (a, b, False, True), np.zeros((128, 128), np.float32))
    assert flops == 2.0 * 128 * 128 * 5408
    assert moved == a.nbytes + b.nbytes + 128 * 128 * 4
    x, w = np.zeros((2, 3, 10, 9), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    flops, _ = op_cost("conv2d", (x, w, None, (1, 1), (0, 0), (1, 1), 1), None)
    assert flops == 2.0 * 2 * 4 * 8 * 7 * 3 * 3 * 3
    x, w = np.zeros((8, 30), np.float32), np.zeros((5, 30), np.float32)
    assert op_cost("linear_relu", (x, w, None), None)[0] == 2.0 * 8 * 5 * 30
    gy = np.zeros((8, 5), np.float32)
    assert op_cost("linear_relu_backward", (gy, x, w, gy, False, True, True), None)[0] == (
        2.0 * 8 * 5 * 30)
    p = np.zeros(10, np.float32)
    flops, moved = op_cost("adam_step", (p, p, p, p, 1, 1e-3), None)
    assert flops == 0 and moved == 8 * p.nbytes  # 4 read, 3 written back + param
    q = np.zeros(3, np.float32)
    lists = ([p, q], [p, q], [p, q], [p, q], [1, 1])
    flops, moved = op_cost("adam_step_multi", (*lists, 1e-3), None)
    assert flops == 0 and moved == 7 * (p.nbytes + q.nbytes)  # grads are only read


def test_timed_backend_wraps_and_restores() -> None:
    from fastnn.backends import cpu
    from fastnn.bench.profile import timed_backend

    original = cpu.relu
    x = np.arange(-3.0, 3.0, dtype=np.float32)
    with timed_backend(cpu, ["relu"]) as stats:
        assert cpu.relu is not original
        np.testing.assert_array_equal(cpu.relu(x), np.maximum(x, 0))
    assert cpu.relu is original
    assert stats["relu"].calls == 1 and stats["relu"].seconds > 0
    assert stats["relu"].bytes == 2 * x.nbytes
    with pytest.raises(ValueError), timed_backend(cpu, ["relu"]):
        raise ValueError("boom")
    assert cpu.relu is original


def test_cli_train_prints_step_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastnn._C")
    out = tmp_path / "t.json"
    code = cli.main(["--tiny", "--backends", "cpu", "--ops", "train_step", "--no-progress",
                     "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step profile: seed model" in printed and "x floor" in printed
    assert "outside the ops" in printed and "its floor of" in printed
    prof = json.loads(out.read_text())["profiles"][0]
    assert prof["model"] == "seed" and prof["step_ms"] > 0
    # The seed step's products: conv forward and weight gradient, three big GEMMs.
    assert {"matmul", "linear_relu", "linear_relu_backward", "conv2d_relu_max_pool2d",
            "conv2d_relu_max_pool2d_backward", "adam_step_multi"} <= set(prof["ops"])
    # The hidden layer runs as linear_relu (+ backward); the output layer as 3 matmuls.
    assert prof["ops"]["matmul"]["calls"] == 3 and prof["ops"]["linear_relu"]["calls"] == 1
    assert abs(prof["gflop_per_step"] * 1e9 - 2 * 4 * 2 * (5408 * 128 + 128 * 10) * 1.5
               - 2 * 2 * 4 * 32 * 26 * 26 * 9) < 1e3
    # The ops are timed inside the steps they were summed over (no timing threshold).
    ops_ms = sum(o["ms"] for o in prof["ops"].values())
    assert 0 < ops_ms <= prof["timed_step_ms"]
    assert 0 <= prof["outside_ops_ms"] <= prof["timed_step_ms"] - ops_ms
    # The glue alone: steps that ran no kernel (every op replayed), so shorter than
    # the op time the timed steps spent in the kernels.
    assert "that Python alone" in printed
    assert 0 < prof["python_alone_ms"] < ops_ms


def test_replayed_backend_returns_recorded_outputs_without_running_ops() -> None:
    from fastnn.backends import numpy_ref
    from fastnn.bench.profile import replayed_backend

    x = np.arange(-2.0, 2.0)
    calls = []
    original = numpy_ref.relu
    with replayed_backend(numpy_ref, ["relu", "tanh"]) as rec:
        first = numpy_ref.relu(x)
        second = numpy_ref.tanh(x)
        rec.replay()
        assert numpy_ref.relu(x * 0) is first and numpy_ref.tanh(None) is second
        assert numpy_ref.relu(x) is first  # cycles through the record
        with pytest.raises(RuntimeError, match="relu called where tanh was recorded"):
            numpy_ref.relu(x)
        calls.append(1)
    assert numpy_ref.relu is original and calls == [1]
    with pytest.raises(RuntimeError, match="nothing was recorded"), \
            replayed_backend(numpy_ref, ["relu"]) as rec:
        rec.replay()
    assert numpy_ref.relu is original


def test_bench_memory_pool_script_switches_the_pool():
    """benchmarks/bench_memory_pool.py's two configurations are what it says."""
    import importlib.util

    pytest.importorskip("fastnn._C", reason="fastnn._C is not built")
    path = REPO / "benchmarks" / "bench_memory_pool.py"
    spec = importlib.util.spec_from_file_location("bench_memory_pool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    on, off = mod.run("seed", 2, pool=True), mod.run("seed", 2, pool=False)
    assert on["pool"]["enabled"] and on["pool"]["hits"] > 0
    assert not off["pool"]["enabled"] and off["pool"]["hits"] == 0
    assert on["ms"] > 0 and off["ms"] > 0 and on["faults"] >= 0

