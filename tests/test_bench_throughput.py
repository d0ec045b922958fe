"""`usema bench`: training images/s, `usema infer` voxels/s against BasicUNet, the defaults, and the load check."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import pytest

from usema.bench import command, machine
from usema.bench.settings import DEFAULT_NETS
from usema.cli import main
from usema.errors import UsemaError

QUIET = (0.25, 0.5, 0.75)
BUSY = (50.0, 40.0, 30.0)


def _load(monkeypatch: pytest.MonkeyPatch, load: tuple[float, float, float]) -> None:
    monkeypatch.setattr(machine, "load_averages", lambda: load)


def _config(*argv: str):
    parser = argparse.ArgumentParser().add_subparsers()
    return command._config_from_args(command.add_parser(parser).parse_args(list(argv)))


def test_defaults_are_the_full_run() -> None:
    """2D: every preset and peer at 256/512/1024, training at 256 and 512, usema infer on 256×256×200; 3D: up
    to 128³, training at 64³, no usema infer (a 2D-model benchmark)."""
    two = _config()
    assert set(two.nets) == {"usema-tiny", "usema-small", "usema-base", "dynunet", "swinunetr", "unetr", "basicunet"}
    assert (two.sizes, two.train_sizes, two.train_batch, two.infer_shape) == ((256, 512, 1024), (256, 512), 2,
                                                                              (256, 256, 200))  # fmt: skip
    three = _config("--dims", "3")
    assert three.nets == DEFAULT_NETS[3] and three.sizes == (64, 96, 128)
    assert (three.train_sizes, three.infer_shape) == ((64,), None)


def test_train_and_infer_options() -> None:
    assert _config("--train-size", "128").train_sizes == (128,)  # the option's earlier spelling still works
    assert _config("--train-sizes", "128", "256").train_sizes == (128, 256)
    assert _config("--infer-shape", "64", "32", "5", "--infer-repeats", "2").infer_shape == (64, 32, 5)
    assert _config("--no-infer").infer_shape is None
    assert _config("--quick").infer_shape == (64, 64, 8)
    with pytest.raises(UsemaError, match="^--infer-shape: "):
        _config("--dims", "3", "--infer-shape", "64", "64", "4")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--nets", "unetr", "--train-sizes", "64", "72"], "--train-sizes"),
        (["--nets", "swinunetr", "--infer-shape", "112", "64", "4"], "--infer-shape"),
        (["--infer-shape", "32", "64", "4"], "--infer-shape"),
    ],
)
def test_bad_sizes_come_before_the_load_check(argv, key, monkeypatch, capsys) -> None:
    _load(monkeypatch, BUSY)
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usema: error: {key}:") and err.count("\n") == 1


def test_load_limit_is_half_a_process_per_usable_cpu(monkeypatch) -> None:
    _load(monkeypatch, (1.0, 0.0, 0.0))
    assert not machine.read_load(cpus=2).loaded  # 1.0 is not above 0.5 × 2
    _load(monkeypatch, (1.01, 0.0, 0.0))
    busy = machine.read_load(cpus=2)
    assert busy.loaded and busy.limit == 1.0
    with pytest.raises(UsemaError, match=r"1-minute load 1\.01 is above 1\.00 .*--allow-load$"):
        machine.refuse_loaded(busy, allow_load=False)
    machine.refuse_loaded(busy, allow_load=True)
    monkeypatch.setattr(machine, "load_averages", lambda: None)  # no load average on this system: nothing to hold
    assert not machine.read_load(cpus=2).loaded


def test_loaded_machine_is_refused_before_anything_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    _load(monkeypatch, BUSY)
    monkeypatch.setattr("usema.bench.harness.run_benchmark", lambda *a: pytest.fail("measured on a loaded machine"))
    out = tmp_path / "bench.md"
    assert main(["bench", "--quick", "--nets", "usema-tiny", "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usema: error: load average: 1-minute load 50.00 is above ")
    assert captured.err.count("\n") == 1 and "--allow-load" in captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # builds, trains and runs usema infer with two small networks
def test_throughput_report(tmp_path: Path, monkeypatch, capsys) -> None:
    """images/s = batch / median step; voxels/s = voxels / median wall time of usema infer, ×BasicUNet; the
    load averages and usable CPUs in the JSON machine section and the markdown header."""
    _load(monkeypatch, QUIET)
    out = tmp_path / "bench.md"
    argv = ["bench", "--quick", "--nets", "usema-tiny", "basicunet", "--no-memory", "--train-sizes", "64", "96",
            "--infer-shape", "64", "64", "4", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    md = out.read_text()
    assert md in capsys.readouterr().out
    results = json.loads(out.with_suffix(".json").read_text())

    train = {(r["net"], r["size"]): r for r in results["train"]}
    assert set(train) == {(n, s) for n in ("usema-tiny", "basicunet") for s in (64, 96)}
    for row in train.values():
        assert row["train_step_s"] == statistics.median(row["train_samples_s"])
        assert row["images_per_s"] == pytest.approx(2 / row["train_step_s"])
        assert f"| {row['images_per_s']:.3f} |" in md

    infer = {r["net"]: r for r in results["infer"]}
    assert set(infer) == {"usema-tiny", "basicunet"}
    for row in infer.values():
        assert row["voxels"] == 64 * 64 * 4 and row["shape"] == [64, 64, 4] and row["repeats"] == 1
        assert row["wall_s"] == statistics.median(row["wall_samples_s"]) >= row["pipeline_s"] > 0
        assert row["voxels_per_s"] == pytest.approx(row["voxels"] / row["wall_s"])
        assert row["peak_rss_mib"] > 0 and f"| {row['peak_rss_mib']:.0f} |" in md
    # every run in a process of its own, so no network inherits the heap another one left
    pids = [pid for row in infer.values() for pid in row["pids"]]
    assert len(set(pids)) == len(pids) == 2 and os.getpid() not in pids
    assert infer["basicunet"]["voxels_per_s_ratio"] == 1.0
    ratio = infer["usema-tiny"]["voxels_per_s"] / infer["basicunet"]["voxels_per_s"]
    assert infer["usema-tiny"]["voxels_per_s_ratio"] == pytest.approx(ratio)
    assert f"| usema-tiny | {infer['usema-tiny']['wall_s']:.1f} | 1 |" in md and "voxels/s ×BasicUNet" in md

    host = results["machine"]
    assert host["load_before"] == host["load_after"] == {"1min": 0.25, "5min": 0.5, "15min": 0.75}
    assert host["usable_cpus"] >= 1 and host["load_limit_1min"] == 0.5 * host["usable_cpus"]
    assert host["loaded"] is False and "LOADED" not in md
    assert f"{host['usable_cpus']} usable CPUs" in md and "(1/5/15 min) 0.25/0.50/0.75 before" in md


@pytest.mark.slow  # builds and runs one small network
def test_allow_load_runs_and_flags_the_report(tmp_path: Path, monkeypatch, capsys) -> None:
    _load(monkeypatch, BUSY)
    out = tmp_path / "bench.md"
    argv = ["bench", "--quick", "--nets", "usema-tiny", "--no-memory", "--no-train", "--no-infer", "--allow-load",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    md = out.read_text()
    assert md.startswith("**LOADED MACHINE: timings not comparable** (1-minute load 50.00 before the run")
    host = json.loads(out.with_suffix(".json").read_text())["machine"]
    assert host["loaded"] is True and host["load_before"]["1min"] == 50.0
    assert json.loads(out.with_suffix(".json").read_text())["config"]["allow_load"] is True
    assert "50.00/40.00/30.00 before" in md
