"""`usema infer` end to end: find cases, preprocess as in training, predict, write on the input's grid.

One case is held in memory at a time; windows run on the chosen device while the stitched logits stay on the
CPU, so GPU memory does not grow with the volume, and a 2D network segments a volume in blocks of slices, so
CPU memory does not grow with the number of classes. An ensemble's members predict each block one after
another into one running mean of probabilities. Only the network forward runs at ``--precision`` (and compiled
with ``--compile``); blending, softmax, means, resampling and argmax stay float32. Every output is written
atomically.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from usema.data.preprocess import normalize
from usema.data.resample import probability_blocks, resample_image
from usema.errors import UsemaError
from usema.faults import fault_point
from usema.io.files import ensure_writable_dir, refuse_existing
from usema.io.images import (
    Case,
    find_cases,
    label_dtype,
    probability_path,
    read_image,
    result_suffix,
    write_label,
    write_probabilities,
)
from usema.io.labels import geometry_spacing
from usema.inference.ensemble import check_compatible, expand_models
from usema.inference.model_loading import LoadedModel, load_model, place_for_inference
from usema.inference.postprocessing import Postprocessing, postprocess, read_decision
from usema.inference.precision import autocast_dtype, autocast_forward, precision_name
from usema.inference.predictor import make_inferer, predict_logits
from usema.run.compilation import compile_failures, compile_module
from usema.run.device import resolve_device

# stitched logits held at once when a 2D network segments a volume block of slices by block of slices
LOGITS_BUDGET_BYTES = 64 * 2**20


@dataclass
class InferenceOptions:
    """User choices on top of the recipe's; None means "as in the recipe"."""

    device: str = "cpu"
    overlap: float | None = None
    sw_batch_size: int | None = None
    tta: bool = False
    save_probabilities: bool = False
    overwrite: bool = False
    progress: bool = True
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (usema.inference.precision)
    compile: bool = False


# what a failed --compile tells the user to do instead
_COMPILE_REMEDY = "run without --compile"


@dataclass
class InferenceSummary:
    """What a run did: cases and voxels segmented, seconds after the model was loaded, files written, and the
    network's precision (``fp32``, ``bf16``, ``fp16``) and whether it was compiled."""

    cases: int
    voxels: int
    seconds: float
    outputs: list[Path]
    precision: str = "fp32"
    compiled: bool = False

    def line(self) -> str:
        """One human-readable summary line with the throughput."""
        secs = max(self.seconds, 1e-9)
        how = self.precision + (", compiled" if self.compiled else "")
        return (
            f"{self.cases} case(s), {self.voxels} voxels in {self.seconds:.1f} s "
            f"({self.cases / secs:.3f} cases/s, {self.voxels / secs:.3g} voxels/s; {how})"
        )


def preprocess(image: np.ndarray, model: LoadedModel, name: str = "image", in_place: bool = False) -> torch.Tensor:
    """Normalise ``image`` (C, *spatial) exactly as in training; returns (1, C, *spatial) float32 on the CPU.

    ``name`` (the case's file) is what errors name; ``in_place`` reuses a float32 ``image``'s memory.
    """
    normalized = normalize(image, model.settings.normalization, model.norm_stats, name=name, in_place=in_place)
    return torch.from_numpy(normalized)[None]  # as strided as read (NIfTI is x-fastest): no whole-image copy


def check_image(image: np.ndarray, path: Path, model: LoadedModel) -> None:
    """The image must have the model's channel count and a grid the network can slide over."""
    if image.shape[0] != model.in_channels:
        raise UsemaError(
            f"{path}: expected {model.in_channels} channel(s) for this model, got {image.shape[0]} "
            "(multi-channel cases are CASE_0000, CASE_0001, ... files)"
        )
    image_dims, net_dims = image.ndim - 1, model.spatial_dims
    if net_dims == 2 and image_dims == 3 and model.settings.slice_axis is None:
        raise UsemaError(f"{model.source}: recipe key data.slice_axis is needed to run a 2D model on {path}")
    if net_dims > image_dims:
        raise UsemaError(f"{path}: expected a {net_dims}D image for this {net_dims}D model, got a {image_dims}D one")


def _logits(
    model: LoadedModel, normalized: torch.Tensor, options: InferenceOptions, device: torch.device
) -> torch.Tensor:
    """Class logits (K, *spatial) float32 on the CPU for a normalised image (1, C, *spatial)."""
    settings = model.settings
    inferer = make_inferer(
        roi_size=settings.roi_size,
        image_spatial_dims=normalized.ndim - 2,
        net_spatial_dims=model.spatial_dims,
        slice_axis=settings.slice_axis,
        overlap=settings.overlap if options.overlap is None else options.overlap,
        sw_batch_size=settings.sw_batch_size if options.sw_batch_size is None else options.sw_batch_size,
        device="cpu",
        sw_device=device,
    )
    with compile_failures("--compile", _COMPILE_REMEDY, enabled=options.compile):
        return predict_logits(_forward(model, options, device), normalized, inferer, tta=options.tta)[0].float()


def _forward(model: LoadedModel, options: InferenceOptions, device: torch.device) -> torch.nn.Module:
    """The network as ``options`` run it: under ``--precision``'s autocast, compiled once per model with
    ``--compile``."""
    dtype = autocast_dtype(options.precision, device)
    if not options.compile:
        return autocast_forward(model.network, dtype, device)
    key = (dtype, device.type)
    if key not in model.compiled:
        model.compiled[key] = compile_module(autocast_forward(model.network, dtype, device), "--compile",
                                             _COMPILE_REMEDY)
    return model.compiled[key]


@torch.no_grad()
def predict_case(
    model: LoadedModel,
    image: np.ndarray,
    options: InferenceOptions,
    device: torch.device,
    name: str = "image",
) -> torch.Tensor:
    """Class logits (K, *spatial) float32 on the CPU for a raw image (C, *spatial) named ``name`` in errors."""
    return _logits(model, preprocess(image, model, name), options, device)


def slice_chunks(model: LoadedModel, spatial: tuple[int, ...]) -> tuple[int, list[slice]]:
    """(axis, chunks) to predict separately: blocks of whole slices for a 2D network on a volume, else one chunk.

    Slices are predicted independently (windows never span two slices), so blocks give the same logits as the
    whole volume while holding at most ``LOGITS_BUDGET_BYTES`` of logits at a time.
    """
    if not (model.spatial_dims == 2 and len(spatial) == 3):
        return 0, [slice(None)]
    axis = int(model.settings.slice_axis)
    slice_bytes = 4 * model.num_classes * int(np.prod(spatial)) // spatial[axis]
    step = max(1, LOGITS_BUDGET_BYTES // slice_bytes)
    return axis, [slice(i, min(i + step, spatial[axis])) for i in range(0, spatial[axis], step)]


@torch.no_grad()
def segment_case(
    model: LoadedModel | Sequence[LoadedModel],
    image: np.ndarray,
    options: InferenceOptions,
    device: torch.device,
    name: str = "image",
    in_place: bool = False,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (*spatial) and, with ``options.save_probabilities``, softmax probabilities (K, *spatial) float32.

    The image (C, *spatial) with voxel ``spacing`` (mm) is normalised whole (per-image statistics; overwriting
    ``image`` when ``in_place``), then predicted in ``slice_chunks``; a model trained at ``data.target_spacing``
    predicts each chunk there and its probabilities come back onto the input's grid before the argmax. An
    ensemble (several compatible models, :func:`usema.inference.ensemble.check_compatible`) averages its members'
    softmax probabilities chunk by chunk, one member's scores at a time.
    """
    members = [model] if isinstance(model, LoadedModel) else list(model)
    first = members[0]
    normalized = preprocess(image, first, name, in_place)
    spatial = tuple(image.shape[1:])
    labels = np.empty(spatial, dtype=label_dtype(first.num_classes))
    probs = np.empty((first.num_classes, *spatial), np.float32) if options.save_probabilities else None
    axis, chunks = slice_chunks(first, spatial)
    for chunk in chunks:
        index = tuple(chunk if a == axis else slice(None) for a in range(len(spatial)))
        block = normalized[(slice(None), slice(None), *index)].contiguous()
        for within, scores, are_probabilities in _chunk_scores(members, block, options, device, spacing, name):
            where = tuple(_compose(outer, inner) for outer, inner in zip(index, within))
            labels[where] = scores.argmax(axis=0)
            if probs is not None:
                probs[(slice(None), *where)] = scores if are_probabilities else _softmax(scores)
    return labels, probs


def _chunk_scores(
    members: list[LoadedModel], block: torch.Tensor, options: InferenceOptions, device: torch.device,
    spacing: Sequence[float] | None, name: str,
) -> Iterator[tuple[tuple[slice, ...], np.ndarray, bool]]:
    """(where in the block, class scores (K, *part), whether they are probabilities) for a normalised block.

    Without a target spacing: the block's logits (one model) or mean probabilities (an ensemble) at once. With
    one: the block resampled to the target spacing, the mean softmax probabilities there, returned to the block's
    grid part by part (``probability_blocks``).
    """
    shape = tuple(block.shape[2:])
    target = members[0].recipe.data.target_spacing
    if target is None:
        everywhere = tuple(slice(None) for _ in shape)
        if len(members) == 1:
            yield everywhere, _logits(members[0], block, options, device).numpy(), False
        else:
            yield everywhere, _mean_probabilities(members, block, options, device), True
        return
    if spacing is None or len(spacing) != len(target):
        raise UsemaError(f"{name}: this model predicts at data.target_spacing {target}; expected an image with "
                         f"{len(target)} voxel spacings, got {None if spacing is None else list(spacing)}")
    at_target = torch.from_numpy(resample_image(block[0].numpy(), spacing, target))[None]
    kept = [a for a, t in enumerate(target) if t is None]
    axis = kept[0] if kept else len(shape) - 1
    for part, scores in probability_blocks(_mean_probabilities(members, at_target, options, device), shape, axis):
        yield tuple(part if a == axis else slice(None) for a in range(len(shape))), scores, True


def _mean_probabilities(
    members: list[LoadedModel], block: torch.Tensor, options: InferenceOptions, device: torch.device
) -> np.ndarray:
    """Mean over ``members`` of the softmax probabilities (K, *spatial) float32 of a normalised block."""
    total = _softmax(_logits(members[0], block, options, device).numpy())
    for member in members[1:]:
        total += _softmax(_logits(member, block, options, device).numpy())
    if len(members) > 1:
        total /= np.float32(len(members))
    return total


def _compose(outer: slice, inner: slice) -> slice:
    """The slice ``inner`` taken within the slice ``outer`` (both with step 1; ``slice(None)`` = everything)."""
    start = outer.start or 0
    if inner.start is None and inner.stop is None:
        return outer
    return slice(start + (inner.start or 0), start + inner.stop)


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=0).numpy()


def output_path(case: Case, output_dir: Path) -> Path:
    """``OUTPUT/CASE<suffix>``: the case name without channel postfix, in the input's format (``.mha`` for ``.mhd``)."""
    return output_dir / f"{case.name}{result_suffix(case.suffix)}"


def _refuse_existing_outputs(cases: list[Case], output_dir: Path, options: InferenceOptions) -> None:
    """Check every file this run will write: never an input, never twice, no existing result without --overwrite.

    Two inputs can map to one output (``a.png`` and ``a.tif`` share ``a_prob.tif``; ``x.nii.gz``'s
    probabilities are ``x_prob.nii.gz``, the labels of an input of that name): refused before anything is written.
    """
    inputs = {p.resolve() for case in cases for p in case.paths}
    planned: dict[Path, Path] = {}
    for case in cases:
        label = output_path(case, output_dir)
        outputs = [label, probability_path(label, case.suffix)] if options.save_probabilities else [label]
        for path in outputs:
            other = planned.setdefault(path, case.paths[0])
            if other != case.paths[0]:
                raise UsemaError(f"{path}: would be written for both {other} and {case.paths[0]}; rename one of them")
    for path in planned:
        if path.resolve() in inputs:
            raise UsemaError(f"{path}: the output would replace an input image; choose another --output")
    refuse_existing(planned, options.overwrite, "prediction")


def infer_case(
    model: LoadedModel | Sequence[LoadedModel], case: Case, output_dir: Path, options: InferenceOptions,
    device: torch.device, postprocessing: Postprocessing | None = None,
) -> int:
    """Segment one case (one model or an ensemble), post-process the labels when a decision is given, and write
    the label map (and the probabilities, before post-processing); returns its voxel count."""
    first = model if isinstance(model, LoadedModel) else model[0]
    image, geometry = read_image(case.paths)
    check_image(image, case.paths[0], first)
    labels, probs = segment_case(model, image, options, device, name=str(case.paths[0]), in_place=True,
                                 spacing=geometry_spacing(geometry))
    if postprocessing is not None:
        labels = postprocess(labels, postprocessing, list(range(1, first.num_classes)))
    label_file = output_path(case, output_dir)
    if probs is not None:
        write_probabilities(probability_path(label_file, case.suffix), probs, geometry)
    write_label(label_file, labels, geometry)
    return int(labels.size)


def load_models(models: Sequence[str | Path], device: torch.device) -> tuple[list[LoadedModel], Postprocessing | None]:
    """The members of MODEL [MODEL ...] (a cv directory stands for its folds), checked to be compatible, and the
    post-processing to apply (a single cv directory's choice, else None)."""
    paths, decision_file = expand_models(models)
    members = [load_model(path, device) for path in paths]
    check_compatible(members)
    return members, None if decision_file is None else read_decision(decision_file)


def run_inference(
    model: str | Path | LoadedModel | Sequence[str | Path],
    input_path: str | Path,
    output_dir: str | Path,
    options: InferenceOptions | None = None,
) -> InferenceSummary:
    """Segment every case under ``input_path`` into ``output_dir`` with MODEL: a path or loaded model, or several
    paths (run directories, checkpoints, bundles, cv directories) whose probabilities are averaged."""
    options = options or InferenceOptions()
    device = resolve_device(options.device)
    precision = precision_name(autocast_dtype(options.precision, device))  # refused before anything is read
    output_dir = Path(output_dir)
    cases = find_cases(input_path)
    _refuse_existing_outputs(cases, output_dir, options)
    if isinstance(model, LoadedModel):
        members, decision = [model], None
    else:
        members, decision = load_models([model] if isinstance(model, (str, Path)) else model, device)
    ensure_writable_dir(output_dir)
    for member in members:
        place_for_inference(member.network, device)
    start, voxels, outputs = time.perf_counter(), 0, []
    bar = tqdm(cases, unit="case", file=sys.stderr, disable=not options.progress, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case.name)
        voxels += infer_case(members, case, output_dir, options, device, decision)
        outputs.append(output_path(case, output_dir))
        fault_point("infer.case_done")
    return InferenceSummary(len(cases), voxels, time.perf_counter() - start, outputs, precision, options.compile)
