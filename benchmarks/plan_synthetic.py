"""Plans for synthetic fingerprints shaped like the benchmark datasets, and the memory estimate against the
measured peak of one training step on this CPU.

    python benchmarks/plan_synthetic.py --output benchmarks/results/plans.md

The fingerprints hold only what planning reads (per-case shape and spacing, channel names, labels), drawn from
the ranges stated for each dataset below; `usema plan --fingerprint` plans from the files written next to the
report. The measured peak is the VmHWM rise of a fresh process during one forward + backward + SGD step of the
planned network at the planned patch and batch 2 (float32, CPU), against the planner's estimate at batch 2.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np



def recipe_labels(name: str) -> dict[str, str]:
    """The class names of a packaged recipe (the real dataset's, so planned recipes pass the label check)."""
    from usema.config import load_recipe  # noqa: PLC0415

    return {str(k): v for k, v in load_recipe(name).data.labels.items()}


def flare22_like(rng: np.random.Generator) -> dict:
    """50 abdominal CTs: 512 × 512 in-plane at 0.6–0.98 mm, 2.5–5 mm slices over 300–500 mm."""
    cases = []
    for i in range(50):
        xy, z = rng.uniform(0.6, 0.98), rng.choice([2.5, 3.0, 5.0])
        cases.append({"name": f"flare_{i:03d}", "shape": [512, 512, int(rng.uniform(300, 500) / z)],
                      "spacing": [float(xy), float(xy), float(z)]})
    return {"dataset": "FLARE22-like", "channel_names": {"0": "CT"}, "labels": recipe_labels("flare22"), "cases": cases}


def amos_mr_like(rng: np.random.Generator) -> dict:
    """60 abdominal MRs (assumed ranges): 256–576 px in-plane at 0.6–1.5 mm, 60–110 slices of 1.5–6 mm."""
    cases = []
    for i in range(60):
        side = int(rng.choice([256, 320, 384, 512, 576]))
        xy = float(rng.uniform(0.6, 1.5))
        cases.append({"name": f"amos_{i:03d}", "shape": [side, side, int(rng.integers(60, 111))],
                      "spacing": [xy, xy, float(rng.uniform(1.5, 6.0))]})
    return {"dataset": "AMOS-MR-like", "channel_names": {"0": "MR"}, "labels": recipe_labels("amos_mr"), "cases": cases}


def neurips_cell_like(rng: np.random.Generator) -> dict:
    """1000 RGB microscopy images (assumed ranges): sides 300–2000 px, unit spacing."""
    cases = [{"name": f"cell_{i:04d}", "shape": [int(rng.integers(300, 2001)), int(rng.integers(300, 2001))],
              "spacing": [1.0, 1.0]} for i in range(1000)]
    return {"dataset": "NeurIPSCell-like", "channel_names": {"0": "R", "1": "G", "2": "B"},
            "labels": recipe_labels("neurips_cell"), "cases": cases}


def endovis17_like(rng: np.random.Generator) -> dict:
    """EndoVis 2017 robotic instruments: 8 × 225 training frames of 1280 × 1024 RGB, unit spacing."""
    cases = [{"name": f"frame_{i:04d}", "shape": [1024, 1280], "spacing": [1.0, 1.0]} for i in range(1800)]
    return {"dataset": "Endovis17-like", "channel_names": {"0": "R", "1": "G", "2": "B"},
            "labels": recipe_labels("endovis17"), "cases": cases}


def measured_step_peak_mib(dims: int, channels: int, classes: int, patch: list[int], preset: str,
                           overrides: dict) -> float:
    """VmHWM rise (MiB) of one SGD training step, in a fresh process."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_step_peak, (dims, channels, classes, patch, preset, overrides))


def _step_peak(dims: int, channels: int, classes: int, patch: list[int], preset: str, overrides: dict) -> float:
    import torch  # noqa: PLC0415 - in the child only

    from usema.bench.processes import proc_status_mib, reset_peak_rss  # noqa: PLC0415
    from usema.nets import build_network  # noqa: PLC0415

    torch.manual_seed(0)
    net = build_network("usema", dims, channels, classes, preset=preset, deep_supervision=True, **overrides).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    x = torch.randn(2, channels, *patch)
    target = torch.randint(0, classes, (2, *patch))
    reset_peak_rss()
    before = proc_status_mib("VmRSS")["VmRSS"]
    outputs = net(x)
    loss = sum(torch.nn.functional.cross_entropy(o, target[(slice(None), *[slice(None, None, 2**k)] * dims)])
               for k, o in enumerate(outputs))
    loss.backward()
    optimizer.step()
    return proc_status_mib("VmHWM")["VmHWM"] - before


def main() -> None:
    from usema.planning.memory import training_memory_bytes  # noqa: PLC0415
    from usema.planning.planner import GIB, plan_experiment  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/plans.md"))
    parser.add_argument("--gpu-memory", type=float, default=8.0)
    parser.add_argument("--no-measure", action="store_true", help="skip the measured training-step peaks")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for make, configs in ((flare22_like, [(2, "base"), (3, "base")]), (amos_mr_like, [(2, "base")]),
                          (neurips_cell_like, [(2, "base")]), (endovis17_like, [(2, "base")])):
        fingerprint = make(rng)
        folder = args.output.parent / "fingerprints"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{fingerprint['dataset']}.json").write_text(json.dumps(fingerprint) + "\n")
        channels, classes = len(fingerprint["channel_names"]), len(fingerprint["labels"])
        for dims, preset in configs:
            def estimate(patch, batch, overrides, dims=dims, preset=preset):
                return training_memory_bytes(dims, channels, classes, patch, batch, preset=preset, overrides=overrides)

            plan = plan_experiment(fingerprint, dims, args.gpu_memory, estimate, preset=preset)
            at_two = estimate(plan.patch_size, 2, plan.overrides) / 2**20
            measured = None if args.no_measure else measured_step_peak_mib(
                dims, channels, classes, plan.patch_size, preset, plan.overrides)
            rows.append((fingerprint["dataset"], f"{dims}D {preset}", plan, at_two, measured))
            print(rows[-1][:2], plan.patch_size, plan.batch_size, f"{at_two:.0f} MiB est", measured, flush=True)
    lines = [
        f"Plans at a {args.gpu_memory:g} GiB budget (`python benchmarks/plan_synthetic.py`); memory at batch 2, "
        "float32, CPU; measured = VmHWM rise of one SGD training step in a fresh process.",
        "",
        "| dataset | network | target spacing (mm) | median shape | patch | stages | batch (cap) | est. step at batch "
        "(GiB) | est. batch 2 (MiB) | measured batch 2 (MiB) | est. / measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, net, plan, est, measured in rows:
        spacing = ", ".join("–" if s is None else f"{s:.3g}" for s in plan.target_spacing)
        shape = " × ".join(f"{s:.0f}" for s in plan.median_shape)
        ratio = "–" if measured is None else f"{est / measured:.2f}"
        lines.append(
            f"| {name} | {net} | {spacing} | {shape} | {' × '.join(map(str, plan.patch_size))} | {plan.stages} | "
            f"{plan.batch_size} ({plan.batch_cap}) | {plan.memory_bytes / GIB:.2f} | {est:.0f} | "
            f"{'–' if measured is None else f'{measured:.0f}'} | {ratio} |"
        )
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
