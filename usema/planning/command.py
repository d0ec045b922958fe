"""``usema plan DATASET --output recipe.yaml``: fingerprint an nnU-Net raw dataset and write a planned recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, ensure_writable_dir, refuse_existing

HELP = "fingerprint an nnU-Net dataset and plan a recipe (spacing, patch, batch, stages) for a memory budget"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help=HELP,
        description="Read DATASET (nnU-Net raw: dataset.json, imagesTr, labelsTr), measure its fingerprint and "
        "write a complete recipe with nnU-Net's planning rules, plus fingerprint.json beside it.",
    )
    parser.add_argument("dataset", metavar="DATASET", help="DatasetXXX_Name folder (or a name under $nnUNet_raw)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D (slice-wise) or 3D network (default 2)")
    parser.add_argument("--gpu-memory", type=float, default=8.0, metavar="GIB",
                        help="memory budget of one training step in GiB (default 8, nnU-Net's reference)")
    parser.add_argument("--preset", choices=("tiny", "small", "base"), default="base", help="USEMA size (default base)")
    parser.add_argument("--name", help="run name in the recipe (default: the dataset folder name and dims)")
    parser.add_argument("--fingerprint", type=Path, metavar="JSON",
                        help="plan from this stored fingerprint.json instead of reading the images again")
    parser.add_argument("--output", "-o", required=True, type=Path, help="recipe file to write (.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing recipe and fingerprint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usema.config import load_yaml, recipe_from_dict  # noqa: PLC0415 - heavy imports only when planning
    from usema.planning.fingerprint import fingerprint_dataset, read_fingerprint  # noqa: PLC0415
    from usema.planning.memory import training_memory_bytes  # noqa: PLC0415
    from usema.planning.planner import plan_experiment  # noqa: PLC0415
    from usema.planning.recipe_text import recipe_text  # noqa: PLC0415

    output: Path = args.output
    if output.suffix not in (".yaml", ".yml"):
        raise UsemaError(f"--output: expected a .yaml recipe file name, got {output}")
    if not args.gpu_memory > 0:
        raise UsemaError(f"--gpu-memory: expected a positive number of GiB, got {args.gpu_memory}")
    fingerprint_path = output.parent / "fingerprint.json"
    refuse_existing([output, *([] if args.fingerprint == fingerprint_path else [fingerprint_path])], args.overwrite,
                    "plan")
    ensure_writable_dir(output.parent, "folder for the recipe")
    fingerprint = read_fingerprint(args.fingerprint) if args.fingerprint else fingerprint_dataset(args.dataset)
    channels = len(fingerprint["channel_names"])
    classes = max(int(k) for k in fingerprint["labels"]) + 1

    def estimate(patch, batch, overrides):
        return training_memory_bytes(args.dims, channels, classes, patch, batch, preset=args.preset,
                                     overrides=overrides)

    plan = plan_experiment(fingerprint, args.dims, args.gpu_memory, estimate, preset=args.preset)
    name = args.name or f"{fingerprint['dataset']}_{args.dims}d"
    text = recipe_text(plan, fingerprint, str(args.dataset), name)
    recipe_from_dict(load_yaml(text, str(output)), str(output))  # only a recipe `usema train` accepts is written
    if args.fingerprint != fingerprint_path:
        atomic_write_text(fingerprint_path, json.dumps(fingerprint, indent=1) + "\n")
    atomic_write_text(output, text)
    print(f"usema plan: wrote {output} and {fingerprint_path}")
    print(text, end="")
    return 0
