"""Regenerate the shipped paper-scale recipes from `usema plan`'s rules on benchmark-shaped fingerprints.

    python benchmarks/plan_synthetic.py --no-measure      # writes benchmarks/results/fingerprints/*.json
    python benchmarks/plan_recipes.py                     # rewrites usema/recipes/{flare22,flare22_3d,amos_mr,...}.yaml

Each recipe keeps its name, dataset, labels, schedule and evaluation protocol; the planned keys (target spacing,
slice axis, patch size, normalisation, batch size, stage overrides) come from the plan, and its header says so.
Users replan for their own data and GPU with `usema plan DATASET --gpu-memory GIB`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from usema.config import RECIPE_DIR, load_recipe, load_yaml, recipe_from_dict, recipe_to_dict
from usema.planning.memory import training_memory_bytes
from usema.planning.planner import plan_experiment

FINGERPRINTS = Path(__file__).parent / "results" / "fingerprints"
BUDGET_GIB = 8.0
# recipe: (fingerprint, network dims, what the fingerprint's shapes and spacings are)
RECIPES = {
    "flare22": ("FLARE22-like", 2, "FLARE22's: 50 CTs of 512 × 512 at 0.6–0.98 mm, 2.5–5 mm slices"),
    "flare22_3d": ("FLARE22-like", 3, "FLARE22's: 50 CTs of 512 × 512 at 0.6–0.98 mm, 2.5–5 mm slices"),
    "amos_mr": ("AMOS-MR-like", 2, "AMOS22 MR-like (assumed ranges: 256–576 px at 0.6–1.5 mm, 1.5–6 mm slices)"),
    "neurips_cell": ("NeurIPSCell-like", 2, "NeurIPS-Cell-like (assumed: RGB images of 300–2000 px per side)"),
    "endovis17": ("Endovis17-like", 2, "EndoVis 2017's: 1800 RGB frames of 1280 × 1024"),
}


def planned(name: str, fingerprint_name: str, dims: int, described: str) -> str:
    fingerprint = json.loads((FINGERPRINTS / f"{fingerprint_name}.json").read_text())
    recipe = recipe_to_dict(load_recipe(name))
    channels, classes = len(fingerprint["channel_names"]), len(fingerprint["labels"])

    def estimate(patch, batch, overrides):
        return training_memory_bytes(dims, channels, classes, patch, batch, preset=recipe["model"]["preset"],
                                     overrides=overrides)

    plan = plan_experiment(fingerprint, dims, BUDGET_GIB, estimate, preset=recipe["model"]["preset"])
    data = recipe["data"]
    data.update(spatial_dims=dims, normalization=plan.normalization, target_spacing=plan.target_spacing,
                patch_size=plan.patch_size, augmentation="nnunet")
    if plan.slice_axis is not None:
        data["slice_axis"] = plan.slice_axis
    recipe["model"]["overrides"] = plan.overrides
    recipe["train"]["batch_size"] = plan.batch_size
    spacing = ", ".join("null" if s is None else f"{s:.3g}" for s in plan.target_spacing)
    header = [
        f"{name}: paper-scale recipe, planned with `usema plan`'s rules ({BUDGET_GIB:g} GiB budget, "
        f"{recipe['model']['preset']} preset) by `python benchmarks/plan_recipes.py`",
        f"from a synthetic fingerprint with {described}",
        f"(benchmarks/results/fingerprints/{fingerprint_name}.json): target spacing [{spacing}] mm, patch "
        f"{plan.patch_size}, {plan.stages} stages, batch {plan.batch_size}.",
        f"Replan for your data and GPU: usema plan $nnUNet_raw/{data['root']} --dims {dims} --gpu-memory GIB "
        "--output my.yaml",
    ]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(recipe, sort_keys=False)
    recipe_from_dict(load_yaml(text, name), name)
    return text


def main() -> None:
    for name, (fingerprint_name, dims, described) in RECIPES.items():
        text = planned(name, fingerprint_name, dims, described)
        (RECIPE_DIR / f"{name}.yaml").write_text(text)
        print(f"{name}: {text.splitlines()[2]}")


if __name__ == "__main__":
    main()
