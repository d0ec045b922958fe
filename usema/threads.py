"""How many threads a command may use: the CPUs this process may run on, not the machine's core count.

On shared servers and in containers ``os.cpu_count()`` counts every core of the host, while the process is
limited by its CPU affinity (``taskset``, Slurm, Kubernetes cpusets) and by a cgroup CPU quota (docker
``--cpus``, Kubernetes limits). Intra-op thread pools larger than that spin at barriers while their peers are
descheduled, which slows a shared machine down far more than fair sharing would.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity set, capped by the cgroup quota (rounded up), at least 1."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        available = min(available, math.ceil(limit))
    return max(1, available)


def configure_threads(requested: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads to ``requested``, else this process's share of ``usable_cpus()`` when
    ``processes`` (e.g. torchrun's local world size on CPU) split them; returns the number set."""
    import torch  # noqa: PLC0415 - callers are the commands, after their (torch-free) argument parsing

    threads = requested or max(1, usable_cpus() // max(1, processes))
    torch.set_num_threads(threads)
    return threads


def prefer_passive_waits(environ: dict[str, str] | None = None) -> None:
    """Make OpenMP threads sleep, not spin, when they wait (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose.

    Spinning wins a little on an idle machine but, when another busy process shares the cores, a thread spins
    for its descheduled peer at every barrier: a demo epoch slowed 5-8x beside one inference instead of 2x
    (docs/benchmarks.md, "Sharing the machine"). The OpenMP runtime reads this once, when torch loads it, so
    the command line calls this before importing torch.
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--threads N`` option of the commands that run networks."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads (default: the CPUs this process may use, by affinity and cgroup quota)")


def single_thread_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per worker, so workers and the main process don't fight."""
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
