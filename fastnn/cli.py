"""The ``fastnn`` command line (also ``python -m fastnn``).

Subcommands: ``train``, ``evaluate``, ``config`` (print ``fastnn.show_config()``)
and ``bench`` (delegates to :mod:`fastnn.bench.cli`). Expected failures (missing
or corrupt data or checkpoint, unusable device, bad option values) print one
``fastnn: error: ...`` line to stderr and exit 1; set ``FASTNN_DEBUG=1`` for the
traceback. Ctrl-C exits 130; the last checkpoint written stays intact.

``mpiexec -n N fastnn train ...`` trains data-parallel on N ranks (see
:mod:`fastnn.distributed`); an error on any rank prints its line and aborts the
whole job, so no rank is left waiting for the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

# Train options whose default lives in TrainConfig; the parser leaves them None so
# that --resume can tell an explicitly given value from a default.
_TRAIN_DEFAULTS_FROM_CONFIG = (
    "model",
    "device",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "momentum",
    "schedule",
    "seed",
    "augment",
    "limit_train",
    "limit_test",
)


_TRAIN_EXAMPLES = """\
examples:
  fastnn train --model seed --epochs 5                  # baseline, ~98.5% test accuracy
  fastnn train --model strong --epochs 15 --augment --schedule cosine   # aims at >= 99.4%
  fastnn train --device numpy --limit-train 2000 --limit-test 500 --epochs 1   # smoke test
  fastnn train --checkpoint run.npz --epochs 10 --resume   # continue (or extend) a run
  mpiexec -n 2 fastnn train --threads 1      # data-parallel on 2 MPI ranks (same trajectory)
"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from fastnn.models import MODELS
    from fastnn.training import DEVICES, OPTIMIZERS, SCHEDULES, TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="fastnn", description="fastnn: fast CPU/GPU kernels with a thin autograd (MNIST)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a model on MNIST",
        description="Train on MNIST; a checkpoint (if asked) is saved after every epoch.",
        epilog=_TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--model", choices=sorted(MODELS), help=f"model preset (default {d.model})")
    t.add_argument("--device", choices=DEVICES, help=f"where to run (default {d.device})")
    t.add_argument(
        "--epochs",
        type=_positive_int,
        help=f"total epochs (default {d.epochs}); with --resume, more than the run "
        "was planned for extends it and re-plans the lr schedule",
    )
    t.add_argument("--batch-size", type=_positive_int, help=f"default {d.batch_size}")
    t.add_argument("--lr", type=_non_negative_float, help=f"learning rate (default {d.lr})")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d.optimizer}")
    t.add_argument("--weight-decay", type=_non_negative_float, help=f"default {d.weight_decay}")
    t.add_argument("--momentum", type=_non_negative_float, help=f"SGD only (default {d.momentum})")
    t.add_argument("--schedule", choices=SCHEDULES, help=f"lr schedule (default {d.schedule})")
    t.add_argument("--seed", type=_non_negative_int, help=f"init/shuffle seed (default {d.seed})")
    t.add_argument(
        "--augment",
        type=_non_negative_int,
        nargs="?",
        const=2,
        metavar="PIXELS",
        help="random-shift augmentation up to PIXELS (2 if no value; default off)",
    )
    t.add_argument(
        "--data-dir", help="directory with the MNIST files (else $FASTNN_DATA_DIR, cache)"
    )
    t.add_argument("--checkpoint", metavar="PATH", help="save an .npz checkpoint every epoch")
    t.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint (its hyperparameters)"
    )
    t.add_argument("--metrics-json", metavar="PATH", help="write per-epoch metrics as JSON")
    t.add_argument("--limit-train", type=_positive_int, metavar="N", help="use the first N images")
    t.add_argument("--limit-test", type=_positive_int, metavar="N", help="test on the first N")
    t.add_argument(
        "--threads",
        type=_positive_int,
        help="threads for the C++ kernels (under MPI: the machine's cores / its ranks)",
    )
    t.add_argument(
        "--cuda-graph", action="store_true",
        help="--device cuda: capture one training step as a CUDA graph and replay it "
             "(falls back, with a note, where capture is unavailable)",
    )
    t.add_argument(
        "--nprocs",
        type=_positive_int,
        metavar="N",
        help="data-parallel on N MPI ranks on this machine: runs `mpiexec -n N` on this "
        "command (needs fastnn[distributed]); same as starting it with mpiexec yourself",
    )
    bar = t.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="force the progress bar on",
    )
    bar.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: only on a terminal)",
    )

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on the MNIST test set")
    e.add_argument("--checkpoint", metavar="PATH", required=True)
    e.add_argument("--data-dir")
    e.add_argument("--device", choices=DEVICES, default="cpu")
    e.add_argument("--limit-test", type=_positive_int, metavar="N")
    e.add_argument("--batch-size", type=_positive_int, default=1000)
    e.add_argument("--threads", type=_positive_int)

    sub.add_parser("config", help="show version, backends, ISA, threads, CPU caches and "
                   "gemm blocking, and GPU")
    sub.add_parser(
        "bench", help="benchmark the kernels (see `fastnn bench --help`)", add_help=False
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    from fastnn._malloc import retain_freed_memory
    from fastnn.training import TrainConfig, train

    retain_freed_memory()  # every step reuses its pages (no faults in the steady state)
    given = {
        k: getattr(args, k) for k in _TRAIN_DEFAULTS_FROM_CONFIG if getattr(args, k) is not None
    }
    config = TrainConfig(data_dir=args.data_dir, **given)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    if args.cuda_graph and config.device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")
    train(
        config,
        checkpoint=args.checkpoint,
        resume=args.resume,
        metrics_json=args.metrics_json,
        progress=args.progress,
        explicit=set(given),
        cuda_graph=args.cuda_graph,
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fastnn.training import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        data_dir=args.data_dir,
        device=args.device,
        limit_test=args.limit_test,
        batch_size=args.batch_size,
    )
    return 0


def _expected_errors() -> tuple[type[BaseException], ...]:
    from fastnn.checkpoint import CheckpointError
    from fastnn.data import MNISTError
    from fastnn.distributed import DistributedError
    from fastnn.training import DeviceError

    # ValueError/TypeError cover bad option values (the validators name the option);
    # OSError covers unwritable checkpoint/metrics paths.
    return (
        CheckpointError,
        DistributedError,
        MNISTError,
        DeviceError,
        ValueError,
        TypeError,
        OSError,
        FloatingPointError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "bench":
        # Imported lazily: the benchmark suite is optional and heavier.
        from fastnn.bench.cli import main as bench_main

        return int(bench_main(args_list[1:]) or 0)

    args = build_parser().parse_args(args_list)
    if args.command == "config":
        import fastnn

        fastnn.show_config()
        return 0

    handlers: dict[str, Any] = {"train": _train, "evaluate": _evaluate}
    world = None
    try:
        if args.command == "train" and (args.nprocs or 1) > 1:
            from fastnn.distributed import launched_size

            if launched_size() is None:  # else we are one of the ranks it started
                return _launch(args.nprocs, args_list)
        if args.command == "train":
            world = _join_world(args)
        if getattr(args, "threads", None):
            import fastnn

            fastnn.set_num_threads(args.threads)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("fastnn: interrupted (the last saved checkpoint is intact)", file=sys.stderr)
        return 130
    except _expected_errors() as exc:
        if os.environ.get("FASTNN_DEBUG") == "1":
            raise
        msg = str(exc) or type(exc).__name__
        multi = world is not None and world.size > 1
        if multi and getattr(exc, "collective", False):
            # Every rank raised this together: rank 0 says it once, and all end
            # normally. (MPI_Abort could kill the launcher's output forwarding
            # before the message got through.)
            if world.rank == 0:
                sys.stderr.write(f"fastnn: error: {msg}\n")
                sys.stderr.flush()
            return 1
        where = f"[rank {world.rank}/{world.size}] " if multi else ""
        # One write: lines from several ranks sharing stderr must not interleave.
        sys.stderr.write(f"fastnn: error: {where}{msg}\n")
        sys.stderr.flush()
        if multi:
            # The other ranks may be waiting in a collective: end them too.
            world.abort(1)
        return 1


def _launch(n: int, argv: list[str]) -> int:
    """Run this command on ``n`` MPI ranks with mpiexec; its exit status."""
    import shutil
    import subprocess

    from fastnn.distributed import INSTALL_HINT, DistributedError

    mpiexec = os.environ.get("FASTNN_MPIEXEC") or shutil.which("mpiexec")
    if mpiexec is None or shutil.which(mpiexec) is None:
        raise DistributedError(f"--nprocs needs mpiexec, which is not on PATH: {INSTALL_HINT}")
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "fastnn", *argv]
    rc = subprocess.run(cmd, check=False).returncode
    if rc not in (0, 1, 130):  # 1 and 130: a rank already said why
        # A rank killed by a signal: mpiexec ended the others and said which on stdout.
        print(
            f"fastnn: error: the {n}-rank MPI job stopped with status {rc}: a rank died or "
            "was killed (see mpiexec's message); the last checkpoint written is intact",
            file=sys.stderr,
        )
    return rc


def _join_world(args: argparse.Namespace) -> Any:
    """The MPI world of ``fastnn train`` (one process unless started by mpiexec).
    Without --threads or OMP_NUM_THREADS, the ranks on a machine share its cores."""
    from fastnn import distributed

    world = distributed.init()
    if world.size > 1 and not args.threads and "OMP_NUM_THREADS" not in os.environ:
        args.threads = max(1, (os.cpu_count() or 1) // world.local_size)
    return world
