"""Untrusted files (issue 5): shared checkpoints and bundles cannot run code, recipes are never evaluated,
dataset.json paths stay inside their dataset, and exported bundles hold only allow-listed `$` expressions."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_bad_inputs import refused, write_recipe
from test_bundle import make_run

from usema.bundle.export import export_bundle
from usema.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "usema"

# Every `$` expression an exported bundle may contain, written out independently of usema.bundle.export:
# building the network, the device, the data list from dataset_dir, loading model.pt, running the evaluator.
ALLOWED_EXPRESSIONS = {
    "$import glob",
    "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
    "$@bundle_root + '/eval'",
    "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
    "$list(sorted(glob.glob(@dataset_dir + '/*.png')))",
    (
        "$[[f[:-len('_0000.nii.gz')] + '_%04d.nii.gz' % c for c in range(@num_channels)]"
        " for f in sorted(glob.glob(@dataset_dir + '/*_0000.nii.gz'))]"
    ),
    "$[{'image': i} for i in @datalist]",
    "$@network_def.to(@device)",
    "$@bundle_root + '/models/model.pt'",
    "$@checkpointloader(@evaluator)",
    "$@evaluator.run()",
}
# a class name that MONAI's ConfigParser would execute if it were copied into a bundle config as is
HOSTILE = "$__import__('os').system('touch PWNED')"


class CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, i.e. runs code chosen by the file's author."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped file whose unpickling would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.ones(1)}, "network": {"name": "usema"}, "recipe": {},
                "payload": CreatesFileWhenUnpickled(marker)}, path)
    return path


# ------------------------------------------------------------------------------ checkpoints and bundles
def test_the_malicious_payload_is_armed(tmp_path: Path) -> None:
    """Guards the tests below: an unsafe load of the same file really does run the payload."""
    marker = tmp_path / "PWNED"
    torch.load(malicious_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def _bundle_with(weights: Path, tmp_path: Path) -> Path:
    bundle = export_bundle(make_run(tmp_path / "run"), tmp_path / "bundle")
    shutil.copy(weights, bundle / "models" / "model.pt")
    return bundle


@pytest.mark.parametrize("entry", ["infer-checkpoint", "infer-bundle", "export", "train-resume"])
def test_malicious_pickles_are_refused_without_running(entry: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes(b"")  # never read: the model is loaded first
    run_dir = tmp_path / "run_resume"
    if entry == "train-resume":
        malicious_checkpoint(run_dir / "checkpoints" / "last.pt", marker)
    argv = {
        "infer-checkpoint": ["infer", str(evil), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
        "infer-bundle": ["infer", str(tmp_path / "bundle"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
        "export": ["export", str(evil), "--output", str(tmp_path / "exported")],
        "train-resume": ["train", "demo_nuclei", "--output", str(run_dir), "--resume"],
    }[entry]
    if entry == "infer-bundle":
        _bundle_with(evil, tmp_path)
    refused(argv, capsys, ".pt: refused: it holds Python objects beyond tensors and plain data")
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Static check over usema/: torch.load always passes weights_only=True, and no unsafe loader is called."""
    unsafe = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "load"),
              ("pickle", "loads"), ("torch", "jit.load")}
    loads, problems = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            if any(name == f"{module}.{func}" for module, func in unsafe):
                problems.append(f"{where}: {name}()")
            if name == "torch.load":
                loads += 1
                flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if flags.get("weights_only") != "True":
                    problems.append(f"{where}: torch.load without weights_only=True")
    assert loads >= 1 and problems == []  # the scan does see the loader (usema.run.checkpoint)


# --------------------------------------------------------------------------------------------- recipes
def test_recipes_with_python_tags_are_refused_without_running(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{source: demo_nuclei}}\n")
    refused(["train", str(recipe), "--output", str(tmp_path / "run")], capsys, str(recipe), "not valid YAML")
    override = f"name=!!python/object/apply:os.system ['touch {marker}']"
    refused(["train", "demo_nuclei", "--set", override, "--output", str(tmp_path / "run")], capsys,
            "--set name=", "not valid YAML")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_recipe_strings_stay_strings(tmp_path: Path) -> None:
    """A recipe value that looks like code is kept as text in the resolved recipe, never run."""
    from usema.config import load_recipe  # noqa: PLC0415

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, data={"labels": {0: "bg", 1: HOSTILE}}))
    assert recipe.data.labels[1] == HOSTILE and not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------------------- dataset paths
@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "imagesTr/../../outside_0000.nii.gz"])
def test_dataset_json_paths_cannot_leave_the_dataset(entry: str, ct_dataset: Path, tmp_path: Path, capsys) -> None:
    root = shutil.copytree(ct_dataset, tmp_path / "data" / ct_dataset.name)
    shutil.copy(root / "imagesTr" / "case_000_0000.nii.gz", tmp_path / "data" / "outside_0000.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["dataset"] = {"case_000": {"images": [entry], "label": "labelsTr/case_000.nii.gz"}}
    meta["numTraining"] = 1
    (root / "dataset.json").write_text(json.dumps(meta))
    run_dir = tmp_path / "run"
    refused(["train", str(write_recipe(tmp_path / "r.yaml", root)), "--output", str(run_dir)], capsys,
            str(root / "dataset.json"), f"{entry}: path escapes the dataset folder")
    assert main(["datasets", "check", str(root)]) != 0
    assert "path escapes the dataset folder" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- bundles
def _strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


@pytest.mark.parametrize("input_format", ["nifti", "png"])
def test_exported_configs_hold_only_allow_listed_expressions(input_format: str, tmp_path: Path) -> None:
    bundle = export_bundle(make_run(tmp_path / "run"), tmp_path / "bundle", input_format=input_format)
    configs = sorted((bundle / "configs").iterdir())
    assert {p.name for p in configs} >= {"inference.json", "metadata.json"}
    for path in configs:
        text = path.read_text()
        strings = _strings(json.loads(text) if path.suffix == ".json" else yaml.safe_load(text))
        expressions = {s for s in strings if s.startswith("$")}
        assert expressions <= ALLOWED_EXPRESSIONS, f"{path.name}: {expressions - ALLOWED_EXPRESSIONS}"
        assert not any(s.startswith("%") for s in strings), path.name  # no macro reads another file


@pytest.mark.parametrize(
    ("field", "value"),
    [("labels", HOSTILE), ("labels", "%/etc/passwd#x"), ("labels", "@evaluator"), ("name", "$print(1)")],
)
def test_export_refuses_names_that_monai_would_parse(field: str, value: str, tmp_path: Path, capsys) -> None:
    """Class and run names are copied into the configs: one that MONAI would run, read or resolve is refused."""
    run = make_run(tmp_path / "run")
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    if field == "labels":
        ckpt["labels"]["1"] = value
    else:
        ckpt["recipe"]["name"] = value
    torch.save(ckpt, run / "checkpoints" / "best.pt")
    key = "labels.1" if field == "labels" else "name"
    refused(["export", str(run), "--output", str(tmp_path / "bundle")], capsys, "best.pt", f"{key}: expected a plain name")
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "PWNED").exists()
