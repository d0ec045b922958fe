"""The network spec a run carries: a typed, validated description of the network, and the one builder.

A spec arrives from files other people share (a checkpoint's ``network``, a bundle's ``configs/usema.json``,
a recipe's ``model`` section), and ``usema export`` copies it into a MONAI bundle config, where text starting
with ``$``, ``%`` or ``@`` is code, a file macro or a reference. So a spec is plain data checked field by field:
known names and presets, integers in sane ranges, overrides only the network's own constructor keywords with
values of their type, and no string with such a prefix anywhere. Nothing in a spec is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from usema.config import Recipe
from usema.errors import UsemaError

if typing.TYPE_CHECKING:
    from torch import nn

NETWORK_NAMES = ("usema", "basicunet", "dynunet", "swinunetr", "unetr", "segresnet")
PRESET_NAMES = ("tiny", "small", "base")
SPATIAL_DIMS = (2, 3)
MAX_CHANNELS = 1000
# bounds every integer in overrides (widths, depths, window sides, UNETR's mlp_dim 3072)
MAX_OVERRIDE_INT = 4096
# bounds the size of an override value: a YAML alias bomb must fail here, not in memory
MAX_OVERRIDE_NODES = 10_000
# leading characters MONAI's ConfigParser interprets: expression, file macro, reference
CONFIG_SYNTAX_PREFIXES = ("$", "%", "@")
# keyword arguments the builder sets itself; an override of them would be ambiguous
BUILDER_KEYWORDS = frozenset({"spatial_dims", "in_channels", "out_channels", "img_size", "deep_supervision", "preset"})
# head weights an old USEMA checkpoint trained without deep supervision lacks (heads 1.. were built only with it)
_DEEP_HEAD_KEY = re.compile(r"heads\.[1-9][0-9]*\.")
# tensors only the USEMA layout of usema 0.1 had: the decoder's 1x1 fusion and the residual stem's shortcut
_USEMA_01_KEY = re.compile(r"decoder\.\d+\.0\.weight|encoder\.0\.0\.shortcut\.weight")
# stage widths a USEMA preset had before it changed, by (spatial_dims, preset): weights stored under the preset's
# name with these widths (and no ``features`` override) are rebuilt with them, so that earlier runs keep loading
FORMER_PRESET_FEATURES: dict[tuple[int, str], tuple[int, ...]] = {
    (2, "tiny"): (16, 32, 64, 128, 256, 256),  # usema <= 0.3.2 (0.4 caps the 2D tiny preset at 128 channels)
}


@dataclass(frozen=True)
class NetworkSpec:
    """What rebuilds a run's network: ``usema.nets.build_network(name, spatial_dims, ...)`` arguments."""

    name: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    preset: str = "base"
    deep_supervision: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """``usema (preset tiny)``: how errors name the network."""
        return f"{self.name} (preset {self.preset})"


def spec_to_dict(spec: NetworkSpec) -> dict[str, Any]:
    """Plain data (checkpoints, usema.json); :func:`spec_from_dict` inverts it."""
    return dataclasses.asdict(spec)


def spec_for_recipe(recipe: Recipe, in_channels: int, out_channels: int) -> NetworkSpec:
    """The validated spec of the network ``recipe`` trains for data of ``in_channels`` and ``out_channels``."""
    model = recipe.model
    data = {
        "name": model.name,
        "spatial_dims": recipe.data.spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "preset": model.preset,
        "deep_supervision": recipe.train.deep_supervision,
        "overrides": model.overrides,
    }
    return spec_from_dict(data, "model")


def spec_from_dict(data: Any, where: str) -> NetworkSpec:
    """Validate a stored ``network`` mapping into a :class:`NetworkSpec`; errors read ``<where>.<key>: ...``.

    ``where`` names the file and key holding the mapping (``run/best.pt: network``). A missing or null
    ``preset`` means ``base``, a missing ``deep_supervision`` False and missing ``overrides`` none, as
    checkpoints of earlier versions were written.
    """
    if not isinstance(data, Mapping):
        raise UsemaError(f"{where}: expected a mapping with name, spatial_dims, in_channels, out_channels")
    known = {f.name for f in dataclasses.fields(NetworkSpec)}
    for key in data:
        if key not in known:
            raise UsemaError(f"{where}.{key}: unknown key; valid keys: {', '.join(sorted(known))}")
    for key in ("name", "spatial_dims", "in_channels", "out_channels"):
        if key not in data:
            raise UsemaError(f"{where}.{key}: required key is missing")
    name = _choice(data["name"], NETWORK_NAMES, f"{where}.name")
    preset, overrides = data.get("preset"), data.get("overrides")
    return NetworkSpec(
        name=name,
        spatial_dims=_choice(data["spatial_dims"], SPATIAL_DIMS, f"{where}.spatial_dims"),
        in_channels=_integer(data["in_channels"], 1, MAX_CHANNELS, f"{where}.in_channels"),
        out_channels=_integer(data["out_channels"], 1, MAX_CHANNELS, f"{where}.out_channels"),
        preset="base" if preset is None else _choice(preset, PRESET_NAMES, f"{where}.preset"),
        deep_supervision=_boolean(data.get("deep_supervision", False), f"{where}.deep_supervision"),
        overrides=check_overrides(name, {} if overrides is None else overrides, f"{where}.overrides"),
    )


def check_overrides(name: str, overrides: Any, where: str) -> dict[str, Any]:
    """``overrides`` checked against network ``name``'s constructor keywords; returns the checked mapping.

    USEMA's keywords are typed by ``USEMAConfig``; a MONAI peer's by the type of each keyword's default
    (a bool default accepts only bools). Any other value must be plain data without a config-syntax prefix.
    """
    if not isinstance(overrides, Mapping):
        raise UsemaError(f"{where}: expected a mapping of constructor keywords, got {_show(overrides)}")
    allowed = override_types(name)
    checked, count = {}, [0]  # one node budget for the whole mapping
    for key, value in overrides.items():
        if not isinstance(key, str) or key not in allowed:
            valid = ", ".join(sorted(allowed))
            raise UsemaError(f"{where}.{key}: not a keyword of the {name} network; valid: {valid}")
        _check_plain(value, f"{where}.{key}", count)
        checked[key] = _typed(value, allowed[key], f"{where}.{key}")
    return checked


def override_types(name: str) -> dict[str, Any]:
    """Keyword -> expected type of each constructor keyword a recipe may override for network ``name``."""
    if name == "usema":
        from usema.nets.usema import USEMAConfig  # noqa: PLC0415 - nets import torch; keep `--help` fast

        hints = typing.get_type_hints(USEMAConfig)
        return {k: v for k, v in hints.items() if k not in BUILDER_KEYWORDS}
    from monai.networks import nets as monai_nets  # noqa: PLC0415

    cls = {
        "basicunet": monai_nets.BasicUNet,
        "dynunet": monai_nets.DynUNet,
        "swinunetr": monai_nets.SwinUNETR,
        "unetr": monai_nets.UNETR,
        "segresnet": monai_nets.SegResNet,
    }[name]
    types_ = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.name in BUILDER_KEYWORDS or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = param.default
        if default is param.empty or default is None or isinstance(default, (tuple, list, dict)):
            types_[param.name] = Any
        elif isinstance(default, (bool, int, float, str)):
            # the enum defaults of MONAI (e.g. UpsampleMode) are str subclasses: text
            types_[param.name] = next(t for t in (bool, int, float, str) if isinstance(default, t))
        # other defaults (a class, a module) cannot come from plain data: not overridable
    return types_


def build_network_from_spec(
    spec: NetworkSpec, img_size: Sequence[int] | None = None, source: str = "model"
) -> nn.Module:
    """The network ``spec`` describes; ``img_size`` (the training patch) is used by fixed-size networks (UNETR).

    Impossible combinations of valid fields (e.g. too few ``window_size`` entries) raise UsemaError naming
    ``source`` (the recipe section or the file the spec came from).
    """
    from usema.nets import build_network  # noqa: PLC0415 - torch-heavy

    try:
        return build_network(
            spec.name,
            spec.spatial_dims,
            spec.in_channels,
            spec.out_channels,
            preset=spec.preset,
            deep_supervision=spec.deep_supervision,
            img_size=None if img_size is None else list(img_size),
            **spec.overrides,
        )
    except (TypeError, ValueError, AssertionError) as exc:  # MONAI validates some arguments with assert
        reason = " ".join(str(exc).split())[:300]
        raise UsemaError(f"{source}: cannot build {spec.describe()} with overrides {spec.overrides}: {reason}") from exc


def load_weights(network: nn.Module, state: Any, spec: NetworkSpec, source: str) -> None:
    """Load ``state`` into ``network`` strictly, except that USEMA checkpoints written before every USEMA had
    its deep-supervision heads may lack exactly those heads' weights (they are unused outside training)."""
    if not isinstance(state, Mapping):
        raise UsemaError(f"{source}: model: expected a state dict (a mapping of tensors)")
    try:
        result = network.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise UsemaError(
            f"{source}: weights do not match the network {spec.describe()} the checkpoint describes"
        ) from exc
    tolerated = spec.name == "usema"
    missing = [k for k in result.missing_keys if not (tolerated and _DEEP_HEAD_KEY.match(k))]
    if tolerated and any(_USEMA_01_KEY.fullmatch(k) for k in result.unexpected_keys):
        raise UsemaError(f"{source}: weights of the USEMA layout of usema 0.1 (concatenating decoder), which this "
                         "version no longer builds: retrain, or fine-tune from them with model.init_from")
    if missing or result.unexpected_keys:
        raise UsemaError(f"{source}: weights do not match the network {spec.describe()} the checkpoint describes")


def with_stored_widths(spec: NetworkSpec, weights: Any) -> NetworkSpec:
    """``spec`` as its stored ``weights`` need it: a USEMA preset whose widths changed after the weights were
    written (``FORMER_PRESET_FEATURES``) gets its former widths as an explicit ``features`` override; any other
    spec is returned unchanged (and mismatching weights are refused when loaded)."""
    former = FORMER_PRESET_FEATURES.get((spec.spatial_dims, spec.preset))
    if spec.name != "usema" or former is None or "features" in spec.overrides or not isinstance(weights, Mapping):
        return spec
    # every USEMA stage starts with a block whose first conv has the stage's width as its output channels
    widths = [weights.get(f"encoder.{i}.0.conv1.weight") for i in range(len(former))]
    if any(getattr(w, "ndim", 0) != spec.spatial_dims + 2 for w in widths):
        return spec
    if tuple(int(w.shape[0]) for w in widths) != former or f"encoder.{len(former)}.0.conv1.weight" in weights:
        return spec
    return dataclasses.replace(spec, overrides={**spec.overrides, "features": list(former)})


def check_same_architecture(source: NetworkSpec, target: NetworkSpec, where: str) -> None:
    """Refuse weights of another network for ``target``: the specs decide (name, spatial_dims, in_channels,
    overrides, and the preset where it shapes the network), never how many tensors happen to fit.

    ``out_channels`` may differ (fine-tuning to other classes), and ``deep_supervision`` too (USEMA always has
    its heads; a peer's extra heads are just tensors the other side lacks).
    """
    if source.name != target.name:
        raise UsemaError(f"{where}: expected weights of a {target.name} network (this recipe's), got {source.name}")
    fields = ["spatial_dims", "in_channels", "overrides"]
    if target.name == "usema":  # the MONAI peers ignore the preset
        fields.insert(0, "preset")
    for name in fields:
        expected, got = getattr(target, name), getattr(source, name)
        if got != expected:
            raise UsemaError(
                f"{where}: expected weights of {target.name} with {name} {expected!r} (this recipe's network), "
                f"got {name} {got!r}"
            )


@dataclass(frozen=True)
class WeightTransfer:
    """What :func:`load_matching_weights` did: tensor names loaded, and those skipped on either side."""

    loaded: list[str]
    skipped: list[str]

    def describe(self, shown: int = 4) -> str:
        """``loaded 120 tensors, skipped 4 (heads.0.conv.weight, ...)``: the skipped names abbreviated."""
        text = f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}"
        if not self.skipped:
            return text
        names = ", ".join(self.skipped[:shown])
        more = f", ... {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"{text} ({names}{more})"


def load_matching_weights(network: nn.Module, state: Any, source: str) -> WeightTransfer:
    """Copy every tensor of ``state`` whose name and shape match ``network``'s; the rest of ``network`` keeps
    its current (fresh) values, e.g. the output heads when the class count differs.

    Skipped are the names on either side without a same-shaped counterpart. Call it only after
    :func:`check_same_architecture`: matching names alone do not make two networks the same.
    """
    if not isinstance(state, Mapping):
        raise UsemaError(f"{source}: model: expected a state dict (a mapping of tensors)")
    import torch  # noqa: PLC0415 - torch-heavy

    own = network.state_dict()
    fits = {
        key: value for key, value in state.items()
        if key in own and isinstance(value, torch.Tensor) and value.shape == own[key].shape
    }
    network.load_state_dict(fits, strict=False)
    skipped = [key for key in own if key not in fits] + [str(key) for key in state if key not in own]
    return WeightTransfer(loaded=list(fits), skipped=skipped)


def check_patch_size(network: nn.Module, patch_size: Sequence[int], spec: NetworkSpec) -> None:
    """Refuse ``data.patch_size`` now when the network cannot train on it (it would fail at the first step)."""
    from usema.nets.usema import fits_training  # noqa: PLC0415

    stride = getattr(network, "stride", None)
    if isinstance(stride, int) and not fits_training(patch_size, stride):
        raise UsemaError(
            f"data.patch_size: expected every side >= {2 * stride} for {spec.describe()}, got {list(patch_size)}"
        )
    if isinstance(stride, int) and any(side % stride for side in patch_size):
        # the network would pad every patch to the next multiple and train on the padding
        raise UsemaError(f"data.patch_size: expected multiples of the network's stride {stride} for "
                         f"{spec.describe()}, got {list(patch_size)}")


# ---------------------------------------------------------------------------------------------
# field checks


def _show(value: Any) -> str:
    return repr(value)[:80]


def _choice(value: Any, choices: tuple, where: str) -> Any:
    if type(value) in {type(c) for c in choices} and value in choices:
        return value
    raise UsemaError(f"{where}: expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}")


def _integer(value: Any, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsemaError(f"{where}: expected an integer in [{low}, {high}], got {_show(value)}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsemaError(f"{where}: expected true or false, got {_show(value)}")
    return value


def _check_plain(value: Any, where: str, count: list[int]) -> None:
    """Plain data only (null, bool, number, string, list, mapping with string keys), no config-syntax prefix."""
    count[0] += 1
    if count[0] > MAX_OVERRIDE_NODES:
        raise UsemaError(f"{where}: expected a small value (more than {MAX_OVERRIDE_NODES} entries)")
    if isinstance(value, str):
        if value.startswith(CONFIG_SYNTAX_PREFIXES):
            raise UsemaError(
                f"{where}: expected plain text, got {_show(value)} (text starting with $, % or @ is code, a file "
                "macro or a reference in MONAI bundle configs)"
            )
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", count)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsemaError(f"{where}: expected text keys, got {_show(key)}")
            _check_plain(key, f"{where}.{key}", count)
            _check_plain(item, f"{where}.{key}", count)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UsemaError(f"{where}: expected a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_OVERRIDE_INT:
            raise UsemaError(f"{where}: expected an integer in [-{MAX_OVERRIDE_INT}, {MAX_OVERRIDE_INT}], got {value}")
    elif value is not None and not isinstance(value, bool):
        raise UsemaError(f"{where}: expected plain data (number, text, list, mapping), got {type(value).__name__}")


def _typed(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against type ``tp`` (USEMAConfig hints, or the type of a peer's default)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _typed(value, option, where)
            except UsemaError:
                continue
        raise UsemaError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise UsemaError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
        item = args[0]
        return [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        return _boolean(value, where)
    if tp is int:
        return _integer(value, 0, MAX_OVERRIDE_INT, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsemaError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise UsemaError(f"{where}: expected text, got {_show(value)}")
    return value


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    return {bool: "true/false", int: "integer", float: "number", str: "text"}.get(tp, str(tp))
