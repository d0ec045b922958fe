"""Fine-tuning (``model.init_from``): a fresh run starts from the matching tensors of a run, checkpoint or bundle,
keeps the seeded fresh initialisation where the class count changes the shape (the output heads), refuses weights
of another network by its spec, reads only weights-only files, and resumes exactly without reading the source
again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from usema.config import load_recipe, recipe_to_dict
from usema.errors import UsemaError
from usema.run.checkpoint import save_checkpoint
from usema.run.spec import build_network_from_spec, spec_for_recipe, spec_to_dict
from usema.training.command import read_init_source
from usema.training.distributed import DistContext
from usema.training.trainer import Trainer

BINARY = {0: "background", 1: "nucleus"}
THREE = {0: "background", 1: "interior", 2: "boundary"}


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Building a Trainer switches on deterministic algorithms process-wide; undo it for other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def recipe(*overrides: str) -> Any:
    return load_recipe("demo_nuclei", ["data.num_workers=0", *overrides])


def trainer(labels: dict[int, str], *overrides: str, init: Any = None, in_channels: int = 1) -> Trainer:
    """A Trainer for ``demo_nuclei`` with ``overrides``; its data stands in for prepared data (only the class
    list and channel count shape the network, and nothing here trains)."""
    r = recipe(*overrides)
    data = SimpleNamespace(labels=labels, in_channels=in_channels, norm_stats=None, train_dataset=None, val_cases=[])
    return Trainer(r, recipe_to_dict(r), data, Path("unused"), DistContext(), init=init)


def write_source(path: Path, labels: dict[int, str], *overrides: str, in_channels: int = 1, seed: int = 123) -> Path:
    """A checkpoint of the network ``demo_nuclei`` with ``overrides`` builds, weights from ``seed`` (not the
    recipe's seed, so that loaded tensors differ from a fresh init)."""
    r = recipe(*overrides)
    spec = spec_for_recipe(r, in_channels, len(labels))
    torch.manual_seed(seed)
    network = build_network_from_spec(spec, r.data.patch_size)
    payload = {"model": network.state_dict(), "network": spec_to_dict(spec), "recipe": recipe_to_dict(r),
               "labels": {str(k): v for k, v in labels.items()}}
    return save_checkpoint(payload, path)


def source_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


# ------------------------------------------------------------------------------------------ loading
def test_all_but_the_heads_load_when_the_class_count_differs(tmp_path):
    source = write_source(tmp_path / "binary.pt", BINARY)
    tuned = trainer(THREE, init=read_init_source(str(source))).network.state_dict()
    fresh = trainer(THREE).network.state_dict()
    stored = source_state(source)

    heads = [k for k in tuned if k.startswith("heads.")]
    assert heads and all(stored[k].shape != tuned[k].shape for k in heads)
    for key, value in tuned.items():
        expected = fresh[key] if key in heads else stored[key]
        assert torch.equal(value, expected), key
    body = [k for k in tuned if k not in heads and tuned[k].is_floating_point()]
    assert any(not torch.equal(fresh[k], stored[k]) for k in body)  # the source really differs from a fresh init


def test_every_tensor_loads_when_the_classes_match_and_the_run_records_its_source(tmp_path):
    source = write_source(tmp_path / "binary.pt", BINARY)
    run = trainer(BINARY, init=read_init_source(str(source)))
    stored = source_state(source)
    assert all(torch.equal(v, stored[k]) for k, v in run.network.state_dict().items())
    recorded = run.state_dict()["metrics"]["init_from"]
    assert recorded == {"path": str(source.resolve()), "loaded": len(stored), "skipped": []}


def test_a_run_directory_starts_from_best_pt_and_the_report_names_the_skipped_heads(tmp_path, capsys):
    run_dir = tmp_path / "run"
    best = write_source(run_dir / "checkpoints" / "best.pt", BINARY, seed=1)
    write_source(run_dir / "checkpoints" / "last.pt", BINARY, seed=2)
    tuned = trainer(THREE, init=read_init_source(str(run_dir)))
    stored = source_state(best)
    assert torch.equal(tuned.network.state_dict()["encoder.0.0.conv1.weight"], stored["encoder.0.0.conv1.weight"])
    report = capsys.readouterr().out.strip()
    heads = [k for k in stored if k.startswith("heads.")]
    assert report.startswith(f"usema: model.init_from {best.resolve()}: loaded {len(stored) - len(heads)} tensors, "
                             f"skipped {len(heads)} (heads.0.weight, heads.0.bias,")
    assert "\n" not in report


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("source_overrides,in_channels,what", [
    (["model.name=basicunet"], 1, "expected weights of a usema network (this recipe's), got basicunet"),
    (["model.preset=small"], 1, "expected weights of usema with preset 'tiny' (this recipe's network), "
                                "got preset 'small'"),
    ([], 3, "expected weights of usema with in_channels 1 (this recipe's network), got in_channels 3"),
    (["model.overrides.mlp_ratio=2.0"], 1, "expected weights of usema with overrides {} (this recipe's network), "
                                         "got overrides {'mlp_ratio': 2.0}"),
])
def test_weights_of_another_network_are_refused_by_their_spec(tmp_path, source_overrides, in_channels, what):
    source = write_source(tmp_path / "other.pt", BINARY, *source_overrides, in_channels=in_channels)
    with pytest.raises(UsemaError) as err:
        trainer(THREE, init=read_init_source(str(source)))
    assert str(err.value).startswith(f"model.init_from: {source.resolve()}: ")
    assert what in str(err.value) and "\n" not in str(err.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "network": {}, "recipe": {}, "payload": _RunsCode()}, path)
    with pytest.raises(UsemaError, match=r"^model\.init_from: .*evil\.pt: refused: .*weights_only"):
        read_init_source(str(path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("given,expected", [
    ("", "model.init_from: expected a run directory, checkpoint or bundle, or null"),
    ("missing", "model.init_from: missing: no such run directory, checkpoint or bundle"),
])
def test_an_unusable_path_is_one_line_naming_the_key(tmp_path, monkeypatch, given, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsemaError, match=f"^{expected}"):
        read_init_source(given)


# ------------------------------------------------------------------------------------------ end to end
QUICK = ["--set", "train.epochs=2", "--set", "train.iterations_per_epoch=3", "--set", "train.batch_size=2",
         "--set", "train.checkpoint_every=2", "--set", "data.patch_size=[64,64]", "--set", "data.num_workers=0",
         "--set", "val.roi_size=[128,128]", "--set", "val.overlap=0", "--set", "model.overrides.drop_path=0.2"]


def usema(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """``python -m usema ARGS`` with one OpenMP thread, stopped at the fault point ``fault`` if given."""
    env = {k: v for k, v in os.environ.items() if k != "USEMA_FAULT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["USEMA_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "usema", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.mark.slow
def test_fine_tuning_from_an_exported_bundle_resumes_bit_exactly_without_the_source(tmp_path):
    """Binary nuclei → exported bundle → background/interior/boundary fine-tuning, killed mid-run and resumed
    after the bundle is gone: the same weights and metrics as the uninterrupted fine-tuning run."""
    source_run, bundle = tmp_path / "source", tmp_path / "bundle"
    ok = usema("train", "demo_nuclei", *QUICK, "--set", "train.epochs=1", "--output", str(source_run))
    assert ok.returncode == 0, ok.stderr[-2000:]
    ok = usema("export", str(source_run), "--output", str(bundle))
    assert ok.returncode == 0, ok.stderr[-2000:]
    tune = ["train", "demo_nuclei", *QUICK, "--set", "data.target=instance_boundary",
            "--set", f"model.init_from={bundle}"]

    reference = usema(*tune, "--output", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert f"usema: model.init_from {bundle}: loaded " in reference.stdout

    run_dir = tmp_path / "tuned"
    killed = usema(*tune, "--output", str(run_dir), fault="train.iteration@4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    shutil.rmtree(bundle)  # a resumed run continues from its own checkpoint, never from the source again
    resumed = usema(*tune, "--output", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "model.init_from" not in resumed.stdout

    expected = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)
    got = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert expected["model"].keys() == got["model"].keys()
    assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in expected["metrics"]["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in got["metrics"]["history"]]
    assert got["metrics"]["init_from"] == expected["metrics"]["init_from"]
    assert got["metrics"]["init_from"]["path"] == str(bundle) and got["metrics"]["init_from"]["loaded"] > 0
    assert got["recipe"]["model"]["init_from"] == str(bundle)
