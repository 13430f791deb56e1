"""Benchmark worker process: ``python -m fastnn.bench.worker BACKEND``.

Reads one JSON request per line on stdin and answers one JSON line each:

* ``{"cmd": "measure", "case": {...}, "dtype": "float32", "opts": {...}}`` ->
  ``{"samples": [...], "inner": k, "note": ""}``
* ``{"cmd": "info"}`` -> ``{"info": {"threads": ..., ...}}``
* ``{"cmd": "ceilings", "mode": "full"}`` -> ``{"ceilings": {...}}`` (sgemm peak and
  copy bandwidth measured in this process's environment)
* ``{"cmd": "env", "names": [...]}`` -> ``{"env": {name: value or null}}``
* ``{"cmd": "release"}`` (drop cached inputs), ``{"cmd": "quit"}``

Failures answer ``{"error": "...", "unsupported": bool}``. Replies go to a private
duplicate of the original stdout; fd 1 itself is pointed at stderr so stray prints
from libraries cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fastnn.bench.worker BACKEND", file=sys.stderr)
        return 2
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from fastnn._malloc import retain_freed_memory
    from fastnn.bench.cases import Case, Unsupported
    from fastnn.bench.runners import InProcessRunner

    retain_freed_memory()  # as the parent `fastnn bench` (see fastnn.bench.cli.main)

    runner = InProcessRunner(args[0])
    for line in sys.stdin:
        if not line.strip():
            continue
        reply: dict[str, Any]
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "quit":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            if cmd == "measure":
                case = Case.from_dict(msg["case"])
                timing, note = runner.measure(case, msg.get("dtype", "float32"),
                                              **msg.get("opts", {}))
                reply = {"samples": timing.samples, "inner": timing.inner, "note": note}
            elif cmd == "info":
                reply = {"info": runner.info()}
            elif cmd == "ceilings":
                reply = {"ceilings": runner.ceilings(msg.get("mode", "full"))}
            elif cmd == "env":
                reply = {"env": runner.env(msg.get("names", []))}
            elif cmd == "release":
                runner.release()
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command {cmd!r}", "unsupported": False}
        except Unsupported as exc:
            reply = {"error": str(exc), "unsupported": True}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which carries on
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}", "unsupported": False}
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
