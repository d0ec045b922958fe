"""What `usema bench` measures by default, and its configuration (no torch import: the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from usema.errors import UsemaError
from usema.threads import usable_cpus

REFERENCE = "dynunet"
# inference throughput is compared with MONAI's BasicUNet (the target: usema infer >= 2x its voxels/s)
INFER_REFERENCE = "basicunet"
IN_CHANNELS = 1
OUT_CHANNELS = 4
DEFAULT_NETS = {
    2: ("usema-tiny", "usema-small", "usema-base", "dynunet", "swinunetr", "unetr", "basicunet"),
    3: ("usema-tiny", "usema-small", "usema-base", "dynunet", "basicunet"),
}
PEERS = ("dynunet", "swinunetr", "unetr", "basicunet", "segresnet")
USEMA_PRESETS = ("tiny", "small", "base")
DEFAULT_SIZES = {2: (256, 512, 1024), 3: (64, 96, 128)}
DEFAULT_TRAIN_SIZES = {2: (256, 512), 3: (64,)}
QUICK_SIZE = {2: 64, 3: 64}
# a CT-like volume segmented slice by slice by the 2D networks: 256² slices, 200 of them
DEFAULT_INFER_SHAPE = (256, 256, 200)
QUICK_INFER_SHAPE = (64, 64, 8)
# total stride of the benchmarked UNets (five stride-2 levels: DynUNet, the 6-stage USEMA presets)
NETWORK_STRIDE = 32
# input sides must be multiples of the ViT patch (UNETR) or of patch * 2**stages (SwinUNETR)
SIZE_DIVISOR = {"unetr": 16, "swinunetr": 32}



def parse_net(name: str) -> tuple[str, str]:
    """'usema-small' -> ('usema', 'small'); a peer name -> (name, 'base')."""
    family, _, preset = name.partition("-")
    if family == "usema" and preset in USEMA_PRESETS:
        return family, preset
    if name in PEERS:
        return name, "base"
    choices = ", ".join([f"usema-{p}" for p in USEMA_PRESETS] + list(PEERS))
    raise UsemaError(f"--nets: unknown network {name!r}; expected some of {choices}")



@dataclass
class BenchConfig:
    """What to measure. ``repeats`` timed rounds follow one warm-up round."""

    spatial_dims: int = 2
    sizes: tuple[int, ...] = DEFAULT_SIZES[2]
    nets: tuple[str, ...] = DEFAULT_NETS[2]
    repeats: int = 5
    largest_repeats: int | None = None
    """Rounds at the largest size (None: ``repeats``); the slowest nets dominate the run time there."""
    train_sizes: tuple[int, ...] = DEFAULT_TRAIN_SIZES[2]
    train_batch: int = 2
    train_repeats: int = 5
    infer_shape: tuple[int, int, int] | None = DEFAULT_INFER_SHAPE
    """The synthetic NIfTI `usema infer` segments with each 2D network (None: no inference benchmark)."""
    infer_repeats: int = 1
    """Interleaved inference rounds: one round is already a whole volume (200 slices by default) per network."""
    threads: int = field(default_factory=lambda: usable_cpus())
    memory: bool = True
    allow_load: bool = False
    """Run even when the machine's load is over the limit (the report is flagged as not comparable)."""
