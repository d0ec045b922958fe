"""``usema evaluate``: score a prediction folder against references under a benchmark's protocol."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from usema.config import EvaluationConfig, load_recipe
from usema.errors import UsemaError
from usema.evaluation.labels import check_recipe_labels, find_dataset_json, labels_from_dataset_json, parse_labels
from usema.evaluation.protocols import PROTOCOLS
from usema.io.files import ensure_writable_dir, refuse_existing

DEFAULT_REPORT_CASES = 5


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``usema evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="per-case DSC / NSD / HD95 (or instance F1) of predictions, scored as each benchmark scores them",
        description="Score every reference case against the same-named prediction under a protocol: flare22 / "
        "amos (13 FLARE22 organs by label index), endovis17 (per-frame classes), neurips_cell (instance F1 "
        "against instance masks) or generic (every class). docs/evaluation.md states each protocol's rules.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("--truth", type=Path, help="folder of reference label maps (same case names)")
    parser.add_argument(
        "--truth-instances", type=Path, help="neurips_cell: folder of instance masks CASE_label.tiff (one id per cell)"
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, help="scoring protocol (default: the recipe's evaluation.protocol, or generic)"
    )
    parser.add_argument("--recipe", help="recipe YAML file or packaged recipe name (labels and evaluation settings)")
    parser.add_argument("--labels", nargs="+", metavar="VALUE=NAME", help="classes to score, e.g. 1=liver 2=spleen")
    parser.add_argument(
        "--nsd-tolerance",
        nargs="+",
        metavar="MM|NAME=MM",
        help="generic protocol: NSD tolerance in mm (default 2), and/or per-class values NAME=MM",
    )
    parser.add_argument("--instance-f1", action="store_true", help="generic: add instance F1 of the interior class")
    parser.add_argument("--interior-label", type=int, help="label value of the cell interior class (default 1)")
    parser.add_argument(
        "--missing-as-empty",
        action="store_true",
        help="score a reference without a prediction as an empty prediction (flagged) instead of refusing",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes scoring cases in parallel (default 1)")
    parser.add_argument(
        "--output", type=Path, help="JSON summary path; the CSV goes beside it (default PRED/evaluation.json)"
    )
    parser.add_argument("--report", type=Path, metavar="DIR", help="also write an HTML report (plots, worst cases)")
    parser.add_argument(
        "--report-cases", type=int, default=DEFAULT_REPORT_CASES, help="worst cases shown with an overlay (default 5)"
    )
    parser.add_argument("--images", type=Path, help="folder of the input images, drawn under the report's overlays")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.set_defaults(func=run)
    return parser


def parse_tolerance(items: list[str]) -> float | dict[str, float]:
    """``["2"]`` -> 2.0; ``["3", "liver=5"]`` -> ``{"default": 3.0, "liver": 5.0}``."""
    values: dict[str, float] = {}
    for item in items:
        name, sep, number = item.rpartition("=")
        try:
            values[name.strip() if sep else "default"] = float(number)
        except ValueError:
            raise UsemaError(f"--nsd-tolerance: expected MM or NAME=MM with a number, got {item!r}") from None
    return values["default"] if list(values) == ["default"] else values


def _truth_folder(args: argparse.Namespace, protocol: str) -> Path:
    """The reference folder: instance masks for neurips_cell, label maps otherwise."""
    if protocol == "neurips_cell":
        if args.truth_instances is None:
            raise UsemaError("--truth-instances: the neurips_cell protocol scores against the dataset's instance "
                             "masks (CASE_label.tiff, one id per cell); give their folder")  # fmt: skip
        if args.truth is not None:
            raise UsemaError("--truth: the neurips_cell protocol reads its references from --truth-instances only")
        return args.truth_instances
    if args.truth_instances is not None:
        raise UsemaError(f"--truth-instances: only the neurips_cell protocol reads instance masks, not {protocol}")
    if args.truth is None:
        raise UsemaError(f"--truth: the {protocol} protocol needs the folder of reference label maps")
    return args.truth


def _check_generic_flags(args: argparse.Namespace, protocol: str) -> None:
    if protocol == "generic":
        return
    for flag, given in (("--nsd-tolerance", args.nsd_tolerance), ("--instance-f1", args.instance_f1)):
        if given:
            raise UsemaError(f"{flag}: the {protocol} protocol uses its own published rules; this flag is for "
                             "--protocol generic")  # fmt: skip


def resolve_settings(args: argparse.Namespace) -> dict:
    """Evaluation settings from the flags, then the recipe, then dataset.json, then defaults."""
    recipe = load_recipe(args.recipe) if args.recipe else None
    evaluation = recipe.evaluation if recipe else EvaluationConfig()
    protocol = args.protocol or evaluation.protocol
    _check_generic_flags(args, protocol)
    truth = _truth_folder(args, protocol)
    dataset_json = find_dataset_json(truth)
    if recipe and dataset_json:
        check_recipe_labels(recipe.data.labels, args.recipe, dataset_json)
    if args.labels:
        labels, source = parse_labels(args.labels), "--labels"
    elif recipe and recipe.data.labels:
        labels, source = dict(recipe.data.labels), f"recipe {args.recipe}"
    elif dataset_json:
        labels, source = labels_from_dataset_json(dataset_json), str(dataset_json)
    else:
        labels, source = None, "the label values found in the files"
    print(f"usema evaluate: protocol {protocol}; classes from {source}", file=sys.stderr)
    return {
        "truth_dir": truth,
        "protocol": protocol,
        "labels": labels,
        "labels_source": source,
        "nsd_tolerance_mm": parse_tolerance(args.nsd_tolerance) if args.nsd_tolerance else evaluation.nsd_tolerance_mm,
        "instance_f1": args.instance_f1 or (protocol == "generic" and evaluation.instance_f1),
        "interior_label": evaluation.interior_label if args.interior_label is None else args.interior_label,
    }


def run(args: argparse.Namespace) -> int:
    # imported here: the metrics pull in MONAI, which would slow down every `usema` command's start-up
    from usema.evaluation.evaluate import evaluate_folders  # noqa: PLC0415
    from usema.evaluation.results import csv_path_for, format_table, write_results  # noqa: PLC0415

    if args.workers < 1:
        raise UsemaError(f"--workers: expected a number of processes >= 1, got {args.workers}")
    if args.report_cases < 0:
        raise UsemaError(f"--report-cases: expected a number of cases >= 0, got {args.report_cases}")
    output = args.output or args.pred / "evaluation.json"
    if output.suffix.lower() != ".json":
        raise UsemaError(f"--output: expected a .json file name, got {output}")
    # refused before the (long) scoring
    refuse_existing([output, csv_path_for(output), *([args.report] if args.report else [])], args.overwrite,
                    "evaluation result")  # fmt: skip
    ensure_writable_dir(output.parent, "folder for the results")
    settings = resolve_settings(args)
    truth_dir = settings.pop("truth_dir")
    result = evaluate_folders(
        args.pred,
        truth_dir,
        missing_as_empty=args.missing_as_empty,
        workers=args.workers,
        progress=lambda results, total: tqdm(
            results, total=total, desc="evaluate", unit="case", file=sys.stderr, disable=None
        ),
        **settings,
    )
    json_path, csv_path = write_results(result.rows, result.summary, output, overwrite=args.overwrite)
    print(format_table(result.summary))
    if args.report:
        from usema.evaluation.report import write_report  # noqa: PLC0415 - matplotlib only when asked

        index = write_report(result, args.pred, truth_dir, args.report, args.report_cases, args.images, args.overwrite)
        print(f"\nreport: {index}")
    if result.summary["missing_predictions"]:
        print(f"\n{len(result.summary['missing_predictions'])} case(s) had no prediction and were scored as empty")
    if result.summary["predictions_without_reference"]:
        extra = result.summary["predictions_without_reference"]
        print(f"\n{len(extra)} prediction(s) without a reference were ignored: {', '.join(extra[:5])}")
    print(f"\n{result.summary['cases']} cases; per-case CSV: {csv_path}; summary: {json_path}")
    return 0
