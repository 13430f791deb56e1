"""``python -m fastnn``: the same command line as the ``fastnn`` console script."""

from __future__ import annotations

from fastnn.cli import main

raise SystemExit(main())
