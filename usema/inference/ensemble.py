"""Several models as one: which files make an ensemble, and whether their predictions may be averaged.

A cross-validation directory (written by ``usema cv``) holds one run per fold in ``fold_K/`` and the
post-processing chosen on the cross-validation predictions; as a MODEL of ``usema infer`` it stands for the
ensemble of its folds' final checkpoints (``last.pt``: ``best.pt`` was chosen on the fold's own validation cases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from usema.errors import UsemaError
from usema.inference.model_loading import LoadedModel
from usema.run.layout import LAST, checkpoint_path

CV_FOLD_PREFIX = "fold_"
CV_POSTPROCESSING = "postprocessing.json"
CV_PREDICTIONS = "cv_predictions"
CV_EVALUATION = "cv_evaluation.json"


def fold_dir(cv_dir: str | Path, fold: int) -> Path:
    """``DIR/fold_K``: the run of fold ``fold``."""
    return Path(cv_dir) / f"{CV_FOLD_PREFIX}{fold}"


def is_cv_dir(path: str | Path) -> bool:
    """True when ``path`` is a finished cross-validation directory (it holds the chosen post-processing)."""
    return (Path(path) / CV_POSTPROCESSING).is_file()


def cv_members(cv_dir: Path) -> list[Path]:
    """The final checkpoints of the folds of ``cv_dir``, in fold order."""
    folds = sorted((p for p in cv_dir.glob(f"{CV_FOLD_PREFIX}*") if p.name[len(CV_FOLD_PREFIX):].isdigit()),
                   key=lambda p: int(p.name[len(CV_FOLD_PREFIX):]))
    members = [checkpoint_path(f, LAST) for f in folds]
    missing = [str(m) for m in members if not m.is_file()]
    if not members or missing:
        raise UsemaError(f"{cv_dir}: expected the final checkpoint of every fold, missing {missing or 'fold_0'}; "
                         "finish the cross-validation with usema cv")
    return members


def expand_models(models: Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    """(model paths, post-processing file or None): each cv directory stands for its folds' checkpoints.

    Post-processing is chosen for one cross-validation's ensemble, so it applies only when MODEL is exactly one
    cv directory.
    """
    paths: list[Path] = []
    cv_dirs = [Path(m) for m in models if is_cv_dir(m)]
    for model in map(Path, models):
        paths += cv_members(model) if model in cv_dirs else [model]
    postprocessing = cv_dirs[0] / CV_POSTPROCESSING if len(models) == 1 and cv_dirs else None
    return paths, postprocessing


def _target_spacing(model: LoadedModel) -> Any:
    return model.recipe.data.target_spacing


# what every member must share for their softmax probabilities to be averaged voxel by voxel
_MUST_AGREE: tuple[tuple[str, Callable[[LoadedModel], Any]], ...] = (
    ("classes", lambda m: (m.num_classes, dict(m.labels))),
    ("input channels", lambda m: m.in_channels),
    ("normalisation", lambda m: (m.settings.normalization, m.norm_stats)),
    ("spatial_dims/slice_axis", lambda m: (m.spatial_dims, m.settings.slice_axis if m.spatial_dims == 2 else None)),
    ("data.target_spacing", _target_spacing),
)


def check_compatible(models: Sequence[LoadedModel]) -> None:
    """Refuse, naming both models, members whose predictions do not live in the same space."""
    first = models[0]
    for other in models[1:]:
        for what, value in _MUST_AGREE:
            if value(first) != value(other):
                raise UsemaError(f"{other.source}: cannot be ensembled with {first.source}: {what} differ "
                                 f"({value(first)} vs {value(other)})")
