"""`usema bench`: FLOP counting of fused attention, the harness pieces, and the CLI end to end (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from usema.bench import flops, harness, machine, memory, timing
from usema.cli import main
from usema.nets import SEMAAttention


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load check sees an idle machine: these tests must not depend on what else runs on it."""
    monkeypatch.setattr(machine, "load_averages", lambda: (0.0, 0.0, 0.0))


def _math_path_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` with SDPA forced onto the math path (explicit bmm ops, counted by torch)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def _fused_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=flops.attention_flop_mapping())
    with torch.no_grad(), counter:
        fn(*args)
    return counter.get_total_flops()


def test_fused_sdpa_counts_as_math_path() -> None:
    """Plain FlopCounterMode sees 0 for CPU fused attention; the registered formula matches the math path."""
    q, k, v = (torch.randn(3, 2, 49, 32) for _ in range(3))
    mask = torch.rand(3, 1, 1, 49) > 0.2
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attention = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    fused = _fused_flops(attention, q, k, v)
    assert plain.get_total_flops() == 0  # the gap the registration fills; if torch fixes it, recheck the mapping
    assert fused == _math_path_flops(attention, q, k, v) == 4 * 3 * 2 * 49 * 49 * 32


@pytest.mark.parametrize("spatial", [(20, 17), (9, 10, 11)])
def test_sema_attention_flops_match_math_path(spatial: tuple[int, ...]) -> None:
    """A whole SEMAAttention (qkv, ragged windows with masks, LePE) counts the same on both paths."""
    module = SEMAAttention(64, spatial_dims=len(spatial), window_size=7).eval()
    x = torch.randn(2, *spatial, 64)
    fused = _fused_flops(module, x)
    math_path = _math_path_flops(module, x)
    assert fused == math_path
    assert fused > _fused_flops(module.qkv, x)  # attention FLOPs are really in the total


def test_fused_attention_backward_counted() -> None:
    """Backward of fused attention is counted: the math path's FLOPs plus the flash kernel's recomputed QK^T."""
    b, h, length, d = 2, 2, 16, 8
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    counter = FlopCounterMode(display=False, custom_mapping=flops.attention_flop_mapping())
    with counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math_counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    recompute = 2 * b * h * length * length * d
    assert counter.get_total_flops() == math_counter.get_total_flops() + recompute


def test_scaling_slope_recovers_power_law() -> None:
    pixels = [64**2, 128**2, 256**2]
    assert harness.scaling_slope(pixels, [3.0 * p for p in pixels]) == pytest.approx(1.0)
    assert harness.scaling_slope(pixels, [p**1.5 for p in pixels]) == pytest.approx(1.5)
    assert harness.scaling_slope(pixels[:1], [1.0]) is None


def test_interleaved_rounds_alternate_networks() -> None:
    """Round r runs every network once before round r+1 starts (shared machine noise)."""
    calls: list[str] = []
    times = timing.interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_peak_tensor_memory_counts_what_a_forward_holds_at_once() -> None:
    """conv -> relu -> conv on a 1x1x64x64 input: the first conv's output (8 maps) is alive while relu writes its
    own (8 maps), then freed; the second conv's output (4 maps) is alive next to relu's. Peak: 16 maps of 64x64
    float32. The weights, the input and views of them are not counted."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 1, 64, 64)
    plane = 64 * 64 * 4 / 2**20
    assert memory.peak_tensor_mib(net, x) == pytest.approx(16 * plane)
    assert memory.peak_tensor_mib(torch.nn.Sequential(net, torch.nn.ReLU(inplace=True)), x) == pytest.approx(16 * plane)
    assert memory.peak_tensor_mib(torch.nn.Flatten(), x) == 0.0  # a view of the input allocates nothing
    # the same figure in every run: no allocator state in it
    assert len({memory.peak_tensor_mib(net, x) for _ in range(3)}) == 1


@pytest.mark.slow  # starts a process that imports torch and MONAI
def test_memory_probe_sees_forward_allocations() -> None:
    """The probe's forward peak exceeds the input size of a large image (a real forward high-water mark); the
    figure is the median of the fresh processes' figures."""
    [result] = memory.measure_peak_memory([("basicunet", 2, 128)], threads=1, repeats=3)
    assert len(result["forward_samples_mib"]) == 3
    assert result["forward_mib"] == sorted(result["forward_samples_mib"])[1]
    feature_map_mib = 32 * 128 * 128 * 4 / 2**20  # BasicUNet's first feature map alone
    assert result["forward_mib"] >= feature_map_mib
    assert result["process_peak_mib"] >= result["baseline_mib"] + result["forward_mib"] - 1e-6
    assert result["tensor_mib"] >= feature_map_mib


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--nets", "resnet50"], "--nets"),
        (["--nets", "unetr", "--sizes", "72"], "--sizes"),
        (["--nets", "dynunet", "dynunet"], "--nets"),
        (["--sizes", "32"], "--sizes"),
        (["--output", "/proc/usema/bench.md"], "/proc/usema"),
    ],
)
def test_bad_options_are_user_errors(argv: list[str], key: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usema: error: {key}:") and err.count("\n") == 1


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """`usema bench --quick` at 64² on two nets prints and writes the tables with every metric and ratio."""
    out = tmp_path / "bench.md"
    argv = ["bench", "--quick", "--nets", "usema-tiny", "dynunet", "--sizes", "64", "96", "--no-infer",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed
    results = json.loads(out.with_suffix(".json").read_text())

    forward = {(r["net"], r["size"]): r for r in results["forward"]}
    assert set(forward) == {(n, s) for n in ("usema-tiny", "dynunet") for s in (64, 96)}
    for row in forward.values():
        assert row["params"] > 0 and row["flops"] > 0 and row["latency_s"] > 0 and row["forward_mib"] > 0
        assert row["tensor_mib"] >= 4 * row["size"] ** 2 * 4 / 2**20  # the logits (4 classes) alone
        assert row["gflops_per_s"] == pytest.approx(row["flops"] / 1e9 / row["latency_s"])
    for size in (64, 96):
        assert forward["dynunet", size]["latency_s_ratio"] == 1.0
        usema_row = forward["usema-tiny", size]
        assert usema_row["flops_ratio"] == pytest.approx(usema_row["flops"] / forward["dynunet", size]["flops"])
    assert {r["net"] for r in results["train"]} == {"usema-tiny", "dynunet"}
    assert all(r["train_step_s"] > 0 and r["batch"] == 2 for r in results["train"])
    slopes = {s["net"]: s for s in results["scaling"]}
    assert 0.9 < slopes["dynunet"]["flop_slope"] < 1.1  # a conv net's FLOPs are linear in pixels

    md = out.read_text()
    for column in ("GFLOPs", "latency (s)", "peak tensors (MiB)", "peak fwd mem (MiB)", "GFLOP/s", "latency ×DynUNet",
                   "train step (s)", "FLOP slope", "latency slope"):  # fmt: skip
        assert column in md
    assert md.count("| 64×64 |") == 4 and md.count("| 96×96 |") == 2  # forward rows; training at the smallest size

    assert main(argv) == 2  # results are not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
