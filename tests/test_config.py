"""Recipes: every shipped recipe loads; typos, wrong types and missing keys give one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from usema.cli import main
from usema.config import (
    RECIPE_DIR,
    Recipe,
    dump_recipe,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from usema.errors import UsemaError

SHIPPED = list_recipes()


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def minimal(**sections) -> dict:
    return {"name": "t", "data": {"source": "demo_brain"}, **sections}


def test_ships_every_recipe_of_the_issue():
    expected = {"demo_brain", "demo_nuclei", "flare22", "flare22_small", "flare22_3d", "amos_mr", "amos_mr_small",
                "neurips_cell", "neurips_cell_small", "endovis17", "endovis17_small"}
    assert expected <= set(SHIPPED)
    assert (Path(__file__).parents[1] / "recipes" / "demo_brain.yaml").is_file()  # the repo-root link


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe) and recipe.name == name
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe
    assert len(recipe.data.patch_size) == recipe.data.spatial_dims
    if isinstance(recipe.evaluation.nsd_tolerance_mm, dict):  # per-class tolerances name real classes
        assert set(recipe.evaluation.nsd_tolerance_mm) <= set(recipe.data.labels.values())


def test_paper_and_small_variants_differ_as_documented():
    paper, small = load_recipe("flare22"), load_recipe("flare22_small")
    assert (paper.model.preset, paper.train.optimizer, paper.train.schedule) == ("base", "sgd", "poly")
    assert (small.model.preset, small.train.optimizer, small.train.schedule) == ("tiny", "adamw", "cosine")
    assert paper.data.patch_size == [512, 512] and paper.data.normalization == "ct"
    assert load_recipe("flare22_3d").data.spatial_dims == 3
    assert load_recipe("neurips_cell").evaluation.protocol == "neurips_cell"  # instance F1 by its own protocol


def test_bare_name_and_path_give_the_same_recipe():
    assert load_recipe("demo_brain") == load_recipe(RECIPE_DIR / "demo_brain.yaml")


def test_unknown_recipe_name_lists_packaged_ones():
    with pytest.raises(UsemaError, match="demo_brain"):
        load_recipe("no_such_recipe")


def test_misspelt_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, minimal(data={"source": "demo_brain", "patch_sise": [64, 64]}))
    with pytest.raises(UsemaError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and "data.patch_sise" in msg and "did you mean 'data.patch_size'" in msg
    assert "\n" not in msg


def test_misspelt_section_suggests(tmp_path):
    with pytest.raises(UsemaError, match="trian: unknown key; did you mean 'train'"):
        load_recipe(write(tmp_path, minimal(trian={"epochs": 2})))


@pytest.mark.parametrize(
    "section, value, expected",
    [
        ("train", {"epochs": "ten"}, "train.epochs: expected integer, got 'ten'"),
        ("train", {"epochs": True}, "train.epochs: expected integer"),
        ("train", {"lr": [1]}, "train.lr: expected number"),
        ("data", {"source": "demo_brain", "patch_size": 128}, "data.patch_size: expected list of integer"),
        ("data", {"source": "demo_brain", "cache": "yes"}, "data.cache: expected true/false"),
        ("model", {"overrides": [1, 2]}, "model.overrides: expected mapping"),
    ],
)
def test_wrong_type_names_key_expected_and_value(tmp_path, section, value, expected):
    with pytest.raises(UsemaError, match=expected.replace("[", r"\[")):
        load_recipe(write(tmp_path, {**minimal(), section: value}))


def test_bad_choice_lists_the_choices(tmp_path):
    with pytest.raises(UsemaError) as err:
        load_recipe(write(tmp_path, minimal(train={"optimizer": "adam"})))
    assert "train.optimizer" in str(err.value) and "'sgd', 'adamw'" in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"data": {"source": "demo_brain"}}, "name"),
        ({"name": "t", "data": {"spatial_dims": 2}}, "data.source"),
        ({"name": "t"}, "data"),
        ({"name": "t", "data": {"source": "nnunet"}}, "data.root"),
    ],
)
def test_missing_required_key(tmp_path, data, key):
    with pytest.raises(UsemaError, match=f"{key}: required"):
        load_recipe(write(tmp_path, data))


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"data": {"source": "demo_brain", "patch_size": [64, 64, 64]}}, "data.patch_size: expected 2 positive"),
        ({"data": {"source": "demo_brain", "fg_oversample": 1.5}}, "data.fg_oversample"),
        ({"train": {"batch_size": 0}}, "train.batch_size: expected an integer >= 1"),
        ({"evaluation": {"nsd_tolerance_mm": -1}}, "evaluation.nsd_tolerance_mm"),
        ({"data": {"source": "demo_brain", "labels": {1: "a"}}}, "data.labels: expected a mapping that includes 0"),
    ],
)
def test_out_of_range_values(tmp_path, section, expected):
    with pytest.raises(UsemaError, match=expected):
        load_recipe(write(tmp_path, {**minimal(), **section}))


def test_set_overrides_parse_yaml_values_and_nested_keys():
    recipe = load_recipe("demo_brain", ["train.epochs=2", "data.patch_size=[64, 96]", "model.preset=small",
                                        "model.overrides.drop_path=0.1", "train.lr=1e-3", "output.dir=/tmp/x"])
    assert recipe.train.epochs == 2 and recipe.data.patch_size == [64, 96]
    assert recipe.model.preset == "small" and recipe.model.overrides == {"drop_path": 0.1}
    assert recipe.train.lr == pytest.approx(1e-3) and recipe.output_dir == Path("/tmp/x")
    assert load_recipe("demo_brain").train.epochs != 2  # the packaged file is untouched


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=2", "did you mean 'train.epochs'"),
        ("train.epochs=two", "train.epochs: expected integer, got 'two'"),
        ("train.epochs", "expected KEY=VALUE"),
        ("data.patch_size=[1,", "not valid YAML"),
    ],
)
def test_set_errors_are_checked_like_the_file(override, expected):
    with pytest.raises(UsemaError, match=expected):
        load_recipe("demo_brain", [override])


def test_recipe_is_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\ndata: {{source: demo_brain}}\n")
    with pytest.raises(UsemaError, match="not valid YAML"):
        load_recipe(path)
    assert not marker.exists()


def test_dict_round_trip_survives_stringified_label_keys():
    recipe = recipe_from_dict(minimal(data={"source": "demo_brain", "labels": {0: "bg", 1: "a"}}))
    as_json_keys = recipe_to_dict(recipe)
    as_json_keys["data"]["labels"] = {str(k): v for k, v in as_json_keys["data"]["labels"].items()}
    assert recipe_from_dict(as_json_keys) == recipe


def test_cli_prints_one_line_error_for_bad_recipe(tmp_path, capsys):
    path = write(tmp_path, minimal(data={"source": "demo_brain", "patch_sise": [64, 64]}))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "data.patch_size" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ hostile recipes (issue 13)
@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "data.fg_oversample", "val.overlap"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_numbers_are_refused(key, value):
    """NaN passes every `value < 0` check; it must be refused by name, not train an all-NaN model."""
    with pytest.raises(UsemaError, match=f"--set {key}={value}: {key}: expected a finite number"):
        load_recipe("demo_brain", [f"{key}={value}"])


def test_nan_learning_rate_in_the_file_is_refused_before_training(tmp_path, capsys):
    path = write(tmp_path, "name: t\ndata: {source: demo_nuclei}\ntrain: {lr: .nan}\n")
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"usema: error: {path}: train.lr: expected a finite number, got nan\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.epochs=100000000000000000000"], "train.epochs: expected an integer of magnitude at most 2147483647"),
        (["train.epochs=100000", "train.iterations_per_epoch=100000"], "train.epochs: expected epochs × train.iter"),
    ],
)
def test_huge_budgets_are_refused(overrides, expected):
    with pytest.raises(UsemaError, match=expected):
        load_recipe("demo_brain", overrides)


def test_duplicate_keys_are_refused_with_the_line(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  source: demo_brain\n  patch_size: [64, 64]\n  patch_size: [32, 32]\n")
    with pytest.raises(UsemaError, match=r"recipe.yaml: patch_size: key given twice \(line 5\)"):
        load_recipe(path)
    with pytest.raises(UsemaError, match="key given twice"):
        load_recipe("demo_brain", ["model.overrides={a: 1, a: 2}"])


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """762 bytes of nested aliases expand to ~10^9 values; refused by counting, never by expanding."""
    lines = ["name: t", "data: {source: demo_brain}", "x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(lines[:2]) + "\nmodel:\n  overrides:\n" + "\n".join("    " + line for line in lines[2:]) + "\n"
    path = write(tmp_path, text)
    assert len(text) < 1000
    with pytest.raises(UsemaError, match="expected a recipe of at most 100000 values"):
        load_recipe(path)


def test_dependent_keys_change_together_with_set():
    """A 3D patch and spatial_dims=3 are only valid together; each alone is not."""
    recipe = load_recipe("demo_brain", ["data.spatial_dims=3", "data.patch_size=[32, 32, 32]"])
    assert recipe.data.spatial_dims == 3 and recipe.data.patch_size == [32, 32, 32]
    with pytest.raises(UsemaError, match=r"data.patch_size: expected 3 positive integers"):
        load_recipe("demo_brain", ["data.spatial_dims=3"])


def test_a_single_bad_set_among_good_ones_is_named():
    with pytest.raises(UsemaError, match=r"^--set train.lr=-1: train.lr: expected a non-negative number"):
        load_recipe("demo_brain", ["data.spatial_dims=3", "data.patch_size=[32, 32, 32]", "train.lr=-1"])
