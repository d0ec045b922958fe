"""``usema compare A B`` or ``usema compare --a A1 A2 A3 --b B1 B2 B3``: is one method better than the other?"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, ensure_writable_dir, refuse_existing

HELP = "paired per-case comparison of two methods: Wilcoxon p, bootstrap CI, seed spread"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare",
        help=HELP,
        description="Compare two methods on the same cases from their `usema evaluate` results (the .json or .csv "
        "files). Give one evaluation per method (A B), or several runs per method that differ only in "
        "train.seed (--a ... --b ...): each method's per-case scores are then averaged over its runs and the "
        "seed-to-seed spread of each is reported next to the method difference.",
    )
    parser.add_argument("results", nargs="*", metavar="EVAL", help="two evaluation files: A then B")
    parser.add_argument("--a", nargs="+", default=[], metavar="EVAL", help="evaluations of method A (one per seed)")
    parser.add_argument("--b", nargs="+", default=[], metavar="EVAL", help="evaluations of method B (one per seed)")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="method names (default: the folder names)")
    parser.add_argument("--metric", choices=("dsc", "nsd", "instance_f1"), default="dsc", help="score (default dsc)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--output", "-o", type=Path, help="also write REPORT.md and REPORT.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.set_defaults(func=run)


def _groups(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    if args.results and (args.a or args.b):
        raise UsemaError("EVAL: give either two evaluations (A B) or --a ... --b ..., not both")
    if args.results:
        if len(args.results) != 2:
            raise UsemaError(f"EVAL: expected two evaluation files (A B), got {len(args.results)}")
        return [Path(args.results[0])], [Path(args.results[1])]
    if not args.a or not args.b:
        raise UsemaError("--a/--b: expected at least one evaluation file for each method")
    return [Path(p) for p in args.a], [Path(p) for p in args.b]


def _name(paths: list[Path]) -> str:
    path = paths[0].resolve()
    return path.parent.name or path.stem


def run(args: argparse.Namespace) -> int:
    from usema.comparison.compare import compare  # noqa: PLC0415 - SciPy only when comparing
    from usema.comparison.report import to_markdown  # noqa: PLC0415

    group_a, group_b = _groups(args)
    outputs = None
    if args.output is not None:
        if args.output.suffix != ".md":
            raise UsemaError(f"--output: expected a .md file name, got {args.output}")
        outputs = (args.output, args.output.with_suffix(".json"))
        refuse_existing(outputs, args.overwrite, "comparison report")
        ensure_writable_dir(args.output.parent, "folder for the report")
    names = tuple(args.names) if args.names else (_name(group_a), _name(group_b))
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")
    report = compare(group_a, group_b, names, args.metric, args.seed)
    markdown = to_markdown(report)
    print(markdown, end="")
    if outputs is not None:
        atomic_write_text(outputs[1], json.dumps(report, indent=2) + "\n")
        atomic_write_text(outputs[0], markdown)
    return 0
