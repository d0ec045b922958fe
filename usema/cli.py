"""The ``usema`` command line: a thin dispatcher over the package's command modules.

Each command module exposes ``add_parser(subparsers)`` which registers a sub-command and sets
``func`` (called with the parsed namespace, returning an exit code or None).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback

from usema.errors import UsemaError, os_reason

# module path of each sub-command; imported lazily so `usema --help` stays fast
COMMAND_MODULES = (
    "usema.training.command",
    "usema.inference.command",
    "usema.evaluation.command",
    "usema.bundle.command",
    "usema.bench",
    "usema.data.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usema", description="USEMA medical image segmentation (MONAI-based).")
    parser.add_argument("--debug", action="store_true", help="show full Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (docker stop, schedulers) ends a command like Ctrl-C, so temporary files get cleaned up."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        signal.signal(signal.SIGTERM, _interrupt)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        return int(code or 0)
    except UsemaError as exc:
        if debug:
            traceback.print_exc()
        print(f"usema: error: {exc}", file=sys.stderr)
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
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line unless --debug
        if debug:
            raise
        reason = " ".join(str(exc).split())
        print(f"usema: error: {type(exc).__name__}: {reason} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
