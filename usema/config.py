"""Training recipes: YAML files validated into typed dataclasses.

A recipe is plain data (``yaml.safe_load``); nothing in it is ever evaluated. Every key is checked
against the dataclass fields below: an unknown key, a wrong type, a value outside its choices or a
missing required key raises :class:`usema.errors.UsemaError` naming the file and the dotted key.
``docs/recipes.md`` documents each key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import yaml

from usema.errors import UsemaError
from usema.io.files import read_input_text

RECIPE_DIR = Path(__file__).parent / "recipes"
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# integers feed torch and C counters: larger values overflow them instead of meaning anything
MAX_INT = 2**31 - 1
# a recipe is a few hundred values; a YAML alias bomb (or a shared-reference pickle) expands to billions
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_BYTES = 1 << 20


@dataclass
class DataConfig:
    source: Literal["demo_brain", "demo_nuclei", "nnunet"]
    root: str | None = None
    spatial_dims: Literal[2, 3] = 2
    slice_axis: Literal[0, 1, 2] = 2
    normalization: Literal["ct", "zscore", "rgb", "none"] = "zscore"
    target_spacing: list[float | None] | None = None
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    fg_oversample: float = 0.33
    augmentation: Literal["nnunet", "light", "none"] = "light"
    cache: bool = True
    num_workers: int = 2
    val_fraction: float = 0.2
    target: Literal["binary", "instance_boundary"] = "binary"
    labels: dict[int, str] | None = None


@dataclass
class ModelConfig:
    """``init_from``: a run directory (its best.pt, else last.pt), a checkpoint file or an exported bundle whose
    weights start a fresh run (fine-tuning); its network must be this one up to the class count
    (docs/training.md, "Fine-tuning"). Ignored on ``--resume``, where the run's own checkpoint wins."""

    name: Literal["usema", "basicunet", "dynunet", "swinunetr", "unetr", "segresnet"] = "usema"
    preset: Literal["tiny", "small", "base"] = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None


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
    """Mixed precision on CUDA (bf16 where the GPU supports it, else fp16 with loss scaling); false = float32."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: as ``amp`` says (CUDA autocast; float32 on the CPU). bf16 also on the CPU, where the processor has
    native bfloat16 kernels (AVX512-BF16 or AMX): usema-tiny's training step 22% and usema-base's 34% shorter on
    such a CPU (docs/training.md, "Mixed precision"). fp32 or fp16 (CUDA only) force that precision."""
    seed: int = 0
    fold: Union[int, Literal["all"], None] = None
    checkpoint_every: int = 0
    compile: bool = False
    """torch.compile the training forward/backward (docs/training.md, "Compiled training"); checkpoints, validation
    and resume use the uncompiled module, so the key may change on ``--resume``."""


@dataclass
class ValConfig:
    interval: int = 1
    roi_size: list[int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 4


@dataclass
class EvaluationConfig:
    protocol: Literal["flare22", "amos", "endovis17", "neurips_cell", "generic"] = "generic"
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
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message is the precise one
            return _coerce(value, options[0], where)
        for option in options:
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
    if tp is float:
        return _finite_float(value, where)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise UsemaError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is int and abs(value) > MAX_INT:
        raise UsemaError(f"{where}: expected an integer of magnitude at most {MAX_INT}, got {value}")
    return value


def _finite_float(value: Any, where: str) -> float:
    """A finite float from a number or a numeric string (YAML 1.1 reads 1e-3, without a dot, as a string)."""
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = value.strip()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsemaError(f"{where}: expected number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise UsemaError(f"{where}: expected a finite number, got {value!r}")
    return number


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
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
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
    _check_target_spacing(d, fail)
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
    if t.fold is not None and d.source != "nnunet":
        fail("train.fold", "null for the demo datasets (their split is fixed)", t.fold)
    if isinstance(t.fold, int) and t.fold < 0:
        fail("train.fold", "a fold index >= 0 or 'all'", t.fold)
    if t.epochs * t.iterations_per_epoch > MAX_INT:
        fail("train.epochs", f"epochs × train.iterations_per_epoch of at most {MAX_INT}", t.epochs)
    if d.labels is not None:
        if d.labels.get(0) is None:
            fail("data.labels", "a mapping that includes 0 (background)", d.labels)
        if min(d.labels) < 0:
            fail("data.labels", "non-negative class indices", d.labels)
        if len(set(d.labels.values())) != len(d.labels):
            fail("data.labels", "unique class names", d.labels)
    _check_tolerances(r, source)


def _check_target_spacing(d: DataConfig, fail: Callable[[str, str, Any], None]) -> None:
    """Millimetres per array axis of the data; a 2D model on volumes is resampled in-plane only (null there)."""
    spacing = d.target_spacing
    if spacing is None:
        return
    if d.source != "nnunet":
        fail("data.target_spacing", "null for the demo datasets (they are used on their own grid)", spacing)
    if len(spacing) not in (2, 3) or len(spacing) < d.spatial_dims:
        fail("data.target_spacing", f"null or one spacing per axis of the data ({d.spatial_dims} or 3)", spacing)
    if len(spacing) == 3 and d.spatial_dims == 2:
        in_plane = [s for a, s in enumerate(spacing) if a != d.slice_axis]
        if spacing[d.slice_axis] is not None or None in in_plane:
            fail("data.target_spacing", f"null at data.slice_axis ({d.slice_axis}) and positive millimetres on the "
                 "other axes (2D models are resampled in-plane only)", spacing)
    elif None in spacing:
        fail("data.target_spacing", "positive millimetres on every axis", spacing)
    if any(s is not None and s <= 0 for s in spacing):
        fail("data.target_spacing", "positive millimetres", spacing)


def _check_tolerances(r: Recipe, source: str) -> None:
    tol = r.evaluation.nsd_tolerance_mm
    values = tol.values() if isinstance(tol, dict) else [tol]
    if any(not x >= 0 or x == float("inf") for x in values):
        raise UsemaError(f"{source}: evaluation.nsd_tolerance_mm: expected finite non-negative millimetres, got {tol!r}")
    protocol = r.evaluation.protocol
    if protocol != "generic" and (isinstance(tol, dict) or r.evaluation.instance_f1):
        key = "nsd_tolerance_mm" if isinstance(tol, dict) else "instance_f1"
        raise UsemaError(f"{source}: evaluation.{key}: the {protocol} protocol uses its own published rules; "
                         "this key is for protocol generic")  # fmt: skip
    if isinstance(tol, dict) and r.data.labels is not None:
        names = [n for k, n in r.data.labels.items() if k != 0]
        for key in tol:
            if key not in names:
                err = _unknown_key("evaluation.nsd_tolerance_mm.", key, names)
                raise UsemaError(f"{source}: {err} (keys are data.labels names)")


# ---------------------------------------------------------------------------------------------
# public API


def check_size(data: Any, source: str, limit: int = MAX_RECIPE_VALUES) -> None:
    """Refuse data holding more than ``limit`` values once shared references are expanded (alias bombs)."""
    pending, count = [data], 0
    while pending:
        node = pending.pop()
        count += 1
        if count > limit:
            raise UsemaError(f"{source}: expected a recipe of at most {limit} values; it expands to more "
                             "(YAML aliases repeating large parts)")
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Validate a plain mapping (a parsed YAML recipe) into a :class:`Recipe`; ``source`` names it in errors."""
    check_size(data, source)
    recipe = _build(Recipe, data, "", source)
    _check_ranges(recipe, source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain, YAML- and ``torch.load(weights_only=True)``-safe dict; ``recipe_from_dict`` inverts it."""
    return dataclasses.asdict(recipe)


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    """A file path, or a bare packaged recipe name such as ``demo_brain`` -> ``usema/recipes/demo_brain.yaml``."""
    path = Path(path_or_name)
    if os.path.lexists(path):  # whatever it is: the reader names FIFOs, devices and folders
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
    """``"train.epochs=2"`` -> (["train", "epochs"], 2); the value is parsed as YAML data."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsemaError(f"--set {text}: expected KEY=VALUE with a dotted key such as train.epochs=2")
    try:
        value = load_yaml(raw, f"--set {text}") if raw.strip() else None
    except UsemaError:
        raise
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
        data = load_yaml(read_input_text(path, MAX_RECIPE_BYTES, what="recipe"), str(path))
    except yaml.YAMLError as exc:
        raise UsemaError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise UsemaError(f"{path}: expected a YAML mapping with sections name, data, model, train, val, ...")
    recipe = recipe_from_dict(data, str(path))  # the file alone first, so that its own errors name it
    return apply_and_validate(data, overrides) if overrides else recipe


def apply_and_validate(data: dict, overrides: Sequence[str]) -> Recipe:
    """All ``--set`` assignments applied together, so that dependent keys (``data.spatial_dims`` with a 3D
    ``data.patch_size``) can change at once. An invalid result is reported under the one ``--set`` without which
    the rest would be valid, when there is such a one, else under all of them."""
    try:
        return recipe_from_dict(apply_overrides(data, overrides), "--set " + " --set ".join(overrides))
    except UsemaError as combined_error:
        for i, text in enumerate(overrides):
            others = [*overrides[:i], *overrides[i + 1:]]
            try:
                recipe_from_dict(apply_overrides(data, others), "others")
            except UsemaError:
                continue
            recipe_from_dict(apply_overrides(data, [text]), f"--set {text}")  # raises, naming this --set
            break
        raise combined_error from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the later one would win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are refused by the recipe's type checks
            if key in seen:
                raise UsemaError(f"{self.name}: {key}: key given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Plain data from YAML text (safe types only); a duplicate key is a UsemaError naming ``source``."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text (what a run directory's ``recipe.yaml`` holds)."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
