"""The ``usema`` command line: a thin dispatcher over the package's command modules.

Each command module exposes ``add_parser(subparsers)``, which registers its sub-command and sets ``func``
(called with the parsed namespace, returning an exit code or None). Command names are listed here statically,
so ``usema --help`` imports no command module and ``usema CMD ...`` imports only CMD's.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback
import warnings
from typing import NoReturn

from usema.allocator import retain_freed_memory
from usema.errors import UsemaError, os_reason
from usema.threads import prefer_passive_waits

# name: (module, one-line help); the module's own add_parser repeats the help (a test keeps them equal)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("usema.training.command", "train a segmentation network from a YAML recipe"),
    "infer": ("usema.inference.command", "segment NIfTI / NRRD / MHA volumes or PNG / TIFF images with a trained model"),
    "evaluate": (
        "usema.evaluation.command",
        "per-case DSC / NSD / HD95 (or instance F1) of predictions, scored as each benchmark scores them",
    ),
    "export": ("usema.bundle.command", "export a trained run as a MONAI Bundle"),
    "bench": ("usema.bench.command", "cost of USEMA vs. MONAI networks: params, GFLOPs, latency, memory, train step"),
    "datasets": ("usema.data.command", "inspect nnU-Net dataset folders; export the demo data"),
    "compare": (
        "usema.comparison.command",
        "paired per-case comparison of two methods: Wilcoxon p, bootstrap CI, seed spread",
    ),
    "cv": (
        "usema.crossval.command",
        "cross-validate a recipe: train every fold, score the folds' predictions, choose post-processing",
    ),
    "plan": (
        "usema.planning.command",
        "fingerprint an nnU-Net dataset and plan a recipe (spacing, patch, batch, stages) for a memory budget",
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with the package's error contract: a usage error is one line, exit 2, not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsemaError(f"{self.prog}: {message} (see '{self.prog} --help')")


def chosen_command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first non-option word), if it is one of COMMANDS."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and ``command``'s module imported to register its options."""
    parser = OneLineParser(prog="usema", description="USEMA medical image segmentation (MONAI-based).")
    parser.add_argument("--debug", action="store_true", help="show full Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


class _Interrupts:
    """SIGINT and SIGTERM (docker stop, schedulers) end a command like Ctrl-C, once.

    The first signal raises KeyboardInterrupt so that temporary files are cleaned up on the way out; later ones
    are ignored, so a second Ctrl-C cannot interrupt that clean-up or an atexit callback with a traceback.
    """

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.received:
            return
        self.received = True
        raise KeyboardInterrupt

    def install(self) -> dict[int, object]:
        """Install for SIGINT and SIGTERM; returns the previous handlers ({} off the main thread)."""
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            return {}
        return {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self, previous: dict[int, object]) -> None:
        """Put the previous handlers back, unless a signal came: then later ones stay ignored until exit."""
        if not self.received:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Library warnings of a successful command, one line each and once each."""
    seen = set()
    for w in caught:
        line = f"usema: warning: {w.category.__name__}: {' '.join(str(w.message).split())}"
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prefer_passive_waits()  # before any command imports torch
    retain_freed_memory()
    interrupts = _Interrupts()
    previous = interrupts.install()
    debug = "--debug" in argv
    # warnings are held back: a failing command prints its one-line error alone (all of them with --debug)
    try:
        with warnings.catch_warnings(record=True) as caught:  # Python's default filters still apply
            code = _run(argv, debug)
    finally:
        interrupts.restore(previous)
    if code == 0 or debug:
        _print_warnings(caught)
    return code


def _run(argv: list[str], debug: bool) -> int:
    try:
        args = build_parser(chosen_command(argv)).parse_args(argv)
        return int(args.func(args) or 0)
    except UsemaError as exc:
        if debug:
            traceback.print_exc()
        print(f"usema: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("usema: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused (missing folder, permission, disk full): name the file
        if debug:
            traceback.print_exc()
        where = exc.filename if exc.filename is not None else "file system"
        print(f"usema: error: {where}: {os_reason(exc)} (expected a readable input and a writable output)",
              file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("usema: error: out of memory: the input is larger than this machine can hold "
              "(use smaller images or windows, or a machine with more memory)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line unless --debug
        if debug:
            raise
        reason = " ".join(str(exc).split())
        print(f"usema: error: {type(exc).__name__}: {reason} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
