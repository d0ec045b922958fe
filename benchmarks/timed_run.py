"""The common start of a timing script: its options, and the process set up as the usema commands set it up."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch

from usema.allocator import retain_freed_memory


def start_timed_run(
    doc: str, rounds: int | None = None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, tuple[float, float, float]]:
    """Parse ``--threads`` (default 2), ``--output``, when ``rounds`` is given ``--rounds`` (that default), and what
    ``add_arguments`` adds, for a script described by ``doc``; set usema's allocator settings and the thread count.
    Returns the options and the load average read before anything ran, for the report's header."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--output", type=Path)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    return args, os.getloadavg()
