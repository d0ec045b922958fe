"""Training recipes: YAML files validated into typed dataclasses.

A recipe is plain data (``yaml.safe_load``); nothing in it is ever evaluated. Every key is checked
against the dataclass fields below: an unknown key, a wrong type, a value outside its choices or a
missing required key raises :class:`usema.errors.UsemaError` naming the file and the dotted key.
``docs/recipes.md`` documents each key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from usema.errors import UsemaError

RECIPE_DIR = Path(__file__).parent / "recipes"
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MISSING = dataclasses.MISSING


@dataclass
class DataConfig:
    source: Literal["demo_brain", "demo_nuclei", "nnunet"]
    root: str | None = None
    spatial_dims: Literal[2, 3] = 2
    slice_axis: Literal[0, 1, 2] = 2
    normalization: Literal["ct", "zscore", "rgb", "none"] = "zscore"
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    fg_oversample: float = 0.33
    cache: bool = True
    num_workers: int = 2
    val_fraction: float = 0.2
    target: Literal["binary", "instance_boundary"] = "binary"
    labels: dict[int, str] | None = None


@dataclass
class ModelConfig:
    name: Literal["usema", "basicunet", "dynunet", "swinunetr", "unetr", "segresnet"] = "usema"
    preset: Literal["tiny", "small", "base"] = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 50
    iterations_per_epoch: int = 250
    batch_size: int = 2
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 3.0e-5
    schedule: Literal["poly", "cosine"] = "poly"
    deep_supervision: bool = True
    amp: bool = True
    seed: int = 0
    checkpoint_every: int = 0


@dataclass
class ValConfig:
    interval: int = 1
    roi_size: list[int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4


@dataclass
class EvaluationConfig:
    nsd_tolerance_mm: Union[float, dict[str, float]] = 2.0
    instance_f1: bool = False
    interior_label: int = 1


@dataclass
class OutputConfig:
    dir: str | None = None


@dataclass
class Recipe:
    name: str
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def output_dir(self) -> Path:
        """Run directory: ``output.dir`` or ``runs/<name>``."""
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name

    @property
    def roi_size(self) -> list[int]:
        """Sliding-window size for validation/inference: ``val.roi_size`` or ``data.patch_size``."""
        return list(self.val.roi_size or self.data.patch_size)


# ---------------------------------------------------------------------------------------------
# generic type checking of plain YAML data against dataclass type hints


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    names = {int: "integer", float: "number", bool: "true/false", str: "string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against type ``tp`` (ints accepted for floats; digit strings for int keys).

    Raises UsemaError ``"<where>: expected <type>, got <value>"``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise UsemaError(f"{where}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UsemaError:
                continue
        raise UsemaError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UsemaError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UsemaError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        key_tp, val_tp = args
        out = {}
        for k, v in value.items():
            if key_tp is int and isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # JSON / checkpoint round trips stringify integer keys
            out[_coerce(k, key_tp, f"{where} key")] = _coerce(v, val_tp, f"{where}.{k}")
        return out
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UsemaError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _unknown_key(where: str, key: str, valid: Sequence[str]) -> UsemaError:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return UsemaError(f"{where}{key}: unknown key{hint}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, checking keys and types.

    ``prefix`` is the dotted path of the section (``"data."``), ``source`` the file name for messages.
    """
    if not isinstance(data, dict):
        raise UsemaError(f"{source}: {prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            err = _unknown_key(prefix, key, list(fields))
            raise UsemaError(f"{source}: {err}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, f"{prefix}{key}.", source)
        else:
            try:
                kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
            except UsemaError as exc:
                raise UsemaError(f"{source}: {exc}") from None
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise UsemaError(f"{source}: {prefix}{name}: required key is missing")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# cross-field rules that types alone cannot express


def _check_ranges(r: Recipe, source: str) -> None:
    d, t, v = r.data, r.train, r.val

    def fail(key: str, expected: str, got: Any) -> None:
        raise UsemaError(f"{source}: {key}: expected {expected}, got {got!r}")

    if not r.name or "/" in r.name or r.name in {".", ".."}:
        fail("name", "a non-empty run name without '/'", r.name)
    if d.source == "nnunet" and not d.root:
        raise UsemaError(f"{source}: data.root: required when data.source is 'nnunet' (the DatasetXXX_Name folder)")
    if d.source == "demo_nuclei" and d.spatial_dims != 2:
        fail("data.spatial_dims", "2 for the 2D nuclei image", d.spatial_dims)
    if len(d.patch_size) != d.spatial_dims or min(d.patch_size) < 1:
        fail("data.patch_size", f"{d.spatial_dims} positive integers (data.spatial_dims)", d.patch_size)
    if v.roi_size is not None and (len(v.roi_size) != d.spatial_dims or min(v.roi_size) < 1):
        fail("val.roi_size", f"null or {d.spatial_dims} positive integers", v.roi_size)
    if not 0.0 <= d.fg_oversample <= 1.0:
        fail("data.fg_oversample", "a fraction in [0, 1]", d.fg_oversample)
    if not 0.0 <= d.val_fraction < 1.0:
        fail("data.val_fraction", "a fraction in [0, 1)", d.val_fraction)
    if not 0.0 <= v.overlap < 1.0:
        fail("val.overlap", "a fraction in [0, 1)", v.overlap)
    for key, value, low in [
        ("data.num_workers", d.num_workers, 0),
        ("train.epochs", t.epochs, 1),
        ("train.iterations_per_epoch", t.iterations_per_epoch, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.checkpoint_every", t.checkpoint_every, 0),
        ("val.interval", v.interval, 1),
        ("val.sw_batch_size", v.sw_batch_size, 1),
    ]:
        if value < low:
            fail(key, f"an integer >= {low}", value)
    for key, value in [("train.lr", t.lr), ("train.weight_decay", t.weight_decay)]:
        if value < 0:
            fail(key, "a non-negative number", value)
    if d.labels is not None:
        if d.labels.get(0) is None:
            fail("data.labels", "a mapping that includes 0 (background)", d.labels)
        if min(d.labels) < 0:
            fail("data.labels", "non-negative class indices", d.labels)
        if len(set(d.labels.values())) != len(d.labels):
            fail("data.labels", "unique class names", d.labels)
    _check_tolerances(r, source)


def _check_tolerances(r: Recipe, source: str) -> None:
    tol = r.evaluation.nsd_tolerance_mm
    values = tol.values() if isinstance(tol, dict) else [tol]
    if any(x < 0 for x in values):
        raise UsemaError(f"{source}: evaluation.nsd_tolerance_mm: expected non-negative millimetres, got {tol!r}")
    if isinstance(tol, dict) and r.data.labels is not None:
        names = [n for k, n in r.data.labels.items() if k != 0]
        for key in tol:
            if key not in names:
                err = _unknown_key("evaluation.nsd_tolerance_mm.", key, names)
                raise UsemaError(f"{source}: {err} (keys are data.labels names)")


# ---------------------------------------------------------------------------------------------
# public API


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Validate a plain mapping (a parsed YAML recipe) into a :class:`Recipe`; ``source`` names it in errors."""
    recipe = _build(Recipe, data, "", source)
    _check_ranges(recipe, source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain, YAML- and ``torch.load(weights_only=True)``-safe dict; ``recipe_from_dict`` inverts it."""
    return dataclasses.asdict(recipe)


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    """A file path, or a bare packaged recipe name such as ``demo_brain`` -> ``usema/recipes/demo_brain.yaml``."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    packaged = RECIPE_DIR / f"{path_or_name}.yaml"
    if path.suffix == "" and path.name == str(path_or_name) and packaged.is_file():
        return packaged
    known = ", ".join(list_recipes())
    raise UsemaError(f"{path_or_name}: no such recipe file (packaged recipes: {known})")


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``usema/recipes``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=2"`` -> (["train", "epochs"], 2); the value is parsed with ``yaml.safe_load``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsemaError(f"--set {text}: expected KEY=VALUE with a dotted key such as train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsemaError(f"--set {text}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set each ``section.key=value`` in a copy of the mapping ``data`` (type checks happen on validation).

    Keys below a mapping-valued field (``model.overrides.feature_size=24``) set an entry of that mapping.
    """
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsemaError(f"--set {text}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path_or_name: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; ``path_or_name`` is a YAML file or a packaged recipe name.

    Errors name the file (or ``--set``) and the dotted key.
    """
    path = resolve_recipe_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsemaError(f"{path}: cannot read recipe ({exc})") from None
    except yaml.YAMLError as exc:
        raise UsemaError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise UsemaError(f"{path}: expected a YAML mapping with sections name, data, model, train, val, ...")
    recipe = recipe_from_dict(data, str(path))
    for text in overrides:  # one at a time, so that an error names the --set that caused it
        data = apply_overrides(data, [text])
        recipe = recipe_from_dict(data, f"--set {text}")
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (what a run directory's ``recipe.yaml`` holds)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
