"""The table of issue 11's cost targets, read from one `usema bench` run of each dimensionality.

    python benchmarks/issue11_targets.py benchmarks/results/bench_2d.json benchmarks/results/bench_3d.json

Every figure is a ratio inside one interleaved run (usema-base against the peer measured in the same rounds),
so the table needs no numbers from elsewhere; docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _row(rows: list[dict[str, Any]], net: str, size: int) -> dict[str, Any]:
    return next(r for r in rows if r["net"] == net and r["size"] == size)


def _verdict(value: float, limit: float, at_most: bool) -> str:
    return "met" if (value <= limit if at_most else value >= limit) else "missed"


def targets(bench_2d: dict[str, Any], bench_3d: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    fwd, train, infer = bench_2d["forward"], bench_2d["train"], bench_2d["infer"]
    lines = []

    def ratio(rows: list, key: str, size: int, peer: str, net: str = "usema-base") -> tuple[float, str]:
        a, b = _row(rows, net, size)[key], _row(rows, peer, size)[key]
        return a / b, f"{a:.3f} vs {b:.3f}" if key.endswith("_s") else f"{a:.0f} vs {b:.0f}"

    for size, limit in ((256, 0.9), (512, 1.0)):
        r, detail = ratio(train, "train_step_s", size, "dynunet")
        lines.append((f"training step {size}², batch 2 ÷ DynUNet", f"{r:.2f}× ({detail} s)", f"≤ {limit}×",
                      _verdict(r, limit, True)))
    for peer, name, limit in (("dynunet", "DynUNet", 0.9), ("swinunetr", "SwinUNETR (fs48)", 0.45),
                              ("unetr", "UNETR", 0.2)):
        r, detail = ratio(fwd, "latency_s", 1024, peer)
        lines.append((f"forward 1024² ÷ {name}", f"{r:.2f}× ({detail} s)", f"≤ {limit}×", _verdict(r, limit, True)))
    r, _ = ratio(fwd, "gflops_per_s", 1024, "dynunet")
    lines.append(("achieved GFLOP/s 1024² ÷ DynUNet", f"{r:.2f}×", "≥ 0.9×", _verdict(r, 0.9, False)))
    for size in (512, 1024):
        # the tensors the forward holds at once decide; the process's resident rise (allocator-dependent) is shown
        r, detail = ratio(fwd, "tensor_mib", size, "dynunet")
        rss, rss_detail = ratio(fwd, "forward_mib", size, "dynunet")
        lines.append((f"peak forward memory {size}² ÷ DynUNet", f"{r:.2f}× ({detail} MiB of tensors; resident rise "
                      f"{rss:.2f}×, {rss_detail} MiB)", "≤ 0.9×", _verdict(r, 0.9, True)))
    r, detail = ratio(bench_3d["train"], "train_step_s", 64, "dynunet")
    lines.append(("3D training step 64³, batch 2 ÷ DynUNet", f"{r:.2f}× ({detail} s)", "≤ 1.0×",
                  _verdict(r, 1.0, True)))
    sizes_3d = sorted({row["size"] for row in bench_3d["forward"]})
    r, detail = ratio(bench_3d["forward"], "latency_s", sizes_3d[-1], "dynunet")
    m, _ = ratio(bench_3d["forward"], "tensor_mib", sizes_3d[-1], "dynunet")
    lines.append((f"3D forward {sizes_3d[-1]}³ ÷ DynUNet", f"{r:.2f}× ({detail} s), tensor memory {m:.2f}×",
                  "measured",
                  "measured"))
    basic = next(r for r in infer if r["net"] == "basicunet")["voxels_per_s"]
    for net in ("usema-tiny", "usema-base"):
        mine = next(r for r in infer if r["net"] == net)["voxels_per_s"]
        lines.append((f"`usema infer` 256×256×200 voxels/s ÷ BasicUNet, {net}", f"{mine / basic:.2f}×", "≥ 2×",
                      _verdict(mine / basic, 2.0, False)))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_2d")
    parser.add_argument("bench_3d")
    args = parser.parse_args()
    with open(args.bench_2d) as fh2, open(args.bench_3d) as fh3:
        lines = targets(json.load(fh2), json.load(fh3))
    print("| target (usema-base unless named) | measured | required | |")
    print("|---|---|---|---|")
    for line in lines:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
