"""``python -m fastnn.bench`` runs ``fastnn bench``."""

from __future__ import annotations

from fastnn.bench.cli import main

raise SystemExit(main())
