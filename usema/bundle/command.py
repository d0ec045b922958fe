"""`usema export RUN --output BUNDLE_DIR`: write a trained run as a MONAI Bundle."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained run as a MONAI Bundle",
        description=(
            "Export RUN (a run directory or a checkpoint) as a MONAI Bundle: LICENSE, configs/metadata.json, "
            "configs/inference.json, models/model.pt, models/model.ts (when TorchScript works), docs/README.md."
        ),
    )
    parser.add_argument(
        "run", metavar="RUN", help="run directory (checkpoints/best.pt, else last.pt) or checkpoint file"
    )
    parser.add_argument("--output", "-o", required=True, help="bundle directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    parser.add_argument(
        "--input-format",
        choices=("nifti", "png"),
        help="what the bundle reads and writes (default: as the run's training data, NIfTI when unknown)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usema.bundle.export import export_bundle  # noqa: PLC0415 - heavy imports

    bundle = export_bundle(args.run, args.output, overwrite=args.overwrite, input_format=args.input_format)
    print(f"usema export: bundle written to {bundle}")
    return 0
