"""``usema cv RECIPE --output DIR [--set KEY=VALUE ...] [--device cpu|cuda] [--threads N]``: 5-fold cross-validation."""

from __future__ import annotations

import argparse
from pathlib import Path

from usema.threads import add_threads_argument

HELP = "cross-validate a recipe: train every fold, score the folds' predictions, choose post-processing"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cv",
        help=HELP,
        description="Train folds 0..4 of the dataset's splits_final.json into DIR/fold_K one after another "
        "(rerun the same command to continue a killed cv: finished folds are kept), predict each fold's "
        "validation cases with its final model into DIR/cv_predictions, score them with the recipe's evaluation "
        "protocol (DIR/cv_evaluation.json/.csv) and choose the largest-component post-processing "
        "(DIR/postprocessing.json). `usema infer DIR` then runs the ensemble of the folds.",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="recipe YAML file or packaged recipe name (nnunet data)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="cv directory")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key by dotted path, e.g. --set train.epochs=2 (repeatable)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usema.crossval.cv import cross_validate  # noqa: PLC0415 - heavy imports

    summary = cross_validate(args.recipe, args.overrides, Path(args.output), args.device, args.threads)
    folds = ", ".join(f"fold {k} {v:.4f}" for k, v in summary.fold_dice.items())
    decision = summary.postprocessing
    steps = (["all foreground"] if decision.all_foreground else []) + [f"class {c}" for c in decision.per_class]
    seconds = ", ".join(f"{s:.0f}" for s in summary.fold_seconds.values())
    print(f"usema cv: trained folds {summary.trained or 'none (all finished before)'}; seconds per fold "
          f"(training and validation predictions): {seconds}")
    print(f"usema cv: mean Dice {summary.mean_dice:.4f} ({folds}); largest-component post-processing: "
          f"{', '.join(steps) or 'none'} -> {args.output}")
    return 0
