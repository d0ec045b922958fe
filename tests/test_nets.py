"""Properties of the SEMA formula, the SEMA block and the USEMA networks that users rely on."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from usema.nets import SEMAAttention, SEMABlock, USEMA, build_network, sema_attention
from usema.nets.norm import InstanceNorm, _ChannelsLastInstanceNorm


def naive_sema(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Reference: explicit loop over origin-tiled windows (partial at the edges), softmax per window, + mean(v)."""
    batch, heads, *spatial, dim = q.shape
    out = torch.zeros_like(q)
    for starts in itertools.product(*(range(0, s, window) for s in spatial)):
        region = (slice(None), slice(None), *(slice(a, min(a + window, s)) for a, s in zip(starts, spatial)))
        qw, kw, vw = (t[region].reshape(batch, heads, -1, dim) for t in (q, k, v))
        attn = torch.softmax(qw @ kw.transpose(-1, -2) / dim**0.5, dim=-1)
        out[region] = (attn @ vw).reshape(q[region].shape)
    return out + v.mean(dim=tuple(range(2, v.ndim - 1)), keepdim=True)


def tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, *S, d) -> the channels-last tokens (B, *S, heads·d) that sema_attention returns."""
    return t.movedim(1, -2).flatten(-2)


def qkv(*spatial: int, batch: int = 2, heads: int = 3, dim: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(spatial))
    return [torch.randn(batch, heads, *spatial, dim, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize(
    "spatial",
    [(9, 11), (14, 21), (3, 4), (7, 7), (1, 13), (5, 6, 9), (2, 3, 4), (8, 7, 13), (7, 7, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_sema_attention_matches_naive_window_loop(spatial):
    q, k, v = qkv(*spatial)
    torch.testing.assert_close(sema_attention(q, k, v, 7), tokens(naive_sema(q, k, v, 7)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spatial", [(5, 6), (4, 3, 5)])
def test_map_inside_one_window_is_full_attention_plus_mean(spatial):
    q, k, v = qkv(*spatial)
    flat = [t.flatten(2, -2) for t in (q, k, v)]
    full = torch.softmax(flat[0] @ flat[1].transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ flat[2]
    expected = full.reshape(q.shape) + v.mean(dim=tuple(range(2, v.ndim - 1)), keepdim=True)
    torch.testing.assert_close(sema_attention(q, k, v, 7), tokens(expected))


def test_padding_never_reaches_real_outputs():
    """Cropping the map leaves the windows that stay whole unchanged (apart from the mean term):
    padded positions are masked out of the softmax, so they cannot stand in for the cropped tokens."""
    q, k, v = qkv(14, 14)
    crop = [t[:, :, :10, :9] for t in (q, k, v)]
    full = sema_attention(q, k, v, 7, global_mean=False)
    cropped = sema_attention(*crop, 7, global_mean=False)
    torch.testing.assert_close(cropped[:, :7, :7], full[:, :7, :7])
    torch.testing.assert_close(cropped, tokens(naive_sema(*crop, 7) - crop[2].mean(dim=(2, 3), keepdim=True)))


@pytest.mark.parametrize("spatial", [(10, 9), (9, 8, 3)])
def test_mean_term_is_exact_mean_over_real_positions(spatial):
    q, k, v = qkv(*spatial)
    diff = sema_attention(q, k, v, 4) - sema_attention(q, k, v, 4, global_mean=False)
    expected = v.sum(dim=tuple(range(2, v.ndim - 1)), keepdim=True) / torch.tensor(spatial).prod()
    torch.testing.assert_close(diff, tokens(expected.expand_as(v)))


def test_sema_attention_flops_grow_linearly_with_tokens():
    attn = SEMAAttention(64, spatial_dims=2, window_size=7)

    def flops(side_h: int, side_w: int) -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            attn(torch.randn(1, side_h, side_w, 64))
        return counter.get_total_flops()

    for h, w in [(56, 56), (112, 112)]:
        ratio = flops(h, 2 * w) / flops(h, w)
        assert ratio == pytest.approx(2.0, rel=0.1)


def test_sema_block_keeps_shape_2d_and_3d():
    for dims, shape in [(2, (2, 64, 13, 17)), (3, (1, 32, 5, 9, 8))]:
        block = SEMABlock(shape[1], spatial_dims=dims, drop_path=0.1)
        assert block(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("dims,size", [(2, (37, 61)), (2, (64, 64)), (3, (19, 27, 22))])
@pytest.mark.parametrize("placement", ["enc", "bot", "skip", "none"])
def test_usema_output_shapes_for_any_size(dims, size, placement):
    net = USEMA(dims, in_channels=2, out_channels=5, preset="tiny", sema_stages=placement)
    x = torch.randn(1, 2, *size)
    outputs = net.train()(x)
    assert isinstance(outputs, list) and outputs[0].shape == (1, 5, *size)
    for level, out in enumerate(outputs):
        assert out.shape[2:] == tuple(-(-s // 2**level) for s in size)
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 5, *size)


def _reference_instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Instance norm written out: per sample and channel, zero mean and unit biased variance, then affine."""
    dims = tuple(range(2, x.ndim))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    shape = (1, -1, *(1,) * len(dims))
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_blocks_normalise_each_instance_and_channel(dims):
    """USEMA's conv blocks use instance normalisation (nnU-Net's): every channel of every sample is scaled to zero
    mean and unit (biased) variance over its own voxels, then by the per-channel affine parameters."""
    torch.manual_seed(0)
    net = USEMA(dims, 1, 2, preset="tiny")
    block = net.encoder[1][0]
    norm = block.norm1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, norm.weight.numel(), *(6,) * dims) * 4 + torch.arange(3.0).view(3, 1, *(1,) * dims)
    torch.testing.assert_close(norm(x), _reference_instance_norm(x, norm.weight, norm.bias), atol=1e-5, rtol=1e-5)
    assert sorted(name for name, _ in norm.named_parameters()) == ["bias", "weight"]  # InstanceNorm's tensors


@pytest.mark.parametrize("dims", [2, 3])
def test_plain_stem_output_does_not_depend_on_the_intensity_scale(dims):
    """With stem="plain" every path from the input is instance-normalised, so images normalised with other
    statistics than in training (a slice z-scored on its own instead of with its volume) get the same
    segmentation: scaling the input by 7 changes no logit beyond float rounding. The residual stem's shortcut
    passes the intensities on, which is what the option is for."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, *((64,) * 2 if dims == 2 else (32,) * 3))
    with torch.no_grad():
        plain = USEMA(dims, 2, 3, preset="tiny", stem="plain").eval()
        reference = plain(x)
        torch.testing.assert_close(plain(7 * x), reference, atol=2e-3, rtol=0)
        assert (plain(x + torch.randn_like(x)) - reference).abs().max() > 0.05  # the output does depend on the image
        residual = USEMA(dims, 2, 3, preset="tiny", stem="residual").eval()
        assert (residual(7 * x) - residual(x)).abs().max() > 0.05


def test_no_deep_supervision_returns_a_tensor_in_training():
    net = USEMA(2, 1, 3, preset="tiny", deep_supervision=False).train()
    assert net(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="64"):
        net(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sema_stages": "skip"}, {"sema_stages": "bot", "mean_gate": True},
     {"decoder_block": "conv", "stem": "residual"}],
)
def test_gradients_reach_every_parameter(overrides):
    torch.manual_seed(0)
    net = USEMA(2, 1, 3, preset="tiny", **overrides).train()
    outputs = net(torch.randn(2, 1, 64, 64))
    sum((o.square().mean() for o in outputs), torch.zeros(())).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_global_mean_ablation_removes_the_mean_term():
    torch.manual_seed(0)
    with_mean = USEMA(2, 1, 2, preset="tiny")
    torch.manual_seed(0)
    without = USEMA(2, 1, 2, preset="tiny", global_mean=False)
    without.load_state_dict(with_mean.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(with_mean.eval()(x), without.eval()(x))


def test_same_seed_same_network_and_outputs():
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        net = USEMA(2, 1, 4, preset="tiny", drop_path=0.2).train()
        return net(torch.randn(1, 1, 48, 48))[0]

    torch.testing.assert_close(run(123), run(123), rtol=0, atol=0)
    assert not torch.equal(run(123), run(124))  # the seed does decide: the equality above is not vacuous


def test_bad_options_are_rejected_with_the_name():
    with pytest.raises(ValueError, match="sema_stage"):
        USEMA(2, 1, 2, sema_stage="enc")
    with pytest.raises(ValueError, match="preset"):
        USEMA(2, 1, 2, preset="huge")
    with pytest.raises(ValueError, match="sema_stages"):
        USEMA(2, 1, 2, sema_stages="middle")
    with pytest.raises(ValueError, match="decoder_block"):
        USEMA(2, 1, 2, decoder_block="dense")
    with pytest.raises(ValueError, match="stem"):
        USEMA(2, 1, 2, stem="deep")


@pytest.mark.parametrize("dims,size", [(2, (64, 80)), (3, (32, 32, 32))])
def test_torchscript_trace_round_trip(tmp_path, dims, size):
    net = USEMA(dims, 1, 3, preset="tiny").eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
    traced.save(str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_torch_export_round_trip(tmp_path):
    net = USEMA(2, 1, 3, preset="tiny").eval()
    x = torch.randn(1, 1, 70, 66)
    program = torch.export.export(net, (x,))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_bf16_autocast_on_cpu():
    net = USEMA(2, 1, 3, preset="tiny").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    with torch.no_grad():
        ref = net(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9


@pytest.mark.slow
def test_torch_compile_matches_eager():
    net = USEMA(2, 1, 3, preset="tiny").eval()
    x = torch.randn(1, 1, 64, 64)
    compiled = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["usema", "basicunet", "dynunet", "swinunetr", "unetr", "segresnet"])
def test_factory_builds_every_network_with_one_convention(name):
    net = build_network(name, 2, 1, 3, preset="tiny", img_size=(64, 64)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_dynunet_deep_supervision_is_a_list_like_usema():
    net = build_network("dynunet", 2, 1, 3, deep_supervision=True).train()
    outputs = net(torch.randn(2, 1, 64, 64))
    assert isinstance(outputs, list) and len(outputs) == 4 and outputs[0].shape == (2, 3, 64, 64)


class _LayoutChanges(TorchDispatchMode):
    """Counts the places where data is transposed in memory (the innermost axis moves), made explicitly (a copy
    of a tensor whose last axis is not its stride-1 axis) or hidden inside a kernel that needs dense input
    (layer norm on a non-contiguous tensor, a matmul on a matrix neither row- nor column-major, a convolution
    on a tensor dense in neither the channels-first nor the channels-last layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        aten = torch.ops.aten
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func in (aten.clone.default, aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else first
            if src.dim() > 1 and src.size(-1) > 1 and src.stride(-1) != 1:
                self.changes.append(f"copy of {tuple(src.shape)} strides {src.stride()}")
        elif func is aten.native_layer_norm.default and not first.is_contiguous():
            self.changes.append(f"layer norm on non-contiguous {tuple(first.shape)}")
        elif func in (aten.addmm.default, aten.mm.default, aten.bmm.default):
            matrix = args[1] if func is aten.addmm.default else first
            if matrix.stride(-1) != 1 and matrix.stride(-2) != 1:
                self.changes.append(f"matmul on {tuple(matrix.shape)} strides {matrix.stride()}")
        elif func is aten.convolution.default:
            layout = torch.channels_last if first.dim() == 4 else torch.channels_last_3d
            if not (first.is_contiguous() or first.is_contiguous(memory_format=layout)):
                self.changes.append(f"convolution on {tuple(first.shape)} strides {first.stride()}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dims,shape", [(2, (2, 64, 14, 14)), (2, (1, 64, 10, 9)), (3, (1, 32, 7, 9, 7))],
                         ids=["2d", "2d-padded", "3d"])
def test_sema_block_changes_layout_once_in_and_once_out(dims, shape):
    """The block works on channels-last tokens from entry to exit: its forward transposes the data twice (in, out)
    and the backward twice (the mirror images), whatever the window padding."""
    block = SEMABlock(shape[1], spatial_dims=dims)
    x = torch.randn(shape)
    with torch.no_grad(), _LayoutChanges() as forward:
        block(x)
    assert len(forward.changes) == 2, forward.changes
    y = block(x)
    with _LayoutChanges() as backward:
        y.sum().backward()
    assert len(backward.changes) <= 2, backward.changes


@pytest.mark.parametrize("dims,shape", [(2, (2, 64, 14, 14)), (2, (1, 64, 10, 9)), (3, (1, 32, 7, 9, 7))],
                         ids=["2d", "2d-padded", "3d"])
def test_sema_block_on_channels_last_input_transposes_nothing_and_answers_the_same(dims, shape):
    """In the layout CPU inference runs USEMA in (``USEMA.inference_memory_format``) the block's tokens are the
    input's memory as it is: no transposition in or out, the output stays channels-last, the values equal."""
    torch.manual_seed(0)
    block = SEMABlock(shape[1], spatial_dims=dims).eval()
    x = torch.randn(shape)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    with torch.no_grad():
        expected = block(x)
        with _LayoutChanges() as forward:
            out = block(x.contiguous(memory_format=layout))
    assert forward.changes == []
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims,size,layout", [(2, (70, 64), torch.channels_last), (3, (32, 32, 36), torch.contiguous_format)],
                         ids=["2d-channels-last", "3d-default"])
def test_usema_in_its_inference_layout_predicts_the_same_logits(dims, size, layout):
    torch.manual_seed(0)
    net = USEMA(dims, 1, 3, "tiny").eval()
    assert net.inference_memory_format == layout
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        expected = net(x)
        out = net.to(memory_format=net.inference_memory_format)(x)
    assert net.encoder[1][0].conv1.weight.is_contiguous(memory_format=layout)
    # another summation order in the convolutions: float32 rounding, grown through 20 normalised layers
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 4, 3, 5, 4), (1, 6, 1, 9)], ids=["2d", "3d", "one-row"])
def test_channels_last_instance_norm_gradients_equal_the_written_out_formula(shape):
    """Training channels-last on the CPU runs the norm's own backward (not PyTorch's group norm's): its gradients
    for the input, weight and bias equal autograd's through the formula written out, in float64."""
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    gen = torch.Generator().manual_seed(3)
    norm = InstanceNorm(shape[1]).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=gen)
        norm.bias.uniform_(-1.0, 1.0, generator=gen)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).contiguous(memory_format=layout)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (norm, lambda t: _reference_instance_norm(t, norm.weight, norm.bias)):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        out = fn(xi)
        grads.append(torch.autograd.grad((out * upstream).sum(), [xi, norm.weight, norm.bias]))
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-10)
    assert grads[0][0].is_contiguous(memory_format=layout)  # the next conv's backward gets channels-last


def test_channels_last_instance_norm_passes_gradcheck():
    """The hand-written backward against finite differences, for the input, weight and bias."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(2))
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: _ChannelsLastInstanceNorm.apply(*a, 1e-5), inputs)


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_usema_trains_channels_last_without_pytorchs_channels_last_group_norm_backward():
    """2D USEMA declares channels-last for CPU training; a training step in that layout gives the same gradients
    as channels-first and never runs ``native_group_norm_backward`` (4x slower channels-last)."""
    torch.manual_seed(0)
    net = USEMA(2, 1, 3, "tiny", deep_supervision=False).double()
    assert net.training_memory_format == torch.channels_last
    assert USEMA(3, 1, 3, "tiny").training_memory_format == torch.contiguous_format
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 64, 64))

    def step(layout, ops=None):
        net.zero_grad(set_to_none=True)
        net.to(memory_format=layout)
        with ops or contextlib.nullcontext():
            torch.nn.functional.cross_entropy(net(x.contiguous(memory_format=layout)), target).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    first = step(torch.contiguous_format)
    last = step(torch.channels_last, ops := _OpNames())
    assert "native_group_norm" in ops.names and "native_group_norm_backward" not in ops.names
    for name in first:
        torch.testing.assert_close(last[name], first[name], rtol=1e-9, atol=1e-12, msg=name)


def test_channels_last_instance_norm_under_bf16_autocast_matches_group_norm():
    """`train.precision: bf16` on the CPU: the norm gets bfloat16 activations and float32 parameters; its backward
    (in float32) gives PyTorch's group-norm gradients to bfloat16 rounding."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 8, 16, 16, generator=gen)
    grads = []
    for norm in (torch.nn.GroupNorm(8, 8), InstanceNorm(8)):
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(xi.bfloat16())
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad((out.float() * upstream).sum(), [xi, norm.weight, norm.bias]))
    for mine, reference in zip(grads[1], grads[0]):
        assert float((mine - reference).abs().max() / reference.abs().max()) < 1e-2
