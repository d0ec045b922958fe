"""Cost benchmark of USEMA vs. MONAI's networks: a thin wrapper over `usema bench` (same options).

Full 2D run (the table in docs/benchmarks.md):
    python benchmarks/bench_cost.py --output docs/bench_2d.md
Smoke run:
    python benchmarks/bench_cost.py --quick --nets usema-tiny dynunet
"""

from __future__ import annotations

import sys

from usema.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
