"""The bundle's descriptions: configs/metadata.json (MONAI schema), docs/README.md and LICENSE text."""

from __future__ import annotations

from typing import Any

import monai
import numpy as np
import torch

import usema
from usema.data.preprocess import STD_FLOOR
from usema.inference.model_loading import LoadedModel

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
LICENSE_TEXT = """Copyright (c) {authors}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle
except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and limitations under the License.

The model weights were trained on data whose own license and terms of use also apply to them.
"""



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
    spec, settings = model.spec, model.settings
    labels = model.labels or {str(i): f"class {i}" for i in range(model.num_classes)}
    scheme = settings.normalization
    io_common = {"spatial_shape": list(settings.roi_size), "dtype": "float32", "is_patch_data": True}
    dims = {"png": "2D images", "nifti": "2D slices of 3D volumes" if spec.spatial_dims == 2 else "3D volumes"}
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
            f"{spec.name} ({spec.preset}) segmentation model trained with usema on {dims[input_format]}; "
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


def readme(model: LoadedModel, run_name: str, torchscript: str, input_format: str = "nifti") -> str:
    """docs/README.md: what the bundle does and the commands that check and run it."""
    meta = metadata(model, run_name, input_format)
    labels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    label_lines = "\n".join(f"- {k}: {v}" for k, v in _by_value(labels))
    scores = meta["eval_metrics"]
    metric_lines = "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in scores.items())
    metric_lines = metric_lines or "- no validated epoch recorded"
    settings = model.settings
    if model.spatial_dims == 3:
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
    return f"""# {run_name}: {model.spec.name} segmentation bundle (usema {usema.__version__})

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

