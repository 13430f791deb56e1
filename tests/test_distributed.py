"""fastnn.distributed without a launcher: batch shares, the sharded DataLoader,
the single-process world, and the one-line errors when MPI is missing.
(The multi-rank behaviour is tested under mpiexec in test_distributed_mpi.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PKG_ROOT

import fastnn.distributed as dist
from fastnn import optim
from fastnn.data import DataLoader, share_bounds
from fastnn.models import build_model


@pytest.mark.parametrize("n", [0, 1, 2, 5, 64, 127, 128])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_share_bounds_cover_in_order_and_balance(n, size):
    shares = [share_bounds(n, r, size) for r in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    for (_, hi), (lo2, _) in zip(shares, shares[1:]):
        assert hi == lo2
    lengths = [hi - lo for lo, hi in shares]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize(
    "args, err",
    [((5, 2, 2), ValueError), ((5, -1, 2), ValueError), ((5, 0, 0), ValueError),
     ((-1, 0, 1), ValueError), ((5.0, 0, 1), TypeError), ((5, True, 2), TypeError)],
)
def test_share_bounds_rejects_bad_arguments(args, err):
    with pytest.raises(err):
        share_bounds(*args)


@pytest.mark.parametrize("n, batch, size", [(50, 8, 2), (37, 10, 3), (17, 8, 4), (9, 4, 2)])
@pytest.mark.parametrize("augment", [0, 2])
def test_sharded_loader_yields_the_single_process_batches_split(n, batch, size, augment):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 6, 6), dtype=np.uint8)
    labels = np.arange(n)

    def loader(shard):
        return DataLoader(images, labels, batch, shuffle=True, seed=3, augment_shift=augment,
                          shard=shard)

    whole = list(loader((0, 1)))
    parts = [list(loader((r, size))) for r in range(size)]
    one = loader((0, size))
    for step, (x, y) in enumerate(whole):
        xs = np.concatenate([p[step][0] for p in parts])
        ys = np.concatenate([p[step][1] for p in parts])
        np.testing.assert_array_equal(ys, y)
        np.testing.assert_array_equal(xs, x)
        assert one.global_batch_len(step) == len(y)
    assert all(len(p) == len(whole) for p in parts)


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), [0, 1], (0,)])
def test_loader_rejects_bad_shard(shard):
    images = np.zeros((4, 2, 2), np.uint8)
    with pytest.raises((ValueError, TypeError), match="rank|shard|size"):
        DataLoader(images, np.zeros(4, np.int64), 2, shard=shard)


def test_single_process_world_never_imports_mpi():
    code = (
        "import sys, fastnn.distributed as d, fastnn.training\n"
        "w = d.init(); assert (w.rank, w.size, d.rank(), d.size()) == (0, 1, 0, 1)\n"
        "assert 'mpi4py' not in sys.modules, 'imported MPI'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=PKG_ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("var", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_launched_size_reads_the_launchers_variable(monkeypatch, var):
    for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert dist.launched_size() is None
    monkeypatch.setenv(var, "4")
    assert dist.launched_size() == 4


def test_ddp_on_one_rank_is_the_plain_model(rng):
    from fastnn import functional as F
    from fastnn.autograd import Tensor

    model = build_model("seed", 0)
    ref = build_model("seed", 0)
    ddp = dist.DistributedDataParallel(model, dist.World())
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    for m in (ddp, ref):
        F.cross_entropy(m(Tensor(x)), y).backward()
    for p, q in zip(ddp.parameters(), ref.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)
    assert ddp.comm_seconds == 0.0
    assert ddp.state_dict().keys() == ref.state_dict().keys()
    opt = optim.Adam(model.parameters())
    assert ddp.shard_optimizer(opt) is opt  # nothing to shard on one rank
    assert set(ddp.times) == set(dist.PHASES) and not any(ddp.times.values())


@pytest.mark.parametrize("bucket_mb", [0, -1, "1", True])
def test_ddp_rejects_bad_bucket_size(bucket_mb):
    with pytest.raises(ValueError, match="bucket_mb"):
        dist.DistributedDataParallel(build_model("seed", 0), dist.World(), bucket_mb=bucket_mb)


def test_ddp_rejects_a_non_module():
    with pytest.raises(TypeError, match="module"):
        dist.DistributedDataParallel(object(), dist.World())


def test_world_check_same_names_the_differing_keys():
    class FakeComm:
        def allgather(self, obj):
            return [obj, {**obj, "lr": 0.1}]

    w = dist.World(0, 2, FakeComm())
    with pytest.raises(dist.DistributedError, match=r"lr \(rank 0: 0.001, rank 1: 0.1\)"):
        w.check_same("settings", {"lr": 0.001, "model": "seed"})


_BLOCK_MPI4PY = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] == 'mpi4py':\n"
    "            raise ImportError('No module named mpi4py')\n"
    "sys.meta_path.insert(0, Block())\n"
    "from fastnn.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastnn: error: ")
    return lines[0]


def test_launched_without_mpi4py_says_what_to_install():
    env = {**os.environ, "PMI_SIZE": "2", "PMI_RANK": "0"}
    r = subprocess.run([sys.executable, "-c", _BLOCK_MPI4PY, "train", "--limit-train", "8"],
                       cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=60)
    line = _one_line_error(r)
    assert "mpi4py" in line and 'pip install "fastnn[distributed]"' in line


def test_nprocs_without_mpiexec_says_what_to_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    env["PATH"] = str(tmp_path)  # no mpiexec there
    env.pop("FASTNN_MPIEXEC", None)
    r = subprocess.run([sys.executable, "-m", "fastnn", "train", "--nprocs", "2"],
                       cwd=PKG_ROOT, env=env, capture_output=True, text=True, timeout=60)
    line = _one_line_error(r)
    assert "mpiexec" in line and 'pip install "fastnn[distributed]"' in line


@pytest.mark.parametrize("local_size, omp, given, want", [
    (2, None, None, "split"), (1, None, None, None), (2, "3", None, None), (2, None, 5, 5),
])
def test_ranks_share_the_machines_cores_by_default(monkeypatch, local_size, omp, given, want):
    import argparse

    from fastnn import cli

    world = dist.World(0, 2 if local_size > 1 else 1, None, 0, local_size)
    monkeypatch.setattr(dist, "init", lambda: world)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    args = argparse.Namespace(threads=given)
    assert cli._join_world(args) is world
    assert args.threads == (8 // local_size if want == "split" else want)
