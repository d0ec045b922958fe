"""configs/inference.json and configs/usema.json: a trained run translated into MONAI bundle configuration.

The only ``$`` expressions in inference.json build the network, the data list and the MONAI pipeline
(``ALLOWED_EXPRESSIONS``); every other value is data taken from the validated network spec and recipe, so
nothing else runs when the bundle is parsed.
"""

from __future__ import annotations

import json
from typing import Any

from usema.config import Recipe, recipe_to_dict
from usema.data.preprocess import STD_FLOOR
from usema.errors import UsemaError
from usema.inference.model_loading import LoadedModel
from usema.run.spec import spec_to_dict

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


def network_def(model: LoadedModel) -> dict[str, Any]:
    """``network_def``: ``usema.nets.USEMA`` with the run's arguments, or ``usema.nets.build_network`` for peers."""
    spec = model.spec
    common = {
        "spatial_dims": spec.spatial_dims,
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "preset": spec.preset,
        "deep_supervision": spec.deep_supervision,
    }
    if spec.name == "usema":
        return {"_target_": "usema.nets.USEMA", **common, **spec.overrides}
    patch = list(model.recipe.data.patch_size)
    return {"_target_": "usema.nets.build_network", "name": spec.name, **common, "img_size": patch, **spec.overrides}


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
    if model.spatial_dims == 2 and input_format == "nifti":
        return {"_target_": "SliceInferer", "spatial_dim": settings.slice_axis, **common}
    return {"_target_": "SlidingWindowInferer", **common}


def detect_input_format(recipe: Recipe) -> str:
    """ "png" when the run trained on 2D images (demo_nuclei, or an nnU-Net dataset with file_ending .png), else
    "nifti". The dataset may be gone at export time; then "nifti" (``usema export --input-format`` overrides)."""
    from usema.data.nnunet import resolve_root  # noqa: PLC0415 - the data package imports MONAI transforms

    data = recipe.data
    if data.source == "demo_nuclei":
        return "png"
    if data.source != "nnunet" or not data.root:
        return "nifti"
    try:
        dataset_json = json.loads((resolve_root(data.root) / "dataset.json").read_text())
    except (UsemaError, OSError, ValueError):
        return "nifti"
    return "png" if isinstance(dataset_json, dict) and dataset_json.get("file_ending") == ".png" else "nifti"


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



def usema_args(model: LoadedModel, torchscript: str, input_format: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """configs/usema.json: what `usema infer BUNDLE` needs beyond the weights (plain JSON, never executed).

    ``torchscript`` records how models/model.ts was made ("script", "trace" or why it is absent).
    """
    return {
        "torchscript": torchscript,
        "input_format": input_format,
        "network": spec_to_dict(model.spec),
        "recipe": recipe_to_dict(model.recipe),
        "norm_stats": model.norm_stats,
        "labels": model.labels,
        "metrics": metrics,
    }
