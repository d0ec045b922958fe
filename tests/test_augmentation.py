"""Training augmentation: nnU-Net's default set fires at nnU-Net's probabilities, and every patch stays a pure
function of (seed, index) so that exact resume keeps working."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from usema.config import load_recipe
from usema.data.pipeline import PatchDataset, make_case

# nnU-Net v2 nnUNetTrainer defaults (SPEC §5): transform class -> (probability, how many of them)
NNUNET_2D = {
    "RandRotated": (0.2, 1),
    "RandZoomd": (0.2, 1),
    "RandGaussianNoised": (0.1, 1),
    "RandGaussianSmoothd": (0.2, 1),
    "RandScaleIntensityd": (0.15, 1),
    "RandScaleIntensityFixedMeand": (0.15, 1),
    "RandSimulateLowResolutiond": (0.25, 1),
    "RandFlipd": (0.5, 2),
}


def dataset(augment: str, dims: int = 2, seed: int = 3) -> PatchDataset:
    rng = np.random.default_rng(0)
    shape = (24, 28) if dims == 2 else (20, 20, 20)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = (rng.random(shape) > 0.6).astype(np.uint8)
    patch = (16,) * dims
    return PatchDataset([make_case("c", image, label)], patch, dims, fg_oversample=0.5, seed=seed, length=10,
                        augment=augment)


def fired(ds: PatchDataset, draws: int) -> dict[str, list[float]]:
    """Per random transform of the pipeline (in order), the fraction of ``draws`` patches it was applied to."""
    transforms = [t for t in ds.transform.transforms if hasattr(t, "_do_transform")]
    counts = np.zeros(len(transforms))
    for index in range(draws):
        ds[index]
        counts += [bool(t._do_transform) for t in transforms]
    out: dict[str, list[float]] = {}
    for t, c in zip(transforms, counts):
        out.setdefault(type(t).__name__, []).append(c / draws)
    return out


def test_nnunet_set_fires_at_nnunet_probabilities():
    draws = 400
    rates = fired(dataset("nnunet"), draws)
    gamma = rates.pop("RandAdjustContrastd")
    for name, (p, count) in NNUNET_2D.items():
        assert len(rates[name]) == count, name
        for rate in rates[name]:
            # fixed seeds make this deterministic; the bound is 4 binomial standard deviations
            assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / draws), (name, rate, p)
    assert set(rates) == set(NNUNET_2D)
    assert len(gamma) == 2 and abs(gamma[0] - 0.1) < 0.06 and abs(gamma[1] - 0.3) < 0.092


def test_nnunet_ranges_and_inversion_follow_nnunet():
    transforms = {type(t).__name__: t for t in dataset("nnunet").transform.transforms}
    rotate, zoom = transforms["RandRotated"], transforms["RandZoomd"]
    assert rotate.rand_rotate.range_x == pytest.approx((-math.pi, math.pi))  # 2D: full circle
    assert (tuple(zoom.rand_zoom.min_zoom), tuple(zoom.rand_zoom.max_zoom)) == ((0.7,), (1.4,))
    gammas = [t for t in dataset("nnunet").transform.transforms if type(t).__name__ == "RandAdjustContrastd"]
    assert [g.invert_image for g in gammas] == [True, False]
    assert all(tuple(g.adjuster.gamma) == (0.7, 1.5) and g.adjuster.retain_stats for g in gammas)
    rotate3d = {type(t).__name__: t for t in dataset("nnunet", dims=3).transform.transforms}["RandRotated"]
    assert rotate3d.rand_rotate.range_z == pytest.approx((-math.radians(30), math.radians(30)))


@pytest.mark.parametrize("augment", ["nnunet", "light", "none"])
@pytest.mark.parametrize("dims", [2, 3])
def test_patch_is_a_pure_function_of_seed_and_index(augment, dims):
    """Two separately built datasets give the same patch i in any order; another index or seed differs."""
    a, b = dataset(augment, dims), dataset(augment, dims)
    order = [5, 1, 5, 0]
    first = [a[i] for i in order]
    second = [b[i] for i in reversed(order)][::-1]
    for x, y in zip(first, second):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert torch.equal(first[0]["image"], first[2]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    assert not torch.equal(a[0]["image"], dataset(augment, dims, seed=4)[0]["image"])


def test_labels_stay_labels_under_every_augmentation():
    """Nearest-neighbour resampling of labels: no fractional or new classes appear."""
    ds = dataset("nnunet")
    values = torch.cat([ds[i]["label"].flatten() for i in range(60)]).unique()
    assert set(values.tolist()) <= {0.0, 1.0}


def test_recipes_choose_the_augmentation():
    assert load_recipe("flare22").data.augmentation == "nnunet"
    assert load_recipe("demo_brain").data.augmentation == "light"
    assert load_recipe("demo_brain", ["data.augmentation=none"]).data.augmentation == "none"
