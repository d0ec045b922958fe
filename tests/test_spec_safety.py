"""Shared files cannot run code, --overwrite cannot lose data, malformed checkpoints are refused (issue 13).

Each test runs the real command (``usema.cli.main``) on a file as an attacker or a careless user would write it
and checks the promised refusal: exit 2, one line ``usema: error: <file>: <key>: ...``, nothing written, and the
payload (a MONAI ``$`` expression that would create a file) never ran.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bundle import make_run
from test_inference import ct_volume, save_nifti

from usema.bundle.export import export_bundle
from usema.cli import main
from usema.run.layout import has_run


def refused(argv: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run ``usema ARGV``; assert exit 2 and a one-line error containing every fragment."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("usema: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def payload(marker: Path) -> str:
    """A MONAI config expression that creates ``marker`` when evaluated."""
    return f"$open({str(marker)!r}, 'w').close()"


def image(folder: Path) -> Path:
    """A small CT-like NIfTI volume: a valid input, so that only the model can be refused."""
    return save_nifti(folder / "images" / "case.nii.gz", ct_volume((24, 20, 3)), np.eye(4))


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def nested(depth: int) -> list:
    """Ten references to the same list, ``depth`` times over: 10**depth leaves in a few bytes."""
    node: list = [1] * 10
    for _ in range(depth - 1):
        node = [node] * 10
    return node


def edited_checkpoint(source: Path, target: Path, edit: callable) -> Path:
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with checkpoints/best.pt (tiny random 2D USEMA, 3 classes)."""
    return make_run(tmp_path_factory.mktemp("spec") / "run")


@pytest.fixture(scope="module")
def ckpt(run: Path) -> Path:
    return run / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's bundle, exported once; tests that change it work on a copy."""
    return export_bundle(run, tmp_path_factory.mktemp("exported") / "bundle")


# ------------------------------------------------------------------ 1. code never runs from a shared file
CHECKPOINT_PAYLOADS = {
    # USEMA's text field: the value is a string, but a string MONAI would evaluate
    "usema_text_field": (lambda c, p: c["network"]["overrides"].update(upsample=p), "network.overrides.upsample"),
    # a bool field used to accept any truthy value
    "usema_bool_field": (lambda c, p: c["network"]["overrides"].update(global_mean=p), "network.overrides.global_mean"),
    # a keyword USEMA does not have
    "unknown_keyword": (lambda c, p: c["network"]["overrides"].update(hook=p), "network.overrides.hook"),
    # a MONAI peer ignores its preset, which export still copied into inference.json
    "peer_preset": (lambda c, p: c["network"].update(name="basicunet", preset=p, overrides={}), "network.preset"),
    # a peer keyword of free type: plain data only
    "peer_nested": (
        lambda c, p: c["network"].update(name="basicunet", preset="tiny", overrides={"act": ["leakyrelu", {"x": p}]}),
        "network.overrides.act[1].x",
    ),
    # the stored recipe's overrides travel into usema.json and a re-training
    "stored_recipe": (lambda c, p: c["recipe"].setdefault("model", {}).update(overrides={"upsample": p}),
                      "recipe: model.overrides.upsample"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_PAYLOADS))
@pytest.mark.parametrize("command", ["export", "infer"])
def test_checkpoint_payload_never_runs(case: str, command: str, ckpt: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    edit, key = CHECKPOINT_PAYLOADS[case]
    evil = edited_checkpoint(ckpt, tmp_path / "evil" / "checkpoints" / "best.pt", lambda c: edit(c, payload(marker)))
    out = tmp_path / "out"
    argv = ["export", str(evil), "--output", str(out)]
    if command == "infer":
        argv = ["infer", str(evil), "--input", str(image(tmp_path)), "--output", str(out), "--no-progress"]
    refused(argv, capsys, "best.pt", key)
    assert not marker.exists() and not out.exists()


def test_bundle_usema_json_payload_never_runs(exported: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    bundle = shutil.copytree(exported, tmp_path / "bundle")
    args_path = bundle / "configs" / "usema.json"
    args = json.loads(args_path.read_text())
    args["network"]["overrides"]["upsample"] = payload(marker)
    args_path.write_text(json.dumps(args))
    refused(["export", str(bundle), "--output", str(tmp_path / "again")], capsys, "usema.json", "network.overrides.upsample")
    refused(["infer", str(bundle), "--input", str(image(tmp_path)), "--output", str(tmp_path / "seg")], capsys,
            "usema.json", "network.overrides.upsample")
    assert not marker.exists() and not (tmp_path / "again").exists() and not (tmp_path / "seg").exists()


def test_recipe_overrides_payload_is_refused_before_training(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "shared",
        "data": {"source": "demo_nuclei", "patch_size": [64, 64], "num_workers": 0},
        "model": {"overrides": {"upsample": payload(marker)}},
        "train": {"epochs": 1, "iterations_per_epoch": 1},
    }))
    refused(["train", str(recipe), "--output", str(tmp_path / "run")], capsys, "shared.yaml", "model.overrides.upsample")
    refused(["train", str(recipe), "--output", str(tmp_path / "run"), "--set", "model.overrides.upsample=nearest",
             "--set", "model.overrides.mean_gate=sometimes"], capsys, "model.overrides.mean_gate: expected true or false")
    assert not marker.exists() and not has_run(tmp_path / "run")


def test_exported_network_def_is_the_checkpoint_spec(run: Path, exported: Path) -> None:
    """What export writes is validated data: inference.json's network_def equals the checkpoint's spec."""
    config = json.loads((exported / "configs" / "inference.json").read_text())
    stored = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["network"]
    network_def = {k: v for k, v in config["network_def"].items() if k != "_target_"}
    expected = {k: stored.get(k, v) for k, v in {"preset": "base", "deep_supervision": False}.items()}
    expected |= {k: stored[k] for k in ("spatial_dims", "in_channels", "out_channels")} | stored["overrides"]
    assert network_def == expected


# ------------------------------------------------------------------------- 2. no data loss with --overwrite
def test_export_onto_its_own_run_is_refused(run: Path, capsys) -> None:
    before = files(run)
    refused(["export", str(run), "--output", str(run), "--overwrite"], capsys, str(run), "exported from")
    refused(["export", str(run / "checkpoints" / "best.pt"), "--output", str(run / "checkpoints"), "--overwrite"],
            capsys, "exported from")
    assert files(run) == before


def test_export_onto_a_parent_folder_is_refused(tmp_path: Path, capsys) -> None:
    project = tmp_path / "project"
    run = make_run(project / "runs" / "r1")
    (project / "notes.txt").write_text("mine")
    before = files(project)
    refused(["export", str(run), "--output", str(project), "--overwrite"], capsys, str(project), "exported from")
    refused(["export", str(run), "--output", str(project / "runs"), "--overwrite"], capsys, "exported from")
    assert files(project) == before


@pytest.mark.parametrize("foreign", ["notes.txt", "configs/extra.json", "models/model.pt.link"])
def test_overwrite_replaces_only_a_previous_bundle(foreign: str, run: Path, exported: Path, tmp_path: Path,
                                                  capsys) -> None:
    folder = shutil.copytree(exported, tmp_path / "bundle", symlinks=True)
    if foreign.endswith(".link"):
        (folder / foreign).symlink_to(folder / "models" / "model.pt")
    else:
        (folder / foreign).write_text("user data")
    before = files(folder)
    refused(["export", str(run), "--output", str(folder), "--overwrite"], capsys, "only a previous usema bundle", foreign)
    assert files(folder) == before
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.csv").write_text("1,2")
    refused(["export", str(run), "--output", str(plain), "--overwrite"], capsys, "only a previous usema bundle")
    assert files(plain) == {"data.csv": b"1,2"}


def _previous_run(run_dir: Path, ckpt: Path) -> dict[str, bytes]:
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run_dir / "checkpoints" / "last.pt")
    shutil.copy(ckpt, run_dir / "checkpoints" / "best.pt")
    (run_dir / "recipe.yaml").write_text("name: previous\n")
    (run_dir / "metrics.csv").write_text("epoch\n1\n")
    return files(run_dir)


def _recipe(path: Path, root: Path, **model: object) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "rerun",
        "data": {"source": "nnunet", "root": str(root), "spatial_dims": 2, "slice_axis": 2,
                 "normalization": "ct", "patch_size": [64, 64], "num_workers": 0},
        "model": {"preset": "tiny", "overrides": model},
        "train": {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 2},
    }))
    return path


def test_refused_train_overwrite_keeps_the_previous_run(ckpt: Path, ct_dataset: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    before = _previous_run(run_dir, ckpt)
    missing = _recipe(tmp_path / "missing.yaml", tmp_path / "Dataset999_Gone")
    refused(["train", str(missing), "--output", str(run_dir), "--overwrite"], capsys, "Dataset999_Gone")
    assert files(run_dir) == before
    # valid fields that cannot build a network: found after the dataset is read, still before anything is removed
    unbuildable = _recipe(tmp_path / "unbuildable.yaml", ct_dataset, window_size=[7])
    refused(["train", str(unbuildable), "--output", str(run_dir), "--overwrite", "--device", "cpu"], capsys,
            "model: cannot build usema", "window_size")
    kept = files(run_dir)  # plus the dataset's cached CT statistics (norm_stats.json)
    assert {name: kept.get(name) for name in before} == before


def test_refused_fresh_start_leaves_nothing_that_blocks_the_rerun(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    missing = _recipe(tmp_path / "missing.yaml", tmp_path / "Dataset999_Gone")
    refused(["train", str(missing), "--output", str(run_dir)], capsys, "Dataset999_Gone")
    assert not has_run(run_dir)
    refused(["train", str(missing), "--output", str(run_dir)], capsys, "Dataset999_Gone")  # not "already holds"


# ---------------------------------------------------------------------------- 3. malformed checkpoints
MALFORMED = {
    "network_not_mapping": (lambda c: c.update(network=["usema"]), "network: expected a mapping"),
    "name_unknown": (lambda c: c["network"].update(name="resnet"), "network.name: expected one of"),
    "channels_text": (lambda c: c["network"].update(in_channels="1"), "network.in_channels: expected an integer"),
    "classes_huge": (lambda c: c["network"].update(out_channels=10**8), "network.out_channels: expected an integer in [1, 1000]"),
    "ds_text": (lambda c: c["network"].update(deep_supervision="no"), "network.deep_supervision: expected true or false"),
    "name_missing": (lambda c: c["network"].pop("name"), "network.name: required key is missing"),
    "override_float": (lambda c: c["network"]["overrides"].update(head_dim=8.5), "network.overrides.head_dim"),
    "override_tuple": (lambda c: c["network"]["overrides"].update(features="wide"), "network.overrides.features"),
    # shared references: a small file that expands to 10**6 entries (a YAML or pickle "alias bomb")
    "override_bomb": (lambda c: c["network"]["overrides"].update(features=nested(6)), "expected a small value"),
    "recipe_not_mapping": (lambda c: c.update(recipe="name: x"), "recipe: expected the resolved recipe as a mapping"),
    "recipe_patch": (lambda c: c["recipe"]["data"].update(patch_size="big"), "data.patch_size: expected list"),
    "recipe_overlap": (lambda c: c["recipe"]["val"].update(overlap="half"), "val.overlap: expected"),
    "labels_list": (lambda c: c.update(labels=["background", "liver"]), "labels: expected a mapping"),
    "labels_values": (lambda c: c.update(labels={"one": "liver"}), "labels: expected class values"),
    "norm_stats_nan": (lambda c: c["norm_stats"].update(mean=math.nan), "norm_stats.mean: expected a finite number"),
    "norm_stats_inf": (lambda c: c["norm_stats"].update(std=math.inf), "norm_stats.std: expected a finite number"),
    "norm_stats_text": (lambda c: c.update(norm_stats="ct"), "norm_stats: expected a mapping"),
    "weights_swapped": (lambda c: c.update(model={"w": torch.ones(1)}), "weights do not match the network usema"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_names_file_and_key(case: str, ckpt: Path, tmp_path: Path, capsys) -> None:
    edit, message = MALFORMED[case]
    bad = edited_checkpoint(ckpt, tmp_path / "bad.pt", edit)
    refused(["export", str(bad), "--output", str(tmp_path / "bundle")], capsys, "bad.pt", message)
    assert not (tmp_path / "bundle").exists()
