"""``usema train RECIPE [--output DIR] [--set KEY=VALUE ...] [--resume] [--device cpu|cuda] [--overwrite]
[--threads N]``.

Also runs under ``torchrun --nproc_per_node N -m usema train RECIPE`` (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, ensure_writable_dir
from usema.run.layout import BEST, LAST, RECIPE, RUN_OUTPUTS, checkpoint_path, has_run
from usema.threads import add_threads_argument

if TYPE_CHECKING:
    from usema.run.checkpoint import StoredModel
    from usema.training.distributed import DistContext

# torch-importing modules are imported inside the functions so that `usema --help` stays fast

# recipe keys that may differ on --resume: they change speed or memory, not the method (train.compile may change
# the last bits of float results, as a different thread count does)
RESUME_FREE_KEYS = {"data.num_workers", "data.cache", "output.dir", "val.sw_batch_size", "train.compile"}
# recipe keys added after 0.3.1, with the default that reproduces what runs stored without them did
ADDED_KEY_DEFAULTS = {"train.precision": "auto"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmentation network from a YAML recipe",
        description="Train from a YAML recipe. The run directory (default runs/<name>) receives recipe.yaml, "
        "checkpoints/last.pt and best.pt, metrics.csv, plots/ and tb/ (tensorboard). "
        "Multi-GPU: torchrun --nproc_per_node N -m usema train RECIPE.",
    )
    parser.add_argument(
        "recipe", metavar="RECIPE", help="recipe YAML file, or a packaged recipe name such as demo_brain"
    )
    parser.add_argument("--output", "-o", metavar="DIR", help="run directory (default: output.dir or runs/<name>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key by dotted path, e.g. --set train.epochs=2 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory from last.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the run directory")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usema.config import load_recipe  # noqa: PLC0415
    from usema.threads import configure_threads  # noqa: PLC0415
    from usema.training.distributed import setup_distributed, teardown_distributed  # noqa: PLC0415

    if args.resume and args.overwrite:
        raise UsemaError("--resume and --overwrite: choose one (continue the run, or replace it)")
    recipe = load_recipe(args.recipe, args.overrides)
    check_model_section(recipe, args.recipe)
    if recipe.data.source == "nnunet":  # data.labels must be the dataset's own classes (issue 8)
        from usema.data.nnunet import resolve_root  # noqa: PLC0415
        from usema.evaluation.labels import check_recipe_labels  # noqa: PLC0415

        check_recipe_labels(recipe.data.labels, args.recipe, resolve_root(recipe.data.root) / "dataset.json")
    run_dir = Path(args.output) if args.output else recipe.output_dir
    ctx = setup_distributed(args.device)
    configure_threads(args.threads, ctx.local_world_size if ctx.device.type == "cpu" else 1)
    try:
        train(recipe, run_dir, ctx, resume=args.resume, overwrite=args.overwrite)
    finally:
        teardown_distributed(ctx)
    return 0


def check_model_section(recipe: Any, source: str) -> None:
    """The recipe's ``model.overrides`` follow the network spec's rules (known keywords, typed, plain data)."""
    from usema.run.spec import check_overrides  # noqa: PLC0415

    check_overrides(recipe.model.name, recipe.model.overrides, f"{source}: model.overrides")


def prepare_run_dir(run_dir: Path, ctx: DistContext, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Apply the refuse / resume rules; returns the checkpoint to resume from, or None.

    Nothing is removed here: ``--overwrite`` clears the previous run only once the recipe, the dataset and the
    network have been validated (:func:`clear_previous_run`), so a refused rerun keeps the previous run.
    """
    from usema.run.checkpoint import load_checkpoint  # noqa: PLC0415
    from usema.training.distributed import barrier  # noqa: PLC0415

    last = checkpoint_path(run_dir, LAST)
    if resume:
        if not run_dir.is_dir():
            raise UsemaError(f"{run_dir}: --resume: no such run directory")
        if ctx.is_main:
            _remove_stale_temporaries(last.parent)
        barrier(ctx)
        if last.is_file():
            return load_checkpoint(last)
        if ctx.is_main:
            print(f"usema: {last} does not exist yet; starting the run from the beginning", flush=True)
        return None
    if has_run(run_dir) and not overwrite:
        raise UsemaError(
            f"{run_dir}: already holds a training run; pass --resume to continue it or --overwrite to replace it"
        )
    ensure_writable_dir(run_dir, "run directory")
    barrier(ctx)
    return None


def clear_previous_run(run_dir: Path, ctx: DistContext) -> None:
    """``--overwrite``: remove what an earlier run wrote (``RUN_OUTPUTS``), nothing else in the folder."""
    from usema.training.distributed import barrier  # noqa: PLC0415

    if ctx.is_main:
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    barrier(ctx)


def _remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Delete half-written checkpoint files a SIGKILL left behind (``atomic_path`` names them .NAME.*.tmp.pt)."""
    for name in (LAST, BEST):
        stem = name.removesuffix(".pt")
        for tmp in checkpoint_dir.glob(f".{stem}.*.tmp.pt"):
            tmp.unlink(missing_ok=True)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_recipe(stored: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """A resumed run must use the recipe it started with (up to keys that cannot change results); a key added
    since the run started (``ADDED_KEY_DEFAULTS``) reads as its default in the stored recipe."""
    old, new = ADDED_KEY_DEFAULTS | _flatten(stored), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise UsemaError(f"{checkpoint}: --resume with a different recipe ({details}); use the run's recipe.yaml")


def read_init_source(init_from: str) -> StoredModel:
    """The validated model ``model.init_from`` names: a run directory (best.pt, else last.pt, as ``usema infer``
    resolves it), a checkpoint file or a bundle, read weights-only; errors name the key and the file."""
    from usema.inference.model_loading import resolve_model_path  # noqa: PLC0415
    from usema.run.checkpoint import read_stored_model  # noqa: PLC0415

    if not init_from.strip():
        raise UsemaError("model.init_from: expected a run directory, checkpoint or bundle, or null; got ''")
    try:
        stored = read_stored_model(resolve_model_path(init_from))
    except UsemaError as exc:
        raise UsemaError(f"model.init_from: {exc}") from exc
    stored.source = stored.source.resolve()
    return stored


def _prepare_data(recipe: Any, run_dir: Path, ctx: DistContext) -> Any:
    """Rank 0 prepares first (it may compute and cache normalisation statistics), then the others."""
    from usema.data import prepare_data  # noqa: PLC0415
    from usema.training.distributed import barrier  # noqa: PLC0415

    data = prepare_data(recipe, run_dir) if ctx.is_main else None
    barrier(ctx)
    return data if ctx.is_main else prepare_data(recipe, run_dir)


def train(recipe: Any, run_dir: Path, ctx: DistContext, resume: bool = False, overwrite: bool = False) -> Any:
    """Train ``recipe`` into ``run_dir`` (fresh, resumed or overwritten); returns the final TrainState."""
    from usema.config import dump_recipe, recipe_to_dict  # noqa: PLC0415
    from usema.training.trainer import Trainer, training_autocast_dtype  # noqa: PLC0415

    run_dir = Path(run_dir)
    training_autocast_dtype(recipe.train, ctx.device)  # a precision this device cannot run: refused before any write
    ckpt = prepare_run_dir(run_dir, ctx, resume, overwrite)
    recipe_dict = recipe_to_dict(recipe)
    if ckpt is not None:
        check_resume_recipe(ckpt["recipe"], recipe_dict, checkpoint_path(run_dir, LAST))
        recipe_dict = ckpt["recipe"]
    # a resumed run continues from its own checkpoint: the init_from source is not read again (it may be gone)
    init = read_init_source(recipe.model.init_from) if ckpt is None and recipe.model.init_from is not None else None
    data = _prepare_data(recipe, run_dir, ctx)
    # before recipe.yaml: a refused run leaves no run
    trainer = Trainer(recipe, recipe_dict, data, run_dir, ctx, init=init,
                      resume_weights=None if ckpt is None else ckpt["model"])
    if overwrite:
        clear_previous_run(run_dir, ctx)
    if ctx.is_main and ckpt is None:
        atomic_write_text(run_dir / RECIPE, dump_recipe(recipe))
    if ckpt is not None:
        trainer.load_state_dict(ckpt, checkpoint_path(run_dir, LAST))
    state = trainer.fit()
    if ctx.is_main:
        best = "-" if state.best_metric is None else f"{state.best_metric:.4f}"
        print(f"usema: training finished in {run_dir} (best mean Dice {best})", flush=True)
    return state
