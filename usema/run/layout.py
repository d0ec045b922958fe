"""Names of the files a training run and an exported bundle consist of (defined once, used by every reader).

Run directory::

    RUN/recipe.yaml             the resolved recipe
    RUN/metrics.csv             one row per epoch
    RUN/checkpoints/last.pt     the latest state (resume point)
    RUN/checkpoints/best.pt     the weights of the best validated epoch
    RUN/plots/  RUN/tb/         curves and tensorboard events

Bundle directory: ``configs/metadata.json``, ``configs/inference.json``, ``configs/usema.json``,
``models/model.pt``, ``models/model.ts``, ``docs/README.md``, ``LICENSE`` (docs/bundle.md).
"""

from __future__ import annotations

from pathlib import Path

LAST = "last.pt"
BEST = "best.pt"
CHECKPOINTS = "checkpoints"
RECIPE = "recipe.yaml"
METRICS = "metrics.csv"
PLOTS = "plots"
TENSORBOARD = "tb"
# what a training run writes into its directory (--overwrite removes exactly these)
RUN_OUTPUTS = (RECIPE, METRICS, CHECKPOINTS, PLOTS, TENSORBOARD)

BUNDLE_METADATA = Path("configs") / "metadata.json"
BUNDLE_INFERENCE = Path("configs") / "inference.json"
BUNDLE_USEMA_ARGS = Path("configs") / "usema.json"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
BUNDLE_TORCHSCRIPT = Path("models") / "model.ts"
BUNDLE_README = Path("docs") / "README.md"
BUNDLE_LICENSE = Path("LICENSE")
# every file an export writes; a folder holding only these (and their parent folders) is a previous bundle
BUNDLE_FILES = (
    BUNDLE_LICENSE,
    BUNDLE_METADATA,
    BUNDLE_INFERENCE,
    BUNDLE_USEMA_ARGS,
    BUNDLE_WEIGHTS,
    BUNDLE_TORCHSCRIPT,
    BUNDLE_README,
)
# the files that identify a folder as a usema bundle
BUNDLE_MARKERS = (BUNDLE_METADATA, BUNDLE_USEMA_ARGS, BUNDLE_WEIGHTS)


def checkpoint_path(run_dir: str | Path, name: str = LAST) -> Path:
    """``RUN/checkpoints/<name>``."""
    return Path(run_dir) / CHECKPOINTS / name


def has_run(run_dir: str | Path) -> bool:
    """True when ``run_dir`` already holds (part of) a training run."""
    return (Path(run_dir) / RECIPE).exists() or checkpoint_path(run_dir, LAST).exists()


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` holds the files that identify a usema bundle."""
    return all((Path(path) / marker).is_file() for marker in BUNDLE_MARKERS)


def foreign_bundle_entries(path: str | Path) -> list[Path]:
    """Entries of folder ``path`` an export would not have written (empty for a previous usema bundle).

    Only plain files and folders count as the export's: a link is foreign, whatever its name.
    """
    root = Path(path)
    expected = {Path(".")} | {f for f in BUNDLE_FILES} | {p for f in BUNDLE_FILES for p in f.parents}
    foreign = []
    for entry in sorted(root.rglob("*")):
        rel = entry.relative_to(root)
        if rel not in expected or entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            foreign.append(entry)
    return foreign
