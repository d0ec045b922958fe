"""Train every fold of a recipe one after another, predict each fold's validation cases with that fold's final
model, score the cross-validation predictions over all training cases and choose the post-processing.

Resumable: a fold whose ``last.pt`` reached the recipe's last step is not retrained; an interrupted fold
continues with ``usema train --resume`` semantics. Predictions and results are recomputed on every run (they
are cheap next to training, and written atomically).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from usema.config import Recipe, load_recipe, recipe_to_dict
from usema.crossval.postprocessing import choose_for_folders
from usema.data import nnunet
from usema.data.splits import load_or_create_splits
from usema.errors import UsemaError
from usema.evaluation.evaluate import evaluate_folders
from usema.evaluation.results import write_results
from usema.inference.ensemble import CV_EVALUATION, CV_POSTPROCESSING, CV_PREDICTIONS, fold_dir
from usema.inference.model_loading import load_model, place_for_inference
from usema.inference.pipeline import InferenceOptions, infer_case
from usema.inference.postprocessing import Postprocessing, write_decision
from usema.io.files import ensure_writable_dir
from usema.io.images import find_cases
from usema.run.checkpoint import load_checkpoint
from usema.run.device import resolve_device
from usema.run.layout import LAST, checkpoint_path, has_run
from usema.training import command as train_command
from usema.training.trainer import training_autocast_dtype


@dataclass
class CvSummary:
    """What a cross-validation produced: per-fold and overall mean Dice, the decision, seconds per fold."""

    fold_dice: dict[int, float]
    mean_dice: float
    postprocessing: Postprocessing
    trained: list[int] = field(default_factory=list)
    fold_seconds: dict[int, float] = field(default_factory=dict)


def check_cv_recipe(recipe: Recipe, source: str) -> None:
    """Cross-validation needs an nnU-Net dataset and leaves the fold to ``usema cv``."""
    if recipe.data.source != "nnunet":
        raise UsemaError(f"{source}: data.source: usema cv needs an nnunet dataset, got {recipe.data.source!r} "
                         "(the nuclei demo as cases: usema datasets export-demo nuclei --tiles 4)")
    if recipe.evaluation.protocol == "neurips_cell":
        raise UsemaError(f"{source}: evaluation.protocol: neurips_cell scores instance masks, which labelsTr does "
                         "not hold; use --set evaluation.protocol=generic (with evaluation.instance_f1) for usema cv")
    if recipe.train.fold is not None:
        raise UsemaError(f"{source}: train.fold: expected null for usema cv (it trains every fold), "
                         f"got {recipe.train.fold}")


def fold_finished(run_dir: Path, recipe: Recipe) -> bool:
    """True when ``run_dir``'s ``last.pt`` is the recipe's final state (a changed recipe is refused)."""
    last = checkpoint_path(run_dir, LAST)
    if not last.is_file():
        return False
    ckpt = load_checkpoint(last)
    train_command.check_resume_recipe(ckpt["recipe"], recipe_to_dict(recipe), last)
    ipe = recipe.train.iterations_per_epoch
    return int(ckpt["epoch"]) * ipe + int(ckpt["iteration"]) >= recipe.train.epochs * ipe


def train_fold(
    recipe_arg: str, overrides: list[str], run_dir: Path, device: str | None, threads: int | None = None
) -> None:
    """``usema train RECIPE --set train.fold=K --output DIR/fold_K``, resuming what a killed cv left there."""
    args = argparse.Namespace(recipe=recipe_arg, overrides=overrides, output=str(run_dir),
                              resume=has_run(run_dir), overwrite=False, device=device, threads=threads)
    train_command.run(args)


def predict_fold(run_dir: Path, ds: nnunet.NnunetDataset, val: list[str], out: Path, device: torch.device) -> None:
    """Segment the fold's validation cases into ``out`` with the fold's final model (not ``best.pt``, which was
    chosen on these very cases)."""
    model = load_model(checkpoint_path(run_dir, LAST), device)
    place_for_inference(model.network, device)
    by_name = {c.name: c for c in ds.train}
    options = InferenceOptions(progress=False)
    for name in val:
        case = next(c for c in find_cases(by_name[name].images[0]) if c.name == name)
        infer_case(model, case, out, options, device)


def fold_means(rows: list[dict], folds: list[dict]) -> dict[int, float]:
    """Mean Dice over each fold's validation cases (classes absent from truth and prediction ignored)."""
    means = {}
    for k, fold in enumerate(folds):
        values = [r["dsc"] for r in rows if r["case"] in set(fold["val"]) and not math.isnan(r["dsc"])]
        means[k] = float(np.mean(values)) if values else math.nan
    return means


def cross_validate(
    recipe_arg: str, overrides: list[str], cv_dir: Path, device: str | None = None, threads: int | None = None
) -> CvSummary:
    """Run (or continue) the cross-validation of ``recipe_arg`` into ``cv_dir``; see the module docstring."""
    recipe = load_recipe(recipe_arg, overrides)
    check_cv_recipe(recipe, recipe_arg)
    training_autocast_dtype(recipe.train, resolve_device(device))  # refused before the cv directory is made
    ds = nnunet.scan_dataset(recipe.data.root)
    ensure_writable_dir(cv_dir, "cv directory")
    folds, _ = load_or_create_splits(ds.root, [c.name for c in ds.train], cv_dir)
    predictions = cv_dir / CV_PREDICTIONS
    ensure_writable_dir(predictions, "cv predictions")
    trained, seconds = [], {}
    for k, fold in enumerate(folds):
        run_dir = fold_dir(cv_dir, k)
        fold_overrides = [*overrides, f"train.fold={k}"]
        start = time.perf_counter()
        if not fold_finished(run_dir, load_recipe(recipe_arg, fold_overrides)):
            train_fold(recipe_arg, fold_overrides, run_dir, device, threads)
            trained.append(k)
        predict_fold(run_dir, ds, fold["val"], predictions, resolve_device(device))
        seconds[k] = time.perf_counter() - start
    labels = {v: n for v, n in (recipe.data.labels or ds.labels).items() if v != 0}
    ev = recipe.evaluation
    result = evaluate_folders(predictions, ds.root / "labelsTr", labels, ev.nsd_tolerance_mm, ev.instance_f1,
                              ev.interior_label, protocol=ev.protocol, labels_source=recipe_arg)
    per_fold = fold_means(result.rows, folds)
    result.summary["folds"] = {str(k): v for k, v in per_fold.items()}
    write_results(result.rows, result.summary, cv_dir / CV_EVALUATION, overwrite=True)
    decision = choose_for_folders(predictions, ds.root / "labelsTr", sorted(labels))
    write_decision(cv_dir / CV_POSTPROCESSING, decision)  # last: its presence marks a finished cv directory
    mean = result.summary.get("mean_dsc")
    return CvSummary(per_fold, math.nan if mean is None else float(mean), decision, trained, seconds)
