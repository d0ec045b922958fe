"""Deterministic fault points: stop the process at a named step, so that interruption tests never race.

The code calls ``fault_point("<name>")`` at steps where an interruption must be survivable. Nothing
happens unless the environment variable ``USEMA_FAULT`` names that point::

    USEMA_FAULT=<name>[@<n>][:<action>][,<name>[@<n>][:<action>]...]

At the ``n``-th time (default 1) this process reaches the point ``name``, it performs ``action``:

    kill        SIGKILL itself (the default): nothing else runs, like a power cut or the OOM killer
    term        SIGTERM itself: the handler runs at once, as if ``kill PID`` arrived at that moment
    sigint      SIGINT itself: Ctrl-C at a terminal, through the process's signal handler
    interrupt   raise KeyboardInterrupt, as Ctrl-C would under Python's default handler
    error       raise OSError(ENOSPC), as a full disk would

Several comma-separated entries may be given (e.g. a first SIGTERM and a second one during the clean-up).
Counts are per process: each DDP rank counts its own iterations. The points in the package:

    train.iteration     after a training iteration (and its mid-epoch checkpoint, when one is due)
    <what>.flushed      inside ``usema.io.files.atomic_path(path, what)``: the temporary file is complete and
                        fsynced, the rename over ``path`` has not happened yet (checkpoint.flushed for
                        checkpoints, result.flushed for other results)
    infer.case_done     after a case's outputs are written, before the next case is read
    bundle.swap         an exported bundle is complete beside the output, about to be swapped into place
    bundle.swapped      the new bundle is in place; the old one, swapped out, not yet removed

With the variable unset a point costs one environment lookup.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Callable

ENV_VAR = "USEMA_FAULT"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _term() -> None:
    # the Python-level handler runs as soon as os.kill returns, i.e. still inside fault_point
    os.kill(os.getpid(), signal.SIGTERM)


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


ACTIONS: dict[str, Callable[[], None]] = {
    "kill": _kill, "term": _term, "sigint": _sigint, "interrupt": _interrupt, "error": _disk_full,
}

_reached: dict[str, int] = {}  # times each point was reached in this process (only counted while armed)
_parsed: dict[str, dict[str, list[tuple[int, str]]]] = {}  # USEMA_FAULT value -> {name: [(n, action)]}


def parse(spec: str) -> dict[str, list[tuple[int, str]]]:
    """``{point name: [(n, action), ...]}`` for a ``USEMA_FAULT`` value; ValueError names a malformed entry."""
    plan: dict[str, list[tuple[int, str]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        target, _, action = entry.partition(":")
        name, _, count = target.partition("@")
        action = action or "kill"
        if not name or action not in ACTIONS or not (count == "" or (count.isdigit() and int(count) >= 1)):
            raise ValueError(
                f"{ENV_VAR}: expected <name>[@<n>=1,2,...][:{'|'.join(ACTIONS)}] entries, got {entry!r}"
            )
        plan.setdefault(name, []).append((int(count or 1), action))
    return plan


def fault_point(name: str) -> None:
    """Perform the action ``USEMA_FAULT`` assigns to this point and this arrival here; else nothing."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    if spec not in _parsed:
        _parsed[spec] = parse(spec)
    entries = _parsed[spec].get(name)
    if not entries:
        return
    _reached[name] = _reached.get(name, 0) + 1
    for count, action in entries:
        if count == _reached[name]:
            ACTIONS[action]()
