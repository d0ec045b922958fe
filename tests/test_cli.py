"""The command line: fast start-up (no torch for help), one-line usage errors, warnings kept out of errors."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import warnings

import pytest

from usema.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("argv", [["--help"], ["infer", "--help"], ["train", "--help"], ["evaluate", "--help"]])
def test_help_does_not_import_torch(argv):
    """`usema --help` and a command's --help list the options without importing torch (a fresh interpreter)."""
    code = (
        "import sys, json\nfrom usema.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'monai', 'usema.nets')}), file=sys.stderr)"
    ) % argv
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert loaded == {"torch": False, "monai": False, "usema.nets": False}
    assert "usage: usema" in proc.stdout


def test_only_the_chosen_command_module_is_imported():
    before = set(sys.modules)
    build_parser(None)
    assert not any(m.endswith(".command") for m in set(sys.modules) - before)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_static_help_matches_the_command_module(name):
    """The listing in `usema --help` says what each command module registers for itself."""
    module, help_text = COMMANDS[name]
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).add_parser(sub)
    assert sub._choices_actions[0].help == help_text


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "usema: the following arguments are required: COMMAND"),
        (["infer"], "usema infer: the following arguments are required: MODEL"),
        (["frobnicate"], "usema: argument COMMAND: invalid choice: 'frobnicate'"),
        (["bench", "--repeats", "zero"], "usema bench: argument --repeats"),
        (["evaluate", "--pred", "a", "--truth", "b", "--nonsense"], "usema: unrecognized arguments: --nonsense"),
    ],
)
def test_usage_errors_are_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usema: error: " + expected)
    assert err.count("\n") == 1 and "usage:" not in err


def test_library_warnings_do_not_join_an_error(monkeypatch, capsys, tmp_path):
    """A command that warns and then fails prints its one error line only; a successful one prints each warning
    on one line."""
    from usema.bench import command as bench_command

    def warn_then(args):
        warnings.warn("a library\nwarning over two lines", UserWarning)
        if args.quick:
            raise bench_command.UsemaError("x.md: expected something else")
        return 0

    monkeypatch.setattr(bench_command, "run", warn_then)
    assert main(["bench", "--quick"]) == 2
    assert capsys.readouterr().err == "usema: error: x.md: expected something else\n"
    assert main(["bench"]) == 0
    assert capsys.readouterr().err == "usema: warning: UserWarning: a library warning over two lines\n"
