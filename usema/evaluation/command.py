"""``usema evaluate``: challenge-faithful metrics of a prediction folder against a reference folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from usema.config import EvaluationConfig, load_recipe
from usema.errors import UsemaError
from usema.io.files import ensure_writable_dir


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``usema evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="per-case DSC / NSD / HD95 (and instance F1) of predictions against references",
        description="Score every reference case against the same-named prediction. Labels come from --labels, "
        "else the recipe, else dataset.json beside the reference folder, else the values found.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("--truth", required=True, type=Path, help="folder of reference label maps (same case names)")
    parser.add_argument("--recipe", help="recipe YAML file or packaged recipe name (labels and evaluation settings)")
    parser.add_argument("--labels", nargs="+", metavar="VALUE=NAME", help="classes to score, e.g. 1=liver 2=spleen")
    parser.add_argument(
        "--nsd-tolerance",
        nargs="+",
        metavar="MM|NAME=MM",
        help="NSD tolerance in mm for classes without a FLARE22 organ default (default 2), and/or per-class values",
    )
    parser.add_argument("--instance-f1", action="store_true", help="add instance F1 (IoU >= 0.5) of the interior class")
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
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.set_defaults(func=run)
    return parser


def parse_labels(items: list[str]) -> dict[int, str]:
    """``["1=liver", "2=spleen"]`` -> ``{1: "liver", 2: "spleen"}``."""
    labels = {}
    for item in items:
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise UsemaError(f"--labels: expected VALUE=NAME with an integer VALUE, got {item!r}")
        labels[int(value)] = name.strip()
    return labels


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


def labels_from_mapping(raw: Any, source: str) -> dict[int, str]:
    """Class names from ``{value: name}`` (nnU-Net v1) or ``{name: value}`` (nnU-Net v2)."""
    if not isinstance(raw, dict) or not raw:
        raise UsemaError(f"{source}: expected a mapping of label values and names")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):  # nnU-Net v2 {name: value}
        return {v: str(k) for k, v in raw.items()}
    if all(str(k).strip().isdigit() for k in raw):  # {value: name}, keys possibly strings (JSON)
        return {int(k): str(v) for k, v in raw.items()}
    raise UsemaError(f"{source}: expected {{value: name}} or {{name: value}} with integer values (no region lists)")


def find_dataset_json(truth_dir: Path) -> Path | None:
    """nnU-Net layout: dataset.json in the reference folder or its parent (DatasetXXX/labelsTr)."""
    return next((p for p in (truth_dir / "dataset.json", truth_dir.parent / "dataset.json") if p.is_file()), None)


def labels_from_dataset_json(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsemaError(f"{path}: expected a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise UsemaError(f"{path}: expected a 'labels' entry")
    return labels_from_mapping(data["labels"], f"{path} labels")


def resolve_settings(args: argparse.Namespace) -> dict:
    """Evaluation settings from the flags, then the recipe, then dataset.json, then defaults."""
    recipe = load_recipe(args.recipe) if args.recipe else None
    evaluation = recipe.evaluation if recipe else EvaluationConfig()
    dataset_json = find_dataset_json(args.truth)
    if args.labels:
        labels, source = parse_labels(args.labels), "--labels"
    elif recipe and recipe.data.labels:
        labels, source = dict(recipe.data.labels), f"recipe {args.recipe}"
    elif dataset_json:
        labels, source = labels_from_dataset_json(dataset_json), str(dataset_json)
    else:
        labels, source = None, "the label values found in the files"
    print(f"usema evaluate: classes from {source}", file=sys.stderr)
    return {
        "labels": labels,
        "nsd_tolerance_mm": parse_tolerance(args.nsd_tolerance) if args.nsd_tolerance else evaluation.nsd_tolerance_mm,
        "instance_f1": args.instance_f1 or evaluation.instance_f1,
        "interior_label": evaluation.interior_label if args.interior_label is None else args.interior_label,
    }


def run(args: argparse.Namespace) -> int:
    # imported here: the metrics pull in MONAI, which would slow down every `usema` command's start-up
    from usema.evaluation.evaluate import (  # noqa: PLC0415
        csv_path_for,
        evaluate_folders,
        format_table,
        refuse_existing,
        write_results,
    )

    if args.workers < 1:
        raise UsemaError(f"--workers: expected a number of processes >= 1, got {args.workers}")
    output = args.output or args.pred / "evaluation.json"
    if output.suffix.lower() != ".json":
        raise UsemaError(f"--output: expected a .json file name, got {output}")
    refuse_existing([output, csv_path_for(output)], args.overwrite, "evaluation result")  # before the (long) scoring
    ensure_writable_dir(output.parent, "folder for the results")
    settings = resolve_settings(args)
    result = evaluate_folders(
        args.pred,
        args.truth,
        missing_as_empty=args.missing_as_empty,
        workers=args.workers,
        progress=lambda results, total: tqdm(
            results, total=total, desc="evaluate", unit="case", file=sys.stderr, disable=None
        ),
        **settings,
    )
    json_path, csv_path = write_results(result, output, overwrite=args.overwrite)
    print(format_table(result.summary))
    if result.summary["missing_predictions"]:
        print(f"\n{len(result.summary['missing_predictions'])} case(s) had no prediction and were scored as empty")
    if result.summary["predictions_without_reference"]:
        extra = result.summary["predictions_without_reference"]
        print(f"\n{len(extra)} prediction(s) without a reference were ignored: {', '.join(extra[:5])}")
    print(f"\n{result.summary['cases']} cases; per-case CSV: {csv_path}; summary: {json_path}")
    return 0
