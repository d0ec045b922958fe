"""`usema train`: recipes train end to end, the run directory holds what users read, and the pieces
(loss weights, sampling, RNG snapshots, checkpoint writes, validation Dice) behave as documented."""

from __future__ import annotations

import csv
import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_data import make_png_dataset, make_volume_dataset

from usema.cli import main
from usema.config import list_recipes, load_recipe, recipe_to_dict
from usema.data.demos import BRAIN_LABELS
from usema.errors import UsemaError
from usema.run import checkpoint as checkpoint_module
from usema.run.checkpoint import load_checkpoint, read_torch_file, save_checkpoint
from usema.training.command import check_resume_recipe
from usema.training.components import build_loss, build_optimizer, build_scheduler
from usema.training.rng import capture_rng_state, restore_rng_state
from usema.training.sampling import StepBatchSampler, sample_indices
from usema.training.validation import case_dice

CHECKPOINT_KEYS = {"model", "network", "recipe", "norm_stats", "labels", "epoch", "iteration", "best_metric",
                   "optimizer", "scheduler", "scaler", "rng", "metrics"}
# seconds-scale settings: 2 iterations of batch 2 on small patches, no worker processes
QUICK = ["--set", "train.epochs=1", "--set", "train.iterations_per_epoch=2", "--set", "train.batch_size=2",
         "--set", "model.preset=tiny", "--set", "data.num_workers=0", "--set", "val.sw_batch_size=8",
         "--set", "val.overlap=0"]
NNUNET_RECIPES = [r for r in list_recipes() if not r.startswith("demo_")]


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Training switches on deterministic algorithms process-wide (for exact resume); undo it for other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------------------------------- components
def test_deep_supervision_weights_halve_and_ignore_the_coarsest_level():
    weights = build_loss().get_weights(4)
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert build_loss().get_weights(1) == [1.0]


def test_loss_ignores_the_coarsest_output_and_matches_plain_dice_ce_for_a_tensor():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 16, 16), generator=gen).float()
    outputs = [torch.randn(2, 3, 16 // 2**i, 16 // 2**i, generator=gen) for i in range(3)]
    loss = build_loss()
    changed = outputs[:2] + [torch.randn(2, 3, 4, 4, generator=gen) * 100]
    assert torch.equal(loss(outputs, target), loss(changed, target))
    assert torch.allclose(loss(outputs[0], target), loss.loss(outputs[0], target))


def test_sample_indices_never_repeat_across_steps_and_ranks():
    seen = [i for step in range(5) for rank in range(3) for i in sample_indices(step, 4, rank, 3)]
    assert len(seen) == len(set(seen)) == 5 * 3 * 4
    assert sorted(seen) == list(range(60))


def test_sampler_resumed_mid_run_yields_the_tail_of_the_full_sequence():
    full = list(StepBatchSampler(0, 10, 2, rank=1, world_size=2))
    resumed = list(StepBatchSampler(6, 10, 2, rank=1, world_size=2))
    assert resumed == full[6:] and len(StepBatchSampler(6, 10, 2)) == 4


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "poly"), ("adamw", "cosine")])
def test_schedules_decay_per_iteration_towards_zero(optimizer, schedule):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optimizer, lr=0.01, weight_decay=0.0)
    sched = build_scheduler(opt, schedule, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] < 0.002


def test_rng_snapshot_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"model": {}, "network": {}, "rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(read_torch_file(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.rand(3), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_failed_checkpoint_write_is_one_line_error_and_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "network": {"name": "old"}}, path)

    def disk_full(obj, f):
        Path(f).write_bytes(b"partial")  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(UsemaError) as err:
        save_checkpoint({"model": {"w": torch.zeros(2)}, "network": {"name": "new"}}, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "No space left" in message
    monkeypatch.undo()
    assert read_torch_file(path)["network"]["name"] == "old"
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_load_checkpoint_rejects_files_that_are_not_checkpoints(tmp_path):
    garbage = tmp_path / "last.pt"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(UsemaError, match="last.pt"):
        load_checkpoint(garbage)
    torch.save({"weights": torch.ones(1)}, garbage)
    with pytest.raises(UsemaError, match="not a usema checkpoint"):
        load_checkpoint(garbage)


def test_validation_dice_follows_challenge_rules_for_empty_classes():
    truth = torch.tensor([[0, 1, 1], [0, 0, 0]])
    pred = torch.tensor([[0, 1, 0], [0, 0, 2]])
    dice = case_dice(pred, truth, num_classes=4)
    # class 1: 2*1/(2+1); class 2: false positive on empty truth = 0; class 3: empty and empty = 1
    assert dice.tolist() == pytest.approx([2 / 3, 0.0, 1.0])


def test_resume_refuses_a_changed_recipe_but_not_a_changed_worker_count():
    stored = recipe_to_dict(load_recipe("demo_nuclei"))
    check_resume_recipe(stored, recipe_to_dict(load_recipe("demo_nuclei", ["data.num_workers=0"])), Path("last.pt"))
    with pytest.raises(UsemaError, match="train.lr"):
        check_resume_recipe(stored, recipe_to_dict(load_recipe("demo_nuclei", ["train.lr=0.5"])), Path("last.pt"))


# ------------------------------------------------------------------------------------ run directory
def test_existing_run_directory_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("name: previous\n")
    assert main(["train", "demo_nuclei", "--output", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(run_dir) in err and "--resume" in err and "--overwrite" in err
    assert (run_dir / "recipe.yaml").read_text() == "name: previous\n"
    assert main(["train", "demo_nuclei", "--output", str(run_dir), "--resume", "--overwrite"]) == 2
    assert main(["train", "demo_nuclei", "--output", str(tmp_path / "missing"), "--resume"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(["train", "demo_nuclei", "--output", str(tmp_path / "a_file" / "run")]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_complete_run(run_dir: Path, labels: dict[int, str], epochs: int) -> None:
    """The run-directory contract of docs/ARCHITECTURE.md."""
    assert load_recipe(run_dir / "recipe.yaml").name  # resolved recipe loads back
    rows = _read_metrics(run_dir)
    foreground = [name for k, name in sorted(labels.items()) if k != 0]
    assert list(rows[0]) == ["epoch", "train_loss", *[f"dice_{n}" for n in foreground], "mean_dice", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert 0.0 <= float(rows[-1]["mean_dice"]) <= 1.0 and np.isfinite(float(rows[-1]["train_loss"]))
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert CHECKPOINT_KEYS <= ckpt.keys()
        assert ckpt["labels"] == {str(k): v for k, v in labels.items()}
        assert ckpt["network"]["out_channels"] == len(labels)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == epochs
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    for plot in ("loss.png", "dice.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_nuclei_run_directory_then_refuse_then_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "nuclei"
    args = ["train", "demo_nuclei", "--output", str(run_dir), *QUICK, "--set", "data.patch_size=[64,64]",
            "--set", "train.epochs=2", "--set", "data.target=instance_boundary"]
    assert main(args) == 0
    _assert_complete_run(run_dir, {0: "background", 1: "interior", 2: "boundary"}, epochs=2)
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out

    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    assert main(args) == 2  # a second run into the same directory is refused ...
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert main([*args, "--resume"]) == 0  # ... resuming a finished run changes nothing; --overwrite starts over
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert main([*args, "--overwrite", "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=1"]) == 0
    assert len(_read_metrics(run_dir)) == 1


@pytest.mark.slow
def test_demo_brain_trains_slice_wise_on_the_mni_template(tmp_path):
    run_dir = tmp_path / "brain"
    # one validation window per 197 x 233 slice keeps the 20-slice held-out slab quick
    args = ["train", "demo_brain", "--output", str(run_dir), *QUICK, "--set", "data.patch_size=[64,64]",
            "--set", "val.roi_size=[224,240]"]
    assert main(args) == 0
    _assert_complete_run(run_dir, BRAIN_LABELS, epochs=1)


@pytest.fixture(scope="module")
def nnunet_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$nnUNet_raw with tiny synthetic versions of the four benchmark datasets the recipes name."""
    raw = tmp_path_factory.mktemp("nnUNet_raw")
    make_volume_dataset(raw, modality="CT")
    make_volume_dataset(raw, modality="MR")
    make_png_dataset(raw)
    make_png_dataset(raw, n_classes=7, name="Dataset704_Endovis17")
    # the benchmark datasets' own class lists, which `usema train` checks each recipe's data.labels against
    for recipe_name in ("flare22", "amos_mr", "endovis17"):
        data = load_recipe(recipe_name).data
        meta_path = raw / data.root / "dataset.json"
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "labels": {name: value for value, name in data.labels.items()}}))
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", NNUNET_RECIPES)
def test_every_shipped_benchmark_recipe_trains_on_a_synthetic_dataset(recipe_name, nnunet_raw, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(nnunet_raw))
    recipe = load_recipe(recipe_name)
    patch = [32, 32, 32] if recipe.data.spatial_dims == 3 else [64, 64]
    run_dir = tmp_path / recipe_name
    args = ["train", recipe_name, "--output", str(run_dir), *QUICK, "--set", f"data.patch_size={patch}"]
    assert main(args) == 0
    labels = load_checkpoint(run_dir / "checkpoints" / "last.pt")["labels"]
    _assert_complete_run(run_dir, {int(k): v for k, v in labels.items()}, epochs=1)
    assert labels["0"] == "background" and len(labels) >= 3


@pytest.mark.slow
def test_disk_full_during_training_stops_with_one_line_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "full"
    real_save, calls = torch.save, []

    def fails_on_second_write(obj, f):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", fails_on_second_write)
    args = ["train", "demo_nuclei", "--output", str(run_dir), *QUICK, "--set", "data.patch_size=[64,64]",
            "--set", "train.checkpoint_every=1", "--set", "train.iterations_per_epoch=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "last.pt" in err and "No space left" in err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 1  # the write before the failure
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0  # and the run continues from it
