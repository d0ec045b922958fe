"""The machine a benchmark runs on: its CPU, and whether it is quiet enough for timings that mean something.

Wall-clock timings on a machine shared with other jobs are slower by an unknown, drifting factor, so a run
is refused while the 1-minute load average exceeds ``LOAD_PER_CPU`` per usable CPU, unless the caller
allows it; then the report says so in its first line. No torch import: the CLI checks before the run.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from typing import Any

from usema.errors import UsemaError
from usema.threads import usable_cpus

# a quiet machine: at most half a runnable process per CPU the benchmark may use
LOAD_PER_CPU = 0.5


def load_averages() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages, None where the system has none (tests replace this function)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class LoadCheck:
    """The load before the run, the limit it was held to, and whether the run goes ahead over that limit."""

    before: tuple[float, float, float] | None
    cpus: int
    limit: float
    loaded: bool


def read_load(cpus: int | None = None) -> LoadCheck:
    """The load now, against the limit for ``cpus`` usable CPUs (default: this process's)."""
    cpus = cpus or usable_cpus()
    before = load_averages()
    limit = LOAD_PER_CPU * cpus
    return LoadCheck(before=before, cpus=cpus, limit=limit, loaded=before is not None and before[0] > limit)


def refuse_loaded(load: LoadCheck, allow_load: bool) -> None:
    """A one-line UsemaError when ``load`` is over its limit and ``allow_load`` is False."""
    if load.loaded and not allow_load:
        raise UsemaError(
            f"load average: 1-minute load {load.before[0]:.2f} is above {load.limit:.2f} ({LOAD_PER_CPU} per usable "
            f"CPU, {load.cpus} CPUs), so timings would not be comparable; wait for a quiet machine or pass --allow-load"
        )


def _named(load: tuple[float, float, float] | None) -> dict[str, float] | None:
    return None if load is None else dict(zip(("1min", "5min", "15min"), (round(v, 2) for v in load)))


def describe_machine(load: LoadCheck) -> dict[str, Any]:
    """CPU model, usable CPUs, versions, date, and the load before (from ``load``) and now (after the run)."""
    import torch  # noqa: PLC0415 - the version only; the CLI imports this module before torch is needed

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "usable_cpus": load.cpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "load_before": _named(load.before),
        "load_after": _named(load_averages()),
        "load_limit_1min": load.limit,
        "loaded": load.loaded,
    }
