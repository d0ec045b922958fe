"""Measurements that need a process of their own: peak memory (VmHWM is per process) and `usema infer` as a
user starts it (no heap, allocator or oneDNN cache state left by the networks measured before)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
from contextlib import contextmanager
from typing import Iterator, Sequence


@contextmanager
def fresh_processes(preload: Sequence[str]) -> Iterator[multiprocessing.pool.Pool]:
    """A pool that runs every task in a new child, forked from a server that imported ``preload`` once (importing
    MONAI takes seconds) and has run no torch op, so the child inherits no thread pool and no freed memory."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    with context.Pool(1, maxtasksperchild=1) as pool:
        yield pool


def proc_status_mib(*keys: str) -> dict[str, float]:
    """``keys`` of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
