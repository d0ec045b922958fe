"""The run format (issue 12): one network spec and builder, USEMA heads in every mode, the typed stored recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from test_bundle import make_run
from test_inference import make_checkpoint

from synthetic_data import TINY_USEMA
from usema.bundle.configs import network_def
from usema.bundle.export import export_bundle
from usema.config import Recipe
from usema.errors import UsemaError
from usema.inference.model_loading import load_model
from usema.nets import USEMA, build_network
from usema.nets.usema import fits_training
from usema.run.checkpoint import load_checkpoint, save_checkpoint
from usema.run.device import resolve_device
from usema.run.layout import BUNDLE_INFERENCE, BUNDLE_USEMA_ARGS
from usema.run.spec import (
    FORMER_PRESET_FEATURES,
    NetworkSpec,
    build_network_from_spec,
    spec_from_dict,
    spec_to_dict,
)


def tiny_spec(**fields: object) -> NetworkSpec:
    base = dict(name="usema", spatial_dims=2, in_channels=1, out_channels=3, preset="tiny", overrides=dict(TINY_USEMA))
    return NetworkSpec(**{**base, **fields})


def test_spec_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    spec = tiny_spec(deep_supervision=True)
    path = save_checkpoint({"network": spec_to_dict(spec)}, tmp_path / "spec.pt")
    stored = torch.load(path, weights_only=True)["network"]
    assert spec_from_dict(stored, "spec.pt: network") == spec


def test_earlier_spec_defaults() -> None:
    """Checkpoints of earlier versions omit deep_supervision / overrides or store preset null."""
    spec = spec_from_dict({"name": "dynunet", "spatial_dims": 3, "in_channels": 2, "out_channels": 4, "preset": None},
                          "old.pt: network")
    assert (spec.preset, spec.deep_supervision, spec.overrides) == ("base", False, {})


def test_spec_with_unknown_key_is_refused() -> None:
    with pytest.raises(UsemaError, match=r"^x.pt: network.extra: unknown key"):
        spec_from_dict({**spec_to_dict(tiny_spec()), "extra": 1}, "x.pt: network")


def test_one_builder_serves_training_inference_and_the_bundle(tmp_path: Path) -> None:
    """The network `usema infer` loads and the one the bundle's inference.json builds are the same function."""
    run = make_run(tmp_path / "run")
    model = load_model(run)
    parser = ConfigParser({"network_def": network_def(model)})
    bundle_net = parser.get_parsed_content("network_def")
    bundle_net.load_state_dict(model.network.state_dict())
    trained = build_network_from_spec(model.spec, model.recipe.data.patch_size)
    trained.load_state_dict(model.network.state_dict())
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad():
        expected = model.network(x)
        assert torch.equal(bundle_net.eval()(x), expected) and torch.equal(trained.eval()(x), expected)


def test_usema_builds_its_heads_in_every_mode() -> None:
    torch.manual_seed(0)
    with_ds = USEMA(2, 1, 3, preset="tiny", deep_supervision=True, **TINY_USEMA)
    without = USEMA(2, 1, 3, preset="tiny", deep_supervision=False, **TINY_USEMA)
    assert with_ds.state_dict().keys() == without.state_dict().keys()
    without.load_state_dict(with_ds.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(with_ds.eval()(x), without.eval()(x))  # eval mode: full-resolution logits only
    outputs = with_ds.train()(x)
    assert isinstance(outputs, list) and [o.shape[-1] for o in outputs] == [32, 16]
    assert isinstance(without.train()(x), torch.Tensor)


def test_unused_heads_never_block_distributed_training() -> None:
    """DDP needs a gradient for every trainable parameter: the heads deep supervision does not use are frozen."""
    net = USEMA(2, 1, 3, preset="tiny", deep_supervision=False, **TINY_USEMA).train()
    net(torch.randn(2, 1, 32, 32)).sum().backward()
    trainable_without_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert trainable_without_grad == []


def test_checkpoint_without_deep_supervision_heads_still_loads(tmp_path: Path) -> None:
    """Earlier USEMA built heads 1.. only with deep supervision; such checkpoints lack exactly those weights."""
    path = make_checkpoint(tmp_path / "new.pt", deep_supervision=False)
    ckpt = torch.load(path, weights_only=True)
    reference = load_model(path)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not re.match(r"heads\.[1-9]", k)}
    assert len(ckpt["model"]) < len(reference.network.state_dict())
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    x = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(old.network(x), reference.network(x))
    # any other missing weight is still refused
    ckpt["model"].pop("heads.0.weight")
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(UsemaError, match="broken.pt: weights do not match the network usema"):
        load_model(tmp_path / "broken.pt")


def test_checkpoint_of_the_usema_01_layout_is_refused_with_the_way_out(tmp_path: Path) -> None:
    """usema 0.2 changed the USEMA layout (additive skips, conv stem): a 0.1 checkpoint says so, not just 'no match'."""
    path = make_checkpoint(tmp_path / "new.pt")
    ckpt = torch.load(path, weights_only=True)
    width = ckpt["model"]["heads.0.weight"].shape[1]
    ckpt["model"]["decoder.0.0.weight"] = torch.zeros(width, 2 * width, 1, 1)  # 0.1's 1x1 fusion of the concat
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("decoder.0.0.conv1")}
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(UsemaError, match=r"old.pt: weights of the USEMA layout of usema 0.1 .*model.init_from"):
        load_model(tmp_path / "old.pt")


def test_checkpoint_of_usema_02_loads_and_predicts_the_same(tmp_path: Path) -> None:
    """usema 0.3 computes instance norm with GroupNorm(C, C): a 0.2 checkpoint (nn.InstanceNorm modules, the same
    tensors) loads into it and gives the same logits."""
    path = make_checkpoint(tmp_path / "new.pt")
    ckpt = torch.load(path, weights_only=True)
    spec = ckpt["network"]
    torch.manual_seed(1)
    net02 = build_network("usema", 2, spec["in_channels"], spec["out_channels"], preset=spec["preset"],
                          **spec["overrides"]).eval()
    for module in list(net02.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                norm = torch.nn.InstanceNorm2d(child.num_channels, affine=True)
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.uniform_(-0.5, 0.5)
                setattr(module, name, norm)
    ckpt["model"] = net02.state_dict()
    torch.save(ckpt, tmp_path / "v02.pt")
    model = load_model(tmp_path / "v02.pt")
    x = torch.randn(1, spec["in_channels"], 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.network.eval()(x), net02(x), atol=1e-4, rtol=1e-4)


def test_inference_reads_the_typed_recipe(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["recipe"]["val"] = {"roi_size": None, "overlap": 0, "sw_batch_size": 3}  # an int where a float is due
    ckpt["labels"] = {0: "background", 1: "a", 2: "b"}  # integer keys, as a recipe's data.labels
    torch.save(ckpt, path)
    model = load_model(path)
    assert isinstance(model.recipe, Recipe)
    assert model.settings.roi_size == model.recipe.data.patch_size == [32, 32]  # val.roi_size null: the patch
    assert model.settings.overlap == 0.0 and isinstance(model.settings.overlap, float)
    assert model.settings.sw_batch_size == 3
    assert model.labels == {"0": "background", "1": "a", "2": "b"}


def test_trainer_checkpoint_is_valid_run_format(tmp_path: Path) -> None:
    """What load_checkpoint accepts is exactly what a stored run holds: spec, recipe, labels, stats."""
    path = make_checkpoint(tmp_path / "c.pt")
    assert load_checkpoint(path)["network"]["name"] == "usema"
    ckpt = torch.load(path, weights_only=True)
    ckpt["network"]["overrides"]["deep_supervision"] = True  # a builder keyword, not an override
    torch.save(ckpt, path)
    with pytest.raises(UsemaError, match="network.overrides.deep_supervision: not a keyword"):
        load_checkpoint(path)


@pytest.mark.parametrize(("size", "ok"), [([64, 64], True), ([63, 64], True), ([32, 64], False), ([33, 80], True)])
def test_training_patch_rule(size: list[int], ok: bool) -> None:
    """Padded to a multiple of the stride (32), every side must be >= 64."""
    assert fits_training(size, 32) is ok


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsemaError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(UsemaError, match="--device: expected cpu or cuda"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:2") == torch.device("cuda", 2)


@pytest.mark.parametrize("patch, message", [([40, 64], "multiples of the network's stride 16"),
                                            ([16, 64], "every side >= 32")])
def test_a_patch_the_network_would_pad_is_refused(patch: list[int], message: str) -> None:
    """Sides must be multiples of USEMA's total stride (else every patch is padded and the padding trained on)."""
    from usema.run.spec import check_patch_size

    spec = tiny_spec(overrides={**TINY_USEMA, "features": [8, 16, 32, 64, 64], "encoder_blocks": [1] * 5})
    network = build_network_from_spec(spec)
    assert network.stride == 16
    check_patch_size(network, [32, 64], spec)  # multiples of 16, each side >= 32: accepted
    with pytest.raises(UsemaError, match=f"data.patch_size: expected {message}"):
        check_patch_size(network, patch, spec)


def test_checkpoint_of_the_former_tiny_preset_loads_with_its_widths(tmp_path: Path) -> None:
    """usema 0.4 capped the 2D tiny preset at 128 channels: a checkpoint written with 0.3's tiny (256 channels in
    its two deepest stages, stored as just ``preset: tiny``) is rebuilt with those widths and predicts the same;
    weights that match neither are still refused."""
    former = FORMER_PRESET_FEATURES[(2, "tiny")]
    assert tuple(USEMA(2, 1, 3, "tiny").config.features) != former  # the preset really changed
    path = make_checkpoint(tmp_path / "new.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["network"]["overrides"] = {}
    torch.manual_seed(1)
    net03 = USEMA(2, 1, 3, "tiny", features=former).eval()
    ckpt["model"] = net03.state_dict()
    torch.save(ckpt, tmp_path / "v03.pt")
    model = load_model(tmp_path / "v03.pt")
    assert model.spec.overrides == {"features": list(former)}
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.network.eval()(x), net03(x))
    # a width the former preset never had is not "migrated": the load is refused as before
    ckpt["model"] = USEMA(2, 1, 3, "tiny", features=(16, 32, 64, 128, 256, 192)).state_dict()
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(UsemaError, match="other.pt: weights do not match the network usema"):
        load_model(tmp_path / "other.pt")


def test_bundles_of_the_former_tiny_preset(tmp_path: Path) -> None:
    """A former-tiny run exports a bundle whose network_def names the widths (MONAI's runner builds the right
    network), and a bundle as usema 0.3 wrote it (``preset: tiny``, no widths) still reads with its widths."""
    former = list(FORMER_PRESET_FEATURES[(2, "tiny")])
    run = make_run(tmp_path / "run", overrides={"features": former})
    best = run / "checkpoints" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["network"]["overrides"] = {}  # as stored before 0.4: the preset's name only
    torch.save(ckpt, best)
    bundle = export_bundle(run, tmp_path / "bundle")
    assert json.loads((bundle / BUNDLE_INFERENCE).read_text())["network_def"]["features"] == former
    args = json.loads((bundle / BUNDLE_USEMA_ARGS).read_text())
    args["network"]["overrides"] = {}
    (bundle / BUNDLE_USEMA_ARGS).write_text(json.dumps(args))
    model = load_model(bundle)
    assert model.spec.overrides == {"features": former}
    assert model.network.encoder[5][0].conv1.out_channels == former[5]
