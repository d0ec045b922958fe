"""Export a trained run as a MONAI Bundle (SPEC §7) that `python -m monai.bundle run` can execute.

Layout written (atomically: built in a temporary sibling directory, then renamed into place)::

    BUNDLE/LICENSE
    BUNDLE/configs/metadata.json    schema-valid metadata (schema meta_schema_20240725)
    BUNDLE/configs/inference.json   MONAI pipeline equivalent to `usema infer` (no TTA)
    BUNDLE/configs/usema.json       the run's network arguments, recipe, norm stats, labels (for `usema infer`)
    BUNDLE/models/model.pt          state_dict
    BUNDLE/models/model.ts          TorchScript (scripted, else traced at the window size; absent if neither works)
    BUNDLE/docs/README.md

The only ``$`` expressions in inference.json build the network, the data list and the MONAI pipeline
(``ALLOWED_EXPRESSIONS``); nothing else runs when the bundle is parsed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

import usema
from usema.data.preprocess import STD_FLOOR
from usema.errors import UsemaError, os_reason
from usema.io.files import ensure_writable_dir
from usema.inference.model_loading import BUNDLE_USEMA_ARGS, LoadedModel, load_model

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
INPUT_FORMATS = ("nifti", "png")
# PILReader / PILWriter index images (x, y); usema's 2D layout is numpy's (row, column)
SWAP_PLANE = [0, 2, 1]
# every `$` expression the exported inference.json may contain (checked by the tests)
EXPR_DEVICE = "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"
EXPR_OUTPUT_DIR = "$@bundle_root + '/eval'"
EXPR_DATALIST = "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))"
EXPR_DATALIST_PNG = "$list(sorted(glob.glob(@dataset_dir + '/*.png')))"
EXPR_DATALIST_CHANNELS = (
    "$[[f[:-len('_0000.nii.gz')] + '_%04d.nii.gz' % c for c in range(@num_channels)]"
    " for f in sorted(glob.glob(@dataset_dir + '/*_0000.nii.gz'))]"
)
EXPR_DATA = "$[{'image': i} for i in @datalist]"
EXPR_NETWORK = "$@network_def.to(@device)"
EXPR_CKPT = "$@bundle_root + '/models/model.pt'"
ALLOWED_EXPRESSIONS = (
    "$import glob",
    EXPR_DEVICE,
    EXPR_OUTPUT_DIR,
    EXPR_DATALIST,
    EXPR_DATALIST_CHANNELS,
    EXPR_DATALIST_PNG,
    EXPR_DATA,
    EXPR_NETWORK,
    EXPR_CKPT,
    "$@checkpointloader(@evaluator)",
    "$@evaluator.run()",
)
# leading characters MONAI's ConfigParser interprets: expression, macro, reference
CONFIG_SYNTAX_PREFIXES = ("$", "%", "@")
LICENSE_TEXT = """Copyright (c) {authors}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle
except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and limitations under the License.

The model weights were trained on data whose own license and terms of use also apply to them.
"""


def network_def(model: LoadedModel) -> dict[str, Any]:
    """``network_def``: ``usema.nets.USEMA`` with the run's arguments, or ``usema.nets.build_network`` for peers."""
    args = model.network_args
    common = {
        "spatial_dims": int(args["spatial_dims"]),
        "in_channels": int(args["in_channels"]),
        "out_channels": int(args["out_channels"]),
        "preset": args.get("preset") or "base",
        "deep_supervision": bool(args.get("deep_supervision", False)),
    }
    overrides = dict(args.get("overrides") or {})
    if args["name"] == "usema":
        return {"_target_": "usema.nets.USEMA", **common, **overrides}
    patch = [int(p) for p in model.recipe["data"]["patch_size"]]
    return {"_target_": "usema.nets.build_network", "name": args["name"], **common, "img_size": patch, **overrides}


def normalization_transforms(scheme: str, stats: dict | None) -> list[dict[str, Any]]:
    """MONAI transforms equal to ``usema.data.preprocess.normalize(image, scheme, stats)``."""
    if scheme == "ct":
        lower, upper = float(stats["lower"]), float(stats["upper"])
        return [
            # two thresholds = an exact clip to [lower, upper]
            {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": lower, "above": True, "cval": lower},
            {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": upper, "above": False, "cval": upper},
            {
                "_target_": "NormalizeIntensityd",
                "keys": "image",
                "subtrahend": float(stats["mean"]),
                "divisor": max(float(stats["std"]), STD_FLOOR),
            },
        ]
    if scheme == "zscore":
        return [{"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}]
    if scheme == "rgb":
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": 0.0,
                "a_max": 255.0,
                "b_min": 0.0,
                "b_max": 1.0,
            }
        ]
    if scheme == "none":
        return []
    raise UsemaError(f"data.normalization: cannot export the scheme {scheme!r}")


def inferer_def(model: LoadedModel, input_format: str) -> dict[str, Any]:
    """The inferer `usema infer` uses: slice-wise for a 2D network on volumes, else native sliding windows."""
    settings = model.settings
    common = {
        "roi_size": list(settings.roi_size),
        "sw_batch_size": settings.sw_batch_size,
        "overlap": settings.overlap,
        "mode": "gaussian",
        "device": "cpu",  # stitch on the CPU so that GPU memory does not grow with the volume
    }
    if int(model.network_args["spatial_dims"]) == 2 and input_format == "nifti":
        if settings.slice_axis is None:
            raise UsemaError(f"{model.source}: recipe key data.slice_axis is needed to export a 2D model for volumes")
        return {"_target_": "SliceInferer", "spatial_dim": settings.slice_axis, **common}
    return {"_target_": "SlidingWindowInferer", **common}


def detect_input_format(recipe: dict[str, Any]) -> str:
    """ "png" when the run trained on 2D images (demo_nuclei, or an nnU-Net dataset with file_ending .png), else
    "nifti". The dataset may be gone at export time; then "nifti" (``usema export --input-format`` overrides)."""
    from usema.data.nnunet import resolve_root  # noqa: PLC0415 - the data package imports MONAI transforms

    data = recipe.get("data") or {}
    if data.get("source") == "demo_nuclei":
        return "png"
    if data.get("source") != "nnunet" or not data.get("root"):
        return "nifti"
    try:
        dataset_json = json.loads((resolve_root(data["root"]) / "dataset.json").read_text())
    except (UsemaError, OSError, ValueError):
        return "nifti"
    return "png" if dataset_json.get("file_ending") == ".png" else "nifti"


def _io_transforms(input_format: str, num_classes: int) -> tuple[list[dict], list[dict], str]:
    """(loading transforms, saving transforms, datalist expression) for NIfTI volumes or PNG images."""
    save = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "",
        "output_dtype": "uint8" if num_classes <= 256 else "uint16",
        "resample": False,
        "separate_folder": False,
        "print_log": False,
    }
    if input_format == "png":
        load = [
            {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "image_only": True, "dtype": "float32"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Transposed", "keys": "image", "indices": SWAP_PLANE},
        ]
        save_png = {**save, "output_ext": ".png", "writer": "PILWriter", "scale": None}
        return load, [{"_target_": "Transposed", "keys": "pred", "indices": SWAP_PLANE}, save_png], EXPR_DATALIST_PNG
    load = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True, "dtype": "float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    return load, [{**save, "output_ext": ".nii.gz"}], EXPR_DATALIST


def inference_config(model: LoadedModel, input_format: str = "nifti") -> dict[str, Any]:
    """configs/inference.json: load, normalise as in training, infer, argmax, save on the input grid."""
    load, save, datalist = _io_transforms(input_format, model.num_classes)
    if input_format == "nifti" and model.in_channels > 1:
        datalist = EXPR_DATALIST_CHANNELS
    preprocessing = [
        *load,
        *normalization_transforms(model.settings.normalization, model.norm_stats),
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "float32"},
    ]
    return {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "output_dir": EXPR_OUTPUT_DIR,
        "dataset_dir": "/workspace/data",
        "num_channels": model.in_channels,
        "datalist": datalist,
        "device": EXPR_DEVICE,
        "network_def": network_def(model),
        "network": EXPR_NETWORK,
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": EXPR_DATA, "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inferer_def(model, input_format),
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, *save],
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "amp": False,
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": EXPR_CKPT,
            "load_dict": {"model": "@network"},
            "map_location": "cpu",
        },
        "initialize": ["$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and bool(np.isfinite(value))


def eval_metrics(metrics: dict[str, Any]) -> dict[str, float | int]:
    """Validation scores of these weights: the last validated epoch of the checkpoint's metrics history.

    History rows are the trainer's ``{"epoch", "train_loss", "dice_<label>", "mean_dice", ...}``; best.pt's history
    ends with the epoch that made it best. Returns ``{"val_mean_dice", "val_dice_<label>"..., "epoch"}`` or {}.
    """
    rows = [r for r in metrics.get("history") or [] if isinstance(r, dict) and _is_number(r.get("mean_dice"))]
    if not rows:
        return {}
    row = rows[-1]
    scores = {
        f"val_{k}": float(v) for k, v in row.items() if (k == "mean_dice" or k.startswith("dice_")) and _is_number(v)
    }
    return {**scores, "epoch": int(row.get("epoch", len(rows)))}


def _by_value(labels: dict[str, str]) -> list[tuple[str, str]]:
    """Label items in numeric order of their values ("2" before "10")."""
    return sorted(labels.items(), key=lambda kv: int(kv[0]))


def _input_value_range(scheme: str, stats: dict | None) -> list[float]:
    """Range of the network input after normalisation ([] when unbounded)."""
    if scheme == "ct":
        std = max(float(stats["std"]), STD_FLOOR)
        return [(float(stats["lower"]) - stats["mean"]) / std, (float(stats["upper"]) - stats["mean"]) / std]
    return [0.0, 1.0] if scheme == "rgb" else []


def metadata(model: LoadedModel, run_name: str, input_format: str = "nifti") -> dict[str, Any]:
    """configs/metadata.json (all keys required by the MONAI schema, plus data and class descriptions)."""
    args, settings = model.network_args, model.settings
    labels = model.labels or {str(i): f"class {i}" for i in range(model.num_classes)}
    scheme = settings.normalization
    io_common = {"spatial_shape": list(settings.roi_size), "dtype": "float32", "is_patch_data": True}
    dims = {"png": "2D images", "nifti": "2D slices of 3D volumes" if int(args["spatial_dims"]) == 2 else "3D volumes"}
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by usema {usema.__version__} from run {run_name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "usema": usema.__version__,
            "nibabel": _version("nibabel"),
            "einops": _version("einops"),
        },
        "task": f"Segmentation of {', '.join(v for k, v in _by_value(labels) if k != '0')} ({run_name})",
        "description": (
            f"{args['name']} ({args.get('preset')}) segmentation model trained with usema on {dims[input_format]}; "
            f"intensity normalisation '{scheme}'; sliding-window inference with gaussian blending."
        ),
        "authors": "usema developers",
        "copyright": "Copyright (c) usema developers",
        "data_type": "nibabel" if input_format == "nifti" else "png",
        "image_classes": f"{model.in_channels} channel(s), normalisation '{scheme}'",
        "pred_classes": ", ".join(f"{k}: {v}" for k, v in _by_value(labels)),
        "eval_metrics": eval_metrics(model.metrics),
        "intended_use": "Research only; not for clinical diagnosis.",
        "references": [
            "Dayag, Tran, Xin. USEMA: a Scalable Efficient Mamba Like Attention for Medical Image Segmentation. "
            "arXiv 2605.11131 (2026)."
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if scheme == "ct" else "magnitude",
                    "num_channels": model.in_channels,
                    **io_common,
                    "value_range": _input_value_range(scheme, model.norm_stats),
                    "channel_def": {str(c): f"channel {c:04d}" for c in range(model.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": model.num_classes,
                    **io_common,
                    "value_range": [],
                    "channel_def": labels,
                }
            },
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(package)


def usema_args(model: LoadedModel, torchscript: str, input_format: str) -> dict[str, Any]:
    """configs/usema.json: what `usema infer BUNDLE` needs beyond the weights (plain JSON, never executed).

    ``torchscript`` records how models/model.ts was made ("script", "trace" or why it is absent).
    """
    return {
        "torchscript": torchscript,
        "input_format": input_format,
        "network": model.network_args,
        "recipe": model.recipe,
        "norm_stats": model.norm_stats,
        "labels": model.labels,
        "metrics": eval_metrics(model.metrics),
    }


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_torchscript(bundle: Path, model: LoadedModel) -> str:
    """models/model.ts through ``monai.bundle.ckpt_export``: scripted if possible, else traced at the window size.

    Returns how it was made ("script", "trace") or why it is absent.
    """
    from monai.bundle import ckpt_export  # noqa: PLC0415

    shape = [1, model.in_channels, *model.settings.roi_size]
    configs = bundle / "configs"
    failures = []
    for use_trace in (False, True):
        try:
            with warnings.catch_warnings():
                # tracing warns about every shape-dependent branch; the README states the traced input shape
                warnings.simplefilter("ignore")
                ckpt_export(
                    net_id="network_def",
                    filepath=str(bundle / "models" / "model.ts"),
                    ckpt_file=str(bundle / "models" / "model.pt"),
                    meta_file=str(configs / "metadata.json"),
                    config_file=str(configs / "inference.json"),
                    use_trace=use_trace,
                    input_shape=shape if use_trace else None,
                    bundle_root=str(bundle),
                )
            return "trace" if use_trace else "script"
        except Exception as exc:  # noqa: BLE001 - TorchScript support is optional: record why and move on
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            failures.append(f"{'trace' if use_trace else 'script'}: {type(exc).__name__}: {reason}")
    (bundle / "models" / "model.ts").unlink(missing_ok=True)
    return "not exported (" + "; ".join(failures) + ")"


def readme(model: LoadedModel, run_name: str, torchscript: str, input_format: str = "nifti") -> str:
    """docs/README.md: what the bundle does and the commands that check and run it."""
    meta = metadata(model, run_name, input_format)
    labels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    label_lines = "\n".join(f"- {k}: {v}" for k, v in _by_value(labels))
    scores = meta["eval_metrics"]
    metric_lines = "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in scores.items())
    metric_lines = metric_lines or "- no validated epoch recorded"
    settings = model.settings
    if int(model.network_args["spatial_dims"]) == 3:
        slicing = f"3D sliding windows {settings.roi_size}"
    elif input_format == "png":
        slicing = f"2D sliding windows {settings.roi_size}"
    else:
        slicing = f"slices along voxel axis {settings.slice_axis} (SliceInferer), in-plane windows {settings.roi_size}"
    ts_note = {
        "script": "models/model.ts is a scripted TorchScript module.",
        "trace": f"models/model.ts is traced at input shape {[1, model.in_channels, *settings.roi_size]}: feed it "
        "windows of exactly that size (the sliding-window inferer does).",
    }.get(torchscript, f"models/model.ts is absent: {torchscript}.")
    trace_flag = " --use_trace True" if torchscript == "trace" else ""
    return f"""# {run_name}: {model.network_args["name"]} segmentation bundle (usema {usema.__version__})

{meta["description"]}

## Input and output
- Input: {_input_note(input_format, model.in_channels)} No resampling or reorientation: the grid is used as is.
- Preprocessing: intensity normalisation `{settings.normalization}` with the training statistics
  (see configs/inference.json).
- Inference: {slicing}, overlap {settings.overlap}, gaussian blending, stitched on the CPU.
- Output: one label map per case in `output_dir`, same name as the input (no postfix), same grid and affine,
  integer labels:
{label_lines}

## Validation metrics of the run
{metric_lines}

## Commands (from the bundle directory)
```
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath meta_schema_20240725.json
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json{trace_flag}
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --dataset_dir /path/to/images --output_dir /path/to/output
usema infer . --input /path/to/images --output /path/to/output     # same segmentation, plus TTA and other formats
```
`usema` (pip install usema=={usema.__version__}) must be importable: the network is `usema.nets`.

{ts_note}

Research use only; not for clinical diagnosis.
"""


def _input_note(input_format: str, channels: int) -> str:
    if input_format == "png":
        return f"PNG images with {channels} channel(s) (`*.png` in `dataset_dir`)."
    if channels == 1:
        return "NIfTI volumes with 1 channel (`*.nii`/`*.nii.gz` in `dataset_dir`)."
    return f"NIfTI volumes with {channels} channels as nnU-Net files `CASE_0000.nii.gz`, `CASE_0001.nii.gz`, ..."


def check_plain_names(model: LoadedModel, run_name: str) -> None:
    """Class and run names are copied into the bundle's configs as data: refuse any that MONAI would parse.

    MONAI's ConfigParser runs strings starting with ``$``, reads the file a ``%`` macro names and resolves
    ``@`` references, also in metadata.json (``ckpt_export`` and ``run`` load it).
    """
    names = {f"labels.{k}": v for k, v in model.labels.items()} | {"name": run_name}
    for key, text in names.items():
        if text.startswith(CONFIG_SYNTAX_PREFIXES):
            raise UsemaError(
                f"{model.source}: {key}: expected a plain name, got {text!r} "
                "(MONAI bundle configs treat text starting with $, % or @ as code, file macro or reference)"
            )


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsemaError(f"{output}: expected a bundle directory, found a file")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsemaError(f"{output}: exists and is not empty; refusing to overwrite (pass --overwrite)")
    ensure_writable_dir(output.parent, "folder for the bundle")


def _replace_dir(built: Path, output: Path) -> None:
    """Move ``built`` to ``output``; an old ``output`` is removed only after the new one is in place."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / output.name)
    built.rename(output)
    if old is not None:
        shutil.rmtree(old)


def export_bundle(
    run: str | Path,
    output: str | Path,
    overwrite: bool = False,
    input_format: str | None = None,
) -> Path:
    """Export RUN (run dir or checkpoint) as a MONAI bundle at ``output``; returns the bundle directory.

    ``input_format`` ("nifti" or "png") is what the bundle reads and writes; None = as the run's training data.
    """
    output = Path(output)
    if input_format not in (None, *INPUT_FORMATS):
        raise UsemaError(f"--input-format: expected one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    _check_output(output, overwrite)
    model = load_model(run, "cpu")
    input_format = input_format or detect_input_format(model.recipe)
    run_name = str(model.recipe.get("name") or Path(run).name)
    check_plain_names(model, run_name)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    build.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        (build / "LICENSE").write_text(LICENSE_TEXT.format(authors="usema developers"))
        _write_json(build / "configs" / "metadata.json", metadata(model, run_name, input_format))
        _write_json(build / "configs" / "inference.json", inference_config(model, input_format))
        (build / "models").mkdir()
        torch.save(model.network.state_dict(), build / "models" / "model.pt")
        torchscript = write_torchscript(build, model)
        _write_json(build / BUNDLE_USEMA_ARGS, usema_args(model, torchscript, input_format))
        (build / "docs").mkdir()
        (build / "docs" / "README.md").write_text(readme(model, run_name, torchscript, input_format))
        _replace_dir(build, output)
    except OSError as exc:  # disk full or permissions: the bundle is built aside, so the old one is untouched
        raise UsemaError(f"{output}: could not write the bundle ({os_reason(exc)}); the previous one is kept") from exc
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return output
