"""Data-parallel training on real MPI ranks: pytest starts ``mpiexec -n N`` in
subprocesses (each bounded by a timeout, so a hang fails instead of blocking).

* the gradient averaging of DistributedDataParallel equals the global-batch
  gradient, with equal and unequal shares and an unused parameter;
* ``mpiexec -n N fastnn train`` follows the single-process trajectory (the
  issue's target: every parameter after 50 steps of batch 128 within 1e-4);
* ``--resume`` across world sizes (2 ranks -> 1 process and back);
* a rank killed with SIGKILL ends the job within seconds, checkpoint intact;
* ranks started with different settings stop at start with a clear error.

Skipped (with the reason) only where mpiexec or mpi4py is missing; CI installs
``fastnn[distributed]`` so they run there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import PKG_ROOT

from fastnn import checkpoint as ckpt

MPIEXEC = shutil.which("mpiexec")
pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(MPIEXEC is None, reason='no mpiexec: pip install "fastnn[distributed]"'),
    pytest.mark.skipif(
        importlib.util.find_spec("mpi4py") is None,
        reason='no mpi4py: pip install "fastnn[distributed]"',
    ),
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    e.update(
        PYTHONPATH=str(PKG_ROOT) + os.pathsep + e.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",  # this 2-core machine is shared
        FASTNN_DIST_TIMEOUT="60",
    )
    e.pop("FASTNN_DEBUG", None)
    return e


def mpirun(env, n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MPIEXEC, "-n", str(n), *args], env=env, cwd=PKG_ROOT, capture_output=True, text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------
# DistributedDataParallel in a loop of one's own
# --------------------------------------------------------------------------

_DDP_SCRIPT = r"""
import numpy as np
import fastnn.distributed as dist
from fastnn import functional as F, nn
from fastnn.autograd import Tensor
from fastnn.data import share_bounds

world = dist.init()
assert world.size == SIZE, world

class Net(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, rng=rng), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 6 * 6, 10, rng=rng))
        self.unused = nn.Linear(3, 3, rng=rng)   # never in the graph: its gradient is zero

    def forward(self, x):
        return self.body(x)

def net(seed):
    return Net(np.random.default_rng(seed + world.rank))  # differs per rank: DDP broadcasts

data = np.random.default_rng(0).standard_normal((GLOBAL, 1, 8, 8)).astype(np.float32)
labels = np.arange(GLOBAL) % 10
ddp = dist.DistributedDataParallel(net(1), world, bucket_mb=BUCKET)
ref = net(1)
for p, q in zip(ref.parameters(), ddp.parameters()):
    p.data[...] = q.data                   # the reference starts from the broadcast weights
lo, hi = share_bounds(GLOBAL, world.rank, world.size)
if hi > lo:
    loss = F.cross_entropy(ddp(Tensor(data[lo:hi]), global_batch=GLOBAL), labels[lo:hi])
    loss.backward()
    ddp.synchronize()
else:
    ddp.reduce_without_batch()
F.cross_entropy(ref(Tensor(data)), labels).backward()
for (name, p), q in zip(ref.named_parameters(), ddp.parameters()):
    want = p.grad if p.grad is not None else np.zeros_like(p.data)
    err = np.abs(q.grad - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < 1e-5, (world.rank, name, err)
# A file per rank, not stdout alone: mpiexec may interleave the ranks' lines.
with open(f"OUTDIR/rank{world.rank}.ok", "w") as f:
    f.write(f"{len(ddp._buckets)}")
print("rank", world.rank, "ok", len(ddp._buckets), "buckets", flush=True)
"""


@pytest.mark.parametrize(
    "size, global_batch, bucket_mb",
    # (3, 2) and (2, 1): a rank with an empty share, whose buckets are all ready at
    # once while the others complete a Linear's weight bucket before its bias's.
    [(2, 16, 1.0), (2, 15, 0.001), (3, 7, 0.0005), (3, 2, 1.0), (3, 2, 0.0005), (2, 1, 0.0005)],
)
def test_ddp_gradients_equal_the_global_batch_gradient(env, tmp_path, size, global_batch,
                                                       bucket_mb):
    script = tmp_path / "ddp_check.py"
    script.write_text(
        _DDP_SCRIPT.replace("SIZE", str(size)).replace("GLOBAL", str(global_batch))
        .replace("BUCKET", str(bucket_mb)).replace("OUTDIR", str(tmp_path))
    )
    r = mpirun(env, size, sys.executable, str(script), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    buckets = [int((tmp_path / f"rank{i}.ok").read_text()) for i in range(size)]
    if bucket_mb < 0.01:
        assert min(buckets) > 1  # several buckets really were used


_ZERO_SCRIPT = r"""
import numpy as np
import fastnn.distributed as dist
from fastnn import functional as F, nn, optim
from fastnn.autograd import Tensor
from fastnn.data import share_bounds

world = dist.init()
assert world.size == SIZE, world

def net():
    rng = np.random.default_rng(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, rng=rng), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10, rng=rng))

def make_opt(model):
    ps = list(model.parameters())
    groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": LR2}]   # two groups, two lrs
    if OPT == "sgd":
        return optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return getattr(optim, OPT)(groups, lr=1e-2, weight_decay=1e-3)

data = np.random.default_rng(0).standard_normal((4, GLOBAL, 1, 8, 8)).astype(np.float32)
labels = np.random.default_rng(1).integers(0, 10, (4, GLOBAL))
lo, hi = share_bounds(GLOBAL, world.rank, world.size)

ref = net()
ref_opt = make_opt(ref)
ddp = dist.DistributedDataParallel(net(), world, bucket_mb=BUCKET)
try:   # an optimizer over other parameters is refused, the wrapper left as it was
    ddp.shard_optimizer(optim.SGD(ref.parameters(), lr=0.1))
    raise AssertionError("shard_optimizer accepted another model's parameters")
except ValueError as exc:
    assert "trainable parameters" in str(exc), exc
sharded = ddp.shard_optimizer(make_opt(ddp.module))
assert type(sharded).__name__ == "ShardedOptimizer"

def step(model, opt, x, y, global_batch=None):
    opt.zero_grad()
    if global_batch is None:
        F.cross_entropy(model(Tensor(x)), y).backward()
    elif len(y):
        F.cross_entropy(model(Tensor(x), global_batch=global_batch), y).backward()
        model.synchronize()
    else:
        model.reduce_without_batch()
    opt.step()

def close(a, b, what):
    err = np.abs(np.asarray(a, float) - np.asarray(b, float)).max()
    assert err <= 1e-5 * max(1.0, np.abs(np.asarray(b, float)).max()), (world.rank, what, err)

for i in range(4):
    if i == 2:   # a scheduler changes the wrapped optimizer's lr: the shards follow
        for g in (*ref_opt.param_groups, *sharded.param_groups):
            g["lr"] *= 0.5
    if i == 3:   # restore the full state into a fresh sharded optimizer and go on
        sd = sharded.state_dict()
        want = ref_opt.state_dict()
        assert sd.keys() == want.keys(), sorted(sd.keys() ^ want.keys())
        for k in want:
            close(sd[k], want[k], k)
        fresh = make_opt(ddp.module)
        for g, h in zip(fresh.param_groups, sharded.param_groups):
            g["lr"] = h["lr"]
        sharded = ddp.shard_optimizer(fresh)
        sharded.load_state_dict(sd)
    step(ref, ref_opt, data[i], labels[i])
    step(ddp, sharded, data[i][lo:hi], labels[i][lo:hi], GLOBAL)
    if i == 1:   # a second step without backward reuses the same gradient
        ref_opt.step()
        sharded.step()
    for (name, p), q in zip(ref.named_parameters(), ddp.parameters()):
        close(q.data, p.data, (i, name))
with open(f"OUTDIR/rank{world.rank}.ok", "w") as f:  # mpiexec may interleave stdout lines
    f.write(f"{len(ddp._buckets)}")
"""


@pytest.mark.parametrize("opt", ["sgd", "Adam", "AdamW"])
@pytest.mark.parametrize(
    "size, global_batch, bucket_mb",
    # Tiny buckets: several parameters per bucket and buckets cut at the group
    # boundary; (2, 1): one rank without samples; (3, 7): unequal shares.
    [(2, 16, 1.0), (2, 15, 0.0005), (3, 7, 0.0005), (2, 1, 0.0005)],
)
def test_sharded_optimizer_follows_the_single_process_optimizer(env, tmp_path, opt, size,
                                                                global_batch, bucket_mb):
    script = tmp_path / "zero_check.py"
    script.write_text(
        _ZERO_SCRIPT.replace("SIZE", str(size)).replace("GLOBAL", str(global_batch))
        .replace("BUCKET", str(bucket_mb)).replace("OPT", repr(opt)).replace("LR2", "3e-2")
        .replace("OUTDIR", str(tmp_path))
    )
    r = mpirun(env, size, sys.executable, str(script), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all((tmp_path / f"rank{i}.ok").exists() for i in range(size))


# --------------------------------------------------------------------------
# the CLI: equivalence with one process, resume across world sizes
# --------------------------------------------------------------------------

TRAIN = ("-m", "fastnn", "train", "--device", "cpu", "--no-progress", "--schedule", "none",
         "--limit-test", "1000")


def _params(path: Path) -> dict[str, np.ndarray]:
    return ckpt.load(path).model_state


def assert_same_params(a: Path, b: Path, rtol: float = 1e-4, entrywise: bool = True) -> None:
    """Each parameter tensor within ``rtol`` of the other in norm (the issue's
    target); with ``entrywise``, also every entry within 10 * rtol of the tensor's
    largest: Adam turns rounding noise in a near-zero gradient entry (sums over
    another split of the batch) into an update of up to +-lr, a few 1e-4 of the
    largest weight, while a wrong gradient would move far more."""
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        rel = np.linalg.norm(pa[k] - pb[k]) / np.linalg.norm(pa[k])
        worst = np.abs(pa[k] - pb[k]).max() / np.abs(pa[k]).max()
        assert rel <= rtol and (worst <= 10 * rtol or not entrywise), (k, rel, worst)


def _accuracy(path: Path) -> float:
    return ckpt.load(path).metadata["metrics"]["epochs"][-1]["test_accuracy"]


@pytest.mark.mnist
@pytest.mark.parametrize(
    "ranks, limit_train, batch, entrywise, shard",
    [(2, 6400, 128, True, "1"),   # the target: 50 steps of global batch 128
     (2, 6400, 128, True, "0"),   # the same with an Allreduce and unsharded Adam
     # Unequal shares (43/43/42) and a last batch of 2 (one share empty). In norm
     # only: 3 Adam steps, the last on 2 images, turn rounding noise in gradient
     # entries near zero into +-lr updates of a few entries.
     (3, 258, 128, False, "1")],
)
def test_mpi_training_follows_the_single_process_trajectory(env, tmp_path, mnist_dir, ranks,
                                                            limit_train, batch, entrywise,
                                                            shard):
    env["FASTNN_DATA_DIR"] = str(mnist_dir)
    env["FASTNN_DIST_SHARD"] = shard
    args = (*TRAIN, "--epochs", "1", "--limit-train", str(limit_train),
            "--batch-size", str(batch))
    one = subprocess.run([sys.executable, *args, "--checkpoint", str(tmp_path / "one.npz")],
                         env=env, cwd=PKG_ROOT, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    many = mpirun(env, ranks, sys.executable, *args, "--checkpoint", str(tmp_path / "many.npz"),
                  "--metrics-json", str(tmp_path / "m.json"))
    assert many.returncode == 0, many.stderr
    assert_same_params(tmp_path / "one.npz", tmp_path / "many.npz", entrywise=entrywise)
    assert abs(_accuracy(tmp_path / "one.npz") - _accuracy(tmp_path / "many.npz")) <= 0.001
    # Rank 0 alone reports: one epoch line, one report.
    assert many.stdout.count("epoch   1/1") == 1
    assert many.stdout.count("test accuracy") == 1
    assert f"{ranks} MPI ranks" in many.stdout and "comm wait" in many.stdout
    assert not list(tmp_path.glob("*.tmp"))
    # Every rank's split of the epoch: phases nested inside the epoch's wall time.
    epoch = json.loads((tmp_path / "m.json").read_text())["epochs"][0]
    times = epoch["rank_times"]
    assert len(times) == ranks
    for t in times:
        assert t["steps"] == -(-limit_train // batch)
        total = sum(v for k, v in t.items() if k != "steps")
        assert all(v >= 0 for v in t.values()), t
        assert 0 < total <= epoch["seconds"] * 1.01, (t, epoch["seconds"])
        assert (t["optimizer"] > 0 and t["allgather"] > 0) == (shard == "1"), t


@pytest.mark.mnist
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_with_a_different_number_of_ranks(env, tmp_path, mnist_dir, first, second):
    env["FASTNN_DATA_DIR"] = str(mnist_dir)
    args = (*TRAIN, "--limit-train", "1024", "--batch-size", "128")

    def run(n, epochs, path, *extra):
        cmd = [sys.executable, *args, "--epochs", str(epochs), "--checkpoint", str(path), *extra]
        r = mpirun(env, n, *cmd) if n > 1 else subprocess.run(
            cmd, env=env, cwd=PKG_ROOT, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        return r

    run(1, 2, tmp_path / "straight.npz")
    run(first, 1, tmp_path / "split.npz")
    r = run(second, 2, tmp_path / "split.npz", "--resume")
    assert "resuming seed" in r.stdout and r.stdout.count("resuming") == 1
    assert ckpt.load(tmp_path / "split.npz").metadata["epoch"] == 2
    assert_same_params(tmp_path / "straight.npz", tmp_path / "split.npz")


# --------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------

def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of rank ``rank`` of the job whose environment carries ``tag``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tag.encode() in environ and f"PMI_RANK={rank}".encode() in environ:
            return int(d.name)
    return None


@pytest.mark.mnist
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("via_nprocs", [False, True])
def test_a_killed_rank_ends_the_job_within_seconds(env, tmp_path, mnist_dir, via_nprocs):
    env["FASTNN_DATA_DIR"] = str(mnist_dir)
    tag = f"FASTNN_TEST_JOB={uuid.uuid4().hex}"
    env[tag.split("=")[0]] = tag.split("=")[1]
    path = tmp_path / "run.npz"
    launch = [sys.executable, *TRAIN, "--nprocs", "2"] if via_nprocs else [
        MPIEXEC, "-n", "2", sys.executable, *TRAIN]
    proc = subprocess.Popen(
        [*launch, "--limit-train", "2560", "--epochs", "50", "--checkpoint", str(path)],
        env=env, cwd=PKG_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        time.sleep(0.3)  # mid-epoch
        pid = _rank_pid(tag, 1)
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert took < 10, f"the job took {took:.1f} s to end"
    # MPICH's mpiexec names the dead rank's signal (on stdout); `fastnn train
    # --nprocs` adds one line on stderr.
    assert "signal 9" in out + err or "KILLED" in out + err, out + err
    if via_nprocs:
        assert "fastnn: error: the 2-rank MPI job stopped" in err, err
    assert ckpt.load(path).metadata["epoch"] >= 1  # the last checkpoint is intact
    assert _rank_pid(tag, 0) is None  # no rank left behind


@pytest.mark.mnist
@pytest.mark.parametrize(
    "option, a, b",
    [("--lr", "0.001", "0.002"), ("--model", "seed", "strong"), ("--seed", "0", "1"),
     ("--batch-size", "64", "128")],
)
def test_ranks_with_different_settings_stop_at_start(env, tmp_path, mnist_dir, option, a, b):
    env["FASTNN_DATA_DIR"] = str(mnist_dir)
    base = [sys.executable, *TRAIN, "--limit-train", "256", "--epochs", "1"]
    r = subprocess.run(
        [MPIEXEC, "-n", "1", *base, option, a, ":", "-n", "1", *base, option, b],
        env=env, cwd=PKG_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0
    key = option.lstrip("-").replace("-", "_")
    assert "ranks were started with different settings" in r.stderr, r.stderr
    assert f"{key} (rank 0: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "epoch   1/1" not in r.stdout


@pytest.mark.mnist
def test_an_error_on_rank_0_alone_aborts_every_rank(env, tmp_path, mnist_dir):
    # Only rank 0 writes the checkpoint; the others would wait for it forever in
    # the next epoch's first reduction unless the error aborts the job.
    env["FASTNN_DATA_DIR"] = str(mnist_dir)
    (tmp_path / "dir.npz").mkdir()
    t0 = time.monotonic()
    r = mpirun(env, 2, sys.executable, *TRAIN, "--limit-train", "256", "--epochs", "3",
               "--checkpoint", str(tmp_path / "dir.npz"), timeout=120)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 60
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fastnn: error:")]
    assert len(errors) == 1 and errors[0].startswith("fastnn: error: [rank 0/2] "), r.stderr
    assert "epoch   2/3" not in r.stdout
