"""Print params and forward GFLOPs of every USEMA preset (the table in docs/models.md).

FLOPs are counted on the meta device (no compute) with SDPA forced to its math path, so the attention
products are counted as matmuls.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from usema.nets import PRESETS, USEMA

SIZES = {2: [(512, 512), (1024, 1024)], 3: [(128, 128, 128)]}


def preset_cost(dims: int, preset: str, size: tuple[int, ...]) -> tuple[float, float]:
    with torch.device("meta"):
        net = USEMA(dims, 1, 4, preset).eval()
        x = torch.empty(1, 1, *size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return sum(p.numel() for p in net.parameters()) / 1e6, counter.get_total_flops() / 1e9


def main() -> None:
    print("| preset | dims | params (M) | GFLOPs (input size: value) |")
    print("|---|---|---|---|")
    for dims, sizes in SIZES.items():
        for preset in PRESETS[dims]:
            costs = [preset_cost(dims, preset, s) for s in sizes]
            cells = ", ".join(f"{'x'.join(map(str, s))}: {g:.1f}" for s, (_, g) in zip(sizes, costs))
            print(f"| {preset} | {dims}D | {costs[0][0]:.2f} | {cells} |")


if __name__ == "__main__":
    main()
