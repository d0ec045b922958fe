"""`usema plan`: nnU-Net's planning rules on hand-computed fingerprints, the memory estimate, and the command."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from usema.cli import main
from usema.config import load_recipe
from usema.errors import UsemaError
from usema.nets import USEMA
from usema.planning.memory import saved_activation_bytes, training_memory_bytes
from usema.planning.planner import (
    median_target_spacing,
    normalization_scheme,
    plan_experiment,
    stages_for,
)


def fingerprint(cases, channels=None, labels=None, name="DatasetX"):
    return {
        "dataset": name,
        "channel_names": channels or {"0": "CT"},
        "labels": labels or {"0": "background", "1": "liver"},
        "cases": [{"name": f"c{i}", "shape": list(shape), "spacing": list(spacing)} for i, (shape, spacing) in
                  enumerate(cases)],
    }


def linear_memory(bytes_per_voxel=1000.0, fixed=1e8):
    """A stand-in estimate: fixed + bytes_per_voxel × batch × patch voxels, and the calls it received."""
    calls = []

    def estimate(patch, batch, overrides):
        calls.append((list(patch), batch, dict(overrides)))
        return int(fixed + bytes_per_voxel * batch * np.prod(patch))

    return estimate, calls


def test_target_spacing_is_the_median_per_axis():
    spacings = np.array([[0.7, 0.7, 1.0], [0.9, 0.9, 1.2], [0.8, 0.8, 1.1]])
    shapes = np.array([[512, 512, 100], [512, 512, 80], [512, 512, 60]])
    target, aniso = median_target_spacing(spacings, shapes)
    assert target.tolist() == [0.8, 0.8, 1.1] and not aniso


def test_anisotropic_spacing_alone_keeps_the_median():
    """3 mm > 3 × 0.8 mm, but the z axis holds enough voxels (300 × 3 ≥ 512): the rule needs both conditions."""
    spacings = np.array([[0.7, 0.7, 2.5], [0.9, 0.9, 3.0], [0.8, 0.8, 5.0]])
    shapes = np.array([[512, 512, 360], [512, 512, 300], [512, 512, 180]])
    target, aniso = median_target_spacing(spacings, shapes)
    assert target.tolist() == [0.8, 0.8, 3.0] and not aniso


def test_anisotropy_rule_takes_the_10th_percentile_out_of_plane():
    spacings = np.array([[0.7, 0.7, 2.5], [0.8, 0.8, 5.0], [0.9, 0.9, 5.0], [0.8, 0.8, 6.0], [0.75, 0.75, 4.0]])
    shapes = np.array([[512, 512, 40]] * 5)
    target, aniso = median_target_spacing(spacings, shapes)
    # median z 5.0 > 3 × 0.8 and 40 × 5 / 5 × 3 = 120 < 512 × 0.8 / 0.8: 10th percentile of z = 3.1
    assert aniso
    assert target[:2].tolist() == [0.8, 0.8]
    assert target[2] == pytest.approx(np.percentile([2.5, 5.0, 5.0, 6.0, 4.0], 10))


def test_anisotropy_rule_never_goes_below_the_in_plane_spacing():
    spacings = np.array([[0.8, 0.8, 0.5], [0.8, 0.8, 0.5], [0.8, 0.8, 4.0], [0.8, 0.8, 4.0], [0.8, 0.8, 4.0]])
    shapes = np.array([[512, 512, 30]] * 5)
    target, aniso = median_target_spacing(spacings, shapes)
    assert aniso and target[2] == pytest.approx(0.8 + 1e-5)


@pytest.mark.parametrize("patch, expected", [([512, 512], 6), ([64, 64], 5), ([32, 48], 4), ([8, 200], 2), ([3, 3], 1)])
def test_stages_leave_at_least_four_voxels_at_the_bottleneck(patch, expected):
    assert stages_for(patch, max_stages=6) == expected
    assert min(patch) // 2 ** (expected - 1) >= 4 or expected == 1


@pytest.mark.parametrize(
    "names, scheme",
    [({"0": "CT"}, "ct"), ({"0": "T2"}, "zscore"), ({"0": "R", "1": "G", "2": "B"}, "rgb"),
     ({"0": "rgb_to_0_1"}, "rgb"), ({"0": "noNorm"}, "none"), ({"0": "CT", "1": "PET"}, "ct")],
)
def test_normalisation_follows_channel_names(names, scheme):
    assert normalization_scheme(names) == scheme


def test_2d_plan_slices_the_coarsest_axis_and_keeps_the_median_patch_when_it_fits():
    fp = fingerprint([((400, 300, 50), (0.8, 0.8, 3.0))] * 3)
    estimate, _ = linear_memory(bytes_per_voxel=1.0, fixed=0)
    plan = plan_experiment(fp, 2, budget_gib=8, estimate=estimate, preset="base")
    assert plan.slice_axis == 2 and plan.target_spacing == [0.8, 0.8, None]
    assert plan.median_shape == [400.0, 300.0]
    assert plan.stages == 6 and plan.patch_size == [416, 320]  # rounded up to multiples of 32
    assert plan.overrides == {}


def test_patch_shrinks_keeping_the_median_aspect_until_batch_two_fits():
    fp = fingerprint([((400, 300, 50), (0.8, 0.8, 3.0))] * 3)
    budget = 0.0001  # GiB: about 230 × 230 voxels at batch 2
    estimate, calls = linear_memory(bytes_per_voxel=1.0, fixed=0)
    plan = plan_experiment(fp, 2, budget_gib=budget, estimate=estimate)
    assert 2 * np.prod(plan.patch_size) <= budget * 1024**3
    assert calls[0][0] == [416, 320]  # the median shape rounded up to the 32-voxel stride
    stride = 2 ** (plan.stages - 1)
    # one stride at a time from the side with the largest patch / median ratio: the aspect of 400 × 300 is kept
    assert plan.patch_size == [256, 192]
    assert abs(plan.patch_size[0] / 400 - plan.patch_size[1] / 300) <= stride / 300
    assert all(p % stride == 0 for p in plan.patch_size)


def test_3d_patch_starts_from_a_box_isotropic_in_millimetres():
    """nnU-Net's initial 3D patch: 256³ voxels' worth, isotropic in mm, capped by the median shape."""
    fp = fingerprint([((512, 512, 400), (0.8, 0.8, 2.0))] * 2)
    estimate, calls = linear_memory(bytes_per_voxel=1.0, fixed=0)
    plan_experiment(fp, 3, budget_gib=64, estimate=estimate)
    first = calls[0][0]
    # sides ∝ 1/spacing with a product of 256³: 2.5 : 2.5 : 1, i.e. about 347 × 347 × 139 voxels
    assert first[0] == first[1] and 2.0 < first[0] / first[2] < 2.8  # (after rounding up to the stride)
    assert 0.8 * 256**3 < np.prod(first) < 1.3 * 256**3


def test_batch_fills_the_budget_but_stays_within_five_percent_of_the_voxels():
    fp = fingerprint([((64, 64), (1.0, 1.0))] * 100, channels={"0": "R", "1": "G", "2": "B"})
    estimate, _ = linear_memory(bytes_per_voxel=1.0, fixed=0)
    plan = plan_experiment(fp, 2, budget_gib=1, estimate=estimate)
    total = 100 * 64 * 64
    assert plan.patch_size == [64, 64] and plan.normalization == "rgb"
    assert plan.batch_cap == int(0.05 * total / (64 * 64)) == 5
    assert plan.batch_size == 5
    fp_small = fingerprint([((64, 64), (1.0, 1.0))] * 4)
    assert plan_experiment(fp_small, 2, 1, estimate).batch_size == 2  # never below 2


def test_too_small_a_budget_is_refused():
    fp = fingerprint([((64, 64, 64), (1.0, 1.0, 1.0))] * 2)
    estimate, _ = linear_memory(fixed=1e12)
    with pytest.raises(UsemaError, match="--gpu-memory"):
        plan_experiment(fp, 3, budget_gib=1, estimate=estimate)


def test_fewer_stages_are_written_as_overrides():
    fp = fingerprint([((40, 40, 40), (1.0, 1.0, 1.0))] * 2)
    estimate, _ = linear_memory(bytes_per_voxel=1.0, fixed=0)
    plan = plan_experiment(fp, 3, 8, estimate, preset="base")
    assert plan.stages == 4 and plan.patch_size == [40, 40, 40]
    assert plan.overrides == {"features": [32, 64, 128, 256], "encoder_blocks": [1, 1, 2, 2]}
    net = USEMA(3, 1, 2, preset="base", **plan.overrides)
    assert net.stride == 8


def test_meta_estimate_counts_what_a_real_forward_saves():
    """The meta-device forward saves the same activations as a real CPU forward (within 5%)."""
    torch.manual_seed(0)
    net = USEMA(2, 1, 3, preset="tiny")
    real, _ = saved_activation_bytes_cpu(net, (2, 1, 64, 64))
    with torch.device("meta"):
        meta_net = USEMA(2, 1, 3, preset="tiny")
    meta, _ = saved_activation_bytes(meta_net, (2, 1, 64, 64))
    assert meta == pytest.approx(real, rel=0.05)
    small = training_memory_bytes(2, 1, 3, [64, 64], 2, preset="tiny")
    assert training_memory_bytes(2, 1, 3, [128, 128], 2, preset="tiny") > 3 * (small - 4 * param_bytes(net))


def saved_activation_bytes_cpu(net, shape):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()(torch.randn(shape))
    return sum(sizes), max(sizes)


def param_bytes(net):
    return 4 * sum(p.numel() for p in net.parameters())


def test_usema_plan_writes_a_recipe_train_accepts(ct_dataset, tmp_path, capsys):
    out = tmp_path / "plans" / "ct.yaml"
    assert main(["plan", str(ct_dataset), "--dims", "2", "--gpu-memory", "2", "--preset", "tiny",
                 "--output", str(out)]) == 0
    recipe = load_recipe(out)
    fp = json.loads((out.parent / "fingerprint.json").read_text())
    assert len(fp["cases"]) == 4 and fp["cases"][0]["spacing"] == pytest.approx([0.8, 0.8, 2.5], abs=1e-4)
    assert fp["intensity"]["0"]["percentile_00_5"] <= fp["intensity"]["0"]["mean"]
    assert recipe.data.normalization == "ct" and recipe.data.slice_axis == 2
    assert recipe.data.target_spacing[:2] == pytest.approx([0.8, 0.8], abs=1e-4)
    assert recipe.data.target_spacing[2] is None
    assert recipe.data.augmentation == "nnunet"
    # the median shape (48, 40) fits: 4 stages leave 40 / 8 = 5 voxels at the bottleneck
    assert recipe.data.patch_size == [48, 40]
    assert recipe.model.overrides == {"features": [16, 32, 64, 128], "encoder_blocks": [1, 1, 1, 1]}
    text = out.read_text()
    assert text.startswith("# Planned by `usema plan`") and "5% of the dataset's voxels" in text
    assert yaml.safe_load(text)["train"]["batch_size"] >= 2
    assert main(["plan", str(ct_dataset), "--output", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_plan_refuses_a_bad_output_name(ct_dataset, tmp_path, capsys):
    assert main(["plan", str(ct_dataset), "--output", str(tmp_path / "r.txt")]) == 2
    assert capsys.readouterr().err.startswith("usema: error: --output: expected a .yaml recipe file name")
    assert not (tmp_path / "fingerprint.json").exists()


def test_replanning_from_a_stored_fingerprint_gives_the_same_recipe(ct_dataset, tmp_path):
    first = tmp_path / "a" / "r.yaml"
    assert main(["plan", str(ct_dataset), "--preset", "tiny", "--output", str(first)]) == 0
    again = tmp_path / "b" / "r.yaml"
    argv = ["plan", str(ct_dataset), "--preset", "tiny", "--fingerprint", str(first.parent / "fingerprint.json"),
            "--output", str(again)]
    assert main(argv) == 0
    strip = lambda p: [line for line in p.read_text().splitlines() if "Planned by" not in line]  # noqa: E731
    assert strip(again) == strip(first)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[]", "expected the keys dataset, cases, channel_names and labels"),
        ('{"dataset": "d", "channel_names": {"0": "CT"}, "labels": {"0": "bg"}, "cases": []}', "cases: expected a non"),
        ('{"dataset": "d", "channel_names": {"0": "CT"}, "labels": {"0": "bg"}, '
         '"cases": [{"shape": [10, 10], "spacing": [0, 1]}]}', r"cases\[0\]: expected a shape of positive integers"),
        ('{"dataset": "d", "channel_names": {"0": "CT"}, "labels": {"100000000": "bg"}, '
         '"cases": [{"shape": [10, 10], "spacing": [1, 1]}]}', "labels: expected a mapping from class values"),
    ],
)
def test_a_malformed_fingerprint_is_refused(tmp_path, capsys, content, expected):
    fp = tmp_path / "fp.json"
    fp.write_text(content)
    assert main(["plan", "Dataset_X", "--fingerprint", str(fp), "--output", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usema: error: ") and re.search(expected, err)
    assert not (tmp_path / "r.yaml").exists()
