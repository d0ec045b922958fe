"""``usema datasets check ROOT`` and ``usema datasets export-demo {brain,nuclei} --output DIR [--tiles N]
[--heldout-slices]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import tifffile

from usema.data import demos, nnunet
from usema.errors import UsemaError
from usema.io.files import atomic_path, atomic_write_text, refuse_existing


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``usema datasets`` with its ``check`` and ``export-demo`` actions."""
    parser = subparsers.add_parser("datasets", help="inspect nnU-Net dataset folders; export the demo data")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    check = actions.add_parser("check", help="report a dataset folder's cases and every problem (exit 2 if any)")
    check.add_argument("root", help="DatasetXXX_Name folder (relative paths use $nnUNet_raw when set)")
    check.set_defaults(func=run_check)
    export = actions.add_parser("export-demo", help="write a demo image and its labels as an nnU-Net style folder")
    export.add_argument("demo", choices=["brain", "nuclei"])
    export.add_argument("--output", required=True, help="folder to create (imagesTs/, labelsTs/, dataset.json)")
    export.add_argument("--target", choices=sorted(demos.NUCLEI_LABELS), default="binary",
                        help="nuclei label classes (default: binary)")
    export.add_argument("--tiles", type=int, default=None, metavar="N",
                        help="nuclei: cut the training columns 0-383 into N x N training cases (imagesTr/labelsTr); "
                        "the held-out columns 384-511 become the test case")
    export.add_argument("--heldout-slices", action="store_true",
                        help="brain: write only the held-out axial slab (z 95-114), one test case per slice, so "
                        "that per-case statistics (usema compare) have cases")
    export.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    export.set_defaults(func=run_export)


def _range(values: list) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo} .. {hi}"


def format_report(ds: nnunet.NnunetDataset, summaries: list[nnunet.CaseSummary]) -> str:
    """Human-readable summary of a checked dataset (what ``usema datasets check`` prints)."""
    train = {c.name for c in ds.train}
    decoded = [s for s in summaries if s.name in train]
    dims = sorted({len(s.shape) for s in summaries})
    lines = [
        f"dataset: {ds.root}",
        f"channels: {', '.join(f'{k}={v}' for k, v in ds.channel_names.items())}",
        f"labels: {', '.join(f'{k}={v}' for k, v in ds.labels.items())}",
        f"training cases: {len(ds.train)} usable of {ds.listed} (numTraining {ds.num_training}); "
        f"test cases: {len(ds.test)}; file ending {ds.file_ending}",
        f"image dims: {'/'.join(f'{d}D' for d in dims) or '-'}",
    ]
    for axis in range(max(dims, default=0)):
        sizes = [s.shape[axis] for s in summaries if len(s.shape) > axis]
        spacings = [round(s.spacing[axis], 3) for s in summaries if len(s.spacing) > axis]
        median = f"{np.median(spacings):g}"
        lines.append(f"  axis {axis}: size {_range(sizes)}, spacing {_range(spacings)} (median {median})")
    present = sorted({v for s in decoded for v in s.label_values})
    lines.append(f"label values present in labelsTr: {present}")
    if ds.problems:
        lines.append(f"problems ({len(ds.problems)}):")
        lines += [f"  - {p}" for p in ds.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    ds, summaries = nnunet.check_dataset(args.root)
    print(format_report(ds, summaries))
    return 2 if ds.problems else 0


def _write(path: Path, write: Callable[[Path], object]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _dataset_json(channel: str, labels: dict[int, str], ending: str, num_training: int = 0) -> str:
    meta = {
        "channel_names": {"0": channel},
        "labels": {name: value for value, name in labels.items()},
        "numTraining": num_training,
        "file_ending": ending,
    }
    return json.dumps(meta, indent=2) + "\n"


def export_brain(output: Path, overwrite: bool = False) -> list[Path]:
    """Write the MNI152 T1 (float32) and its tissue labels as NIfTI with the template's affine."""
    demo = demos.load_brain()
    image, label = output / "imagesTs" / "mni152_0000.nii.gz", output / "labelsTs" / "mni152.nii.gz"
    meta = output / "dataset.json"
    refuse_existing([image, label, meta], overwrite, "demo dataset file")
    _write(image, lambda p: nib.save(nib.Nifti1Image(demo.t1, demo.affine), str(p)))
    _write(label, lambda p: nib.save(nib.Nifti1Image(demo.label, demo.affine), str(p)))
    atomic_write_text(meta, _dataset_json("T1", demos.BRAIN_LABELS, ".nii.gz"))
    return [image, label, meta]


def export_brain_heldout_slices(output: Path, overwrite: bool = False) -> list[Path]:
    """Write each axial slice of the held-out slab as its own test case ``mni152_zNNN`` (one-slice NIfTI whose
    affine places it where it lies in the template), with its tissue labels."""
    demo = demos.load_brain()
    slab = range(*demos.BRAIN_VAL_SLAB)
    planned = [(output / "imagesTs" / f"mni152_z{z:03d}_0000.nii.gz", output / "labelsTs" / f"mni152_z{z:03d}.nii.gz",
                z) for z in slab]
    meta = output / "dataset.json"
    refuse_existing([p for image, label, _ in planned for p in (image, label)] + [meta], overwrite,
                    "demo dataset file")
    for image, label, z in planned:
        affine = demo.affine.copy()
        affine[:3, 3] = demo.affine[:3, :3] @ np.array([0.0, 0.0, float(z)]) + demo.affine[:3, 3]
        for path, data in ((image, demo.t1), (label, demo.label)):
            _write(path, lambda p, d=data, a=affine, z=z: nib.save(nib.Nifti1Image(d[..., z:z + 1], a), str(p)))
    atomic_write_text(meta, _dataset_json("T1", demos.BRAIN_LABELS, ".nii.gz"))
    return [p for image, label, _ in planned for p in (image, label)] + [meta]


def export_nuclei(output: Path, target: str = "binary", overwrite: bool = False) -> list[Path]:
    """Write the nuclei image (uint16 TIFF, as shipped) and its ``target`` class labels (uint8 TIFF)."""
    files = demos.nuclei_files()
    raw, instances = tifffile.imread(files["image"]), tifffile.imread(files["mask"])
    image, label = output / "imagesTs" / "nuclei_0000.tif", output / "labelsTs" / "nuclei.tif"
    meta = output / "dataset.json"
    refuse_existing([image, label, meta], overwrite, "demo dataset file")
    _write(image, lambda p: tifffile.imwrite(p, raw))
    _write(label, lambda p: tifffile.imwrite(p, demos.instance_to_semantic(instances, target)))
    atomic_write_text(meta, _dataset_json("fluorescence", demos.NUCLEI_LABELS[target], ".tif"))
    return [image, label, meta]


def export_nuclei_tiles(output: Path, tiles: int, target: str = "binary", overwrite: bool = False) -> list[Path]:
    """The training columns 0..383 as ``tiles`` x ``tiles`` nnU-Net training cases ``nuclei_NNN`` (row by row),
    the held-out columns 384..511 as the test case ``nuclei_test`` (imagesTs/labelsTs): cross-validation on
    the tiles never sees the held-out columns."""
    files = demos.nuclei_files()
    raw, instances = tifffile.imread(files["image"]), tifffile.imread(files["mask"])
    label = demos.instance_to_semantic(instances, target)
    cut = demos.nuclei_tiles(tiles, raw.shape)
    split = demos.NUCLEI_VAL_COLUMN
    cases = [("Tr", f"nuclei_{i:03d}", window) for i, window in enumerate(cut)]
    cases.append(("Ts", "nuclei_test", (slice(None), slice(split, None))))
    planned = [(output / f"images{part}" / f"{name}_0000.tif", output / f"labels{part}" / f"{name}.tif", window)
               for part, name, window in cases]
    meta = output / "dataset.json"
    refuse_existing([p for image, lab, _ in planned for p in (image, lab)] + [meta], overwrite, "demo dataset file")
    for image, lab, window in planned:
        _write(image, lambda p, w=window: tifffile.imwrite(p, np.ascontiguousarray(raw[w])))
        _write(lab, lambda p, w=window: tifffile.imwrite(p, np.ascontiguousarray(label[w])))
    atomic_write_text(meta, _dataset_json("fluorescence", demos.NUCLEI_LABELS[target], ".tif", len(cut)))
    return [p for image, lab, _ in planned for p in (image, lab)] + [meta]


def run_export(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.tiles is not None and args.demo != "nuclei":
        raise UsemaError("--tiles: only the nuclei demo is cut into tiles")
    if args.heldout_slices and args.demo != "brain":
        raise UsemaError("--heldout-slices: only the brain demo has a held-out slab")
    if args.demo == "brain":
        written = (export_brain_heldout_slices if args.heldout_slices else export_brain)(output, args.overwrite)
    elif args.tiles is not None:
        written = export_nuclei_tiles(output, args.tiles, args.target, args.overwrite)
    else:
        written = export_nuclei(output, args.target, args.overwrite)
    for path in written:
        print(path)
    return 0
