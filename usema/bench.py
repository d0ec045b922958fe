"""`usema bench`: the cost of USEMA presets next to MONAI's peer networks on this machine.

Per network and input size: parameters, forward GFLOPs (``torch.utils.flop_counter`` plus the CPU fused
attention ops it does not count), forward latency (median over interleaved rounds, batch 1), peak forward
memory (VmHWM of a fresh subprocess), achieved GFLOP/s, the training-step time (forward + backward + SGD step,
batch 2) and the log-log slope of FLOPs and latency against the pixel count. Ratios are against DynUNet.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from usema.errors import UsemaError
from usema.io.files import atomic_write_text, ensure_writable_dir, refuse_existing

__all__ = [
    "BenchConfig",
    "add_parser",
    "attention_flop_mapping",
    "build_bench_network",
    "count_flops",
    "format_markdown",
    "measure_peak_memory",
    "run_benchmark",
    "scaling_slope",
]

REFERENCE = "dynunet"
IN_CHANNELS = 1
OUT_CHANNELS = 4
DEFAULT_NETS = {
    2: ("usema-tiny", "usema-small", "usema-base", "dynunet", "swinunetr", "unetr", "basicunet"),
    3: ("usema-tiny", "usema-small", "usema-base", "dynunet", "basicunet"),
}
PEERS = ("dynunet", "swinunetr", "unetr", "basicunet", "segresnet")
USEMA_PRESETS = ("tiny", "small", "base")
DEFAULT_SIZES = {2: (256, 512, 1024), 3: (64, 96, 128)}
DEFAULT_TRAIN_SIZE = {2: 256, 3: 64}
QUICK_SIZE = {2: 64, 3: 64}
# five stride-2 levels (DynUNet, USEMA) must leave >= 2 pixels per side for instance norm
MIN_SIZE = 64
# input sides must be multiples of the ViT patch (UNETR) or of patch * 2**stages (SwinUNETR)
SIZE_DIVISOR = {"unetr": 16, "swinunetr": 32}


# ---------------------------------------------------------------------------------------------- FLOPs
def _attention_shapes(*shapes: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Fold any leading batch dims of (*batch, heads, L, d) shapes into one, as ``sdpa_flop_count`` expects."""
    return [(math.prod(s[:-3]), *s[-3:]) for s in shapes]


def _fused_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(*_attention_shapes(query, key, value))


def _fused_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(*_attention_shapes(grad_out, query, key, value))


def attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """``FlopCounterMode(custom_mapping=...)`` entries for the CPU fused attention ops torch counts as 0.

    Forward: 2·B·H·Lq·Lk·d for QK^T plus 2·B·H·Lq·Lk·d_v for AV (torch's SDPA formula, the same as the
    math path's two batched matmuls); backward: torch's SDPA backward formula. Softmax and masking are not
    counted, as on the math path.
    """
    aten = torch.ops.aten
    forward = [
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_fused_attention_overrideable,
    ]
    backward = [
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
        aten._scaled_dot_product_fused_attention_overrideable_backward,
    ]
    return {**{op: _fused_attention_flops for op in forward}, **{op: _fused_attention_backward_flops for op in backward}}


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one no-grad forward of ``model`` on ``x``, fused attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------- networks
def _parse_net(name: str) -> tuple[str, str]:
    """'usema-small' -> ('usema', 'small'); a peer name -> (name, 'base')."""
    family, _, preset = name.partition("-")
    if family == "usema" and preset in USEMA_PRESETS:
        return family, preset
    if name in PEERS:
        return name, "base"
    choices = ", ".join([f"usema-{p}" for p in USEMA_PRESETS] + list(PEERS))
    raise UsemaError(f"--nets: unknown network {name!r}; expected some of {choices}")


def build_bench_network(name: str, spatial_dims: int, size: int) -> nn.Module:
    """The benchmarked network ``name`` (e.g. 'usema-base', 'dynunet') for (size,)*spatial_dims inputs, 1 -> 4 ch.

    The peers use ``usema.nets.build_network``'s configurations: DynUNet nnU-Net-like (kernels 3, strides
    1,2,2,2,2,2, widths 32..512 in 2D / 32..320 in 3D), SwinUNETR feature size 48 window 7, UNETR ViT-B/16.
    """
    from usema.nets import build_network  # the nets import MONAI's network zoo: only when building

    family, preset = _parse_net(name)
    return build_network(
        family, spatial_dims, IN_CHANNELS, OUT_CHANNELS, preset=preset, img_size=(size,) * spatial_dims
    )


def _check_sizes(nets: Sequence[str], sizes: Sequence[int], key: str = "--sizes") -> None:
    """Every side at least ``MIN_SIZE`` and a multiple of each net's patch divisor, else a UsemaError on ``key``."""
    if any(s < MIN_SIZE for s in sizes):
        raise UsemaError(f"{key}: sides of at least {MIN_SIZE} expected, got {list(sizes)}")
    for net in nets:
        divisor = SIZE_DIVISOR.get(net, 1)
        bad = [s for s in sizes if s % divisor]
        if bad:
            raise UsemaError(f"{key}: {net} needs sides divisible by {divisor}, got {bad}")


def _input(spatial_dims: int, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A reproducible random image (batch, 1, *(size,)*spatial_dims)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, IN_CHANNELS, *(size,) * spatial_dims), generator=generator)


def _build_all(nets: Sequence[str], spatial_dims: int, size: int) -> dict[str, nn.Module]:
    models = {}
    for name in nets:
        torch.manual_seed(0)
        models[name] = build_bench_network(name, spatial_dims, size)
    return models


# ------------------------------------------------------------------------------------------- timing
def _timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_rounds(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step over ``repeats`` rounds; round r calls every step once, in order.

    Interleaving makes every network see the same slow phases of a shared machine, so ratios stay fair.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_timed(step))
    return times


def _forward_step(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    model.eval()

    def step() -> object:
        with torch.no_grad():
            return model(x)

    return step


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """One SGD step on cross-entropy; the network is built without deep supervision (plain logits)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


# ------------------------------------------------------------------------------------------- memory
def _proc_status_mib(*keys: str) -> dict[str, float]:
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_probe(name: str, spatial_dims: int, size: int, threads: int) -> dict[str, float | bool]:
    """Peak memory of one no-grad forward in this process (meant to run in a fresh subprocess).

    ``baseline_mib`` is the resident memory after imports, model construction and input creation;
    ``forward_mib`` the VmHWM rise above it during the forward; ``process_peak_mib`` the VmHWM at the end.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_bench_network(name, spatial_dims, size).eval()
    x = _input(spatial_dims, size)
    gc.collect()
    reset = _reset_peak_rss()
    before = _proc_status_mib("VmRSS", "VmHWM")
    baseline = before["VmRSS"] if reset else before["VmHWM"]
    with torch.no_grad():
        model(x)
    peak = _proc_status_mib("VmHWM")["VmHWM"]
    return {"baseline_mib": baseline, "forward_mib": peak - baseline, "process_peak_mib": peak, "hwm_reset": reset}


def measure_peak_memory(
    probes: Sequence[tuple[str, int, int]], threads: int
) -> list[dict[str, float | bool]]:
    """``memory_probe`` for each (name, spatial_dims, size), each in a fresh process, results in order.

    VmHWM is per process (and ru_maxrss would inherit this process's peak), so every measurement gets a new
    child, forked from a server that has imported torch and the networks once (importing MONAI takes seconds)
    and has run no torch op, so no thread pool is inherited.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["usema.bench", "usema.nets"])
    with context.Pool(1, maxtasksperchild=1) as pool:
        return [pool.apply(memory_probe, (name, dims, size, threads)) for name, dims, size in probes]


# ------------------------------------------------------------------------------------------- harness
@dataclass
class BenchConfig:
    """What to measure. ``repeats`` timed rounds follow one warm-up round."""

    spatial_dims: int = 2
    sizes: tuple[int, ...] = DEFAULT_SIZES[2]
    nets: tuple[str, ...] = DEFAULT_NETS[2]
    repeats: int = 5
    largest_repeats: int | None = None
    """Rounds at the largest size (None: ``repeats``); the slowest nets dominate the run time there."""
    train_size: int = DEFAULT_TRAIN_SIZE[2]
    train_batch: int = 2
    train_repeats: int = 5
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    memory: bool = True


def scaling_slope(pixels: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(pixel count); 1.0 = linear cost. None below 2 sizes."""
    if len(pixels) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(pixels, float)), np.log(np.asarray(values, float)), 1)
    return float(slope)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _bench_size(config: BenchConfig, size: int, repeats: int) -> list[dict[str, Any]]:
    """Forward metrics of every net at one size: params, FLOPs and latency over interleaved rounds."""
    models = _build_all(config.nets, config.spatial_dims, size)
    x = _input(config.spatial_dims, size)
    rows = []
    for name, model in models.items():
        model.eval()
        _log(f"{size}: counting FLOPs of {name}")
        rows.append(
            {
                "net": name,
                "size": size,
                "pixels": size**config.spatial_dims,
                "params": sum(p.numel() for p in model.parameters()),
                "flops": count_flops(model, x),
            }
        )
    steps = {n: _forward_step(m, x) for n, m in models.items()}
    _log(f"{size}: warm-up + {repeats} interleaved latency rounds")
    interleaved_rounds(steps, 1)  # the counted forward runs under a dispatch mode: it does not warm up
    times = interleaved_rounds(steps, repeats)
    del models
    gc.collect()
    for row in rows:
        row["latency_s"] = statistics.median(times[row["net"]])
        row["latency_samples_s"] = times[row["net"]]
        row["repeats"] = repeats
        row["gflops_per_s"] = row["flops"] / 1e9 / row["latency_s"]
    return rows


def _bench_train(config: BenchConfig) -> list[dict[str, Any]]:
    """Training-step time of every net at ``train_size`` and ``train_batch``, interleaved rounds after a warm-up."""
    size, batch = config.train_size, config.train_batch
    models = _build_all(config.nets, config.spatial_dims, size)
    x = _input(config.spatial_dims, size, batch)
    labels_shape = (batch, *(size,) * config.spatial_dims)
    target = torch.randint(0, OUT_CHANNELS, labels_shape, generator=torch.Generator().manual_seed(1))
    steps = {n: _train_step(m, x, target) for n, m in models.items()}
    _log(f"train {size}, batch {batch}: warm-up + {config.train_repeats} interleaved rounds")
    interleaved_rounds(steps, 1)
    times = interleaved_rounds(steps, config.train_repeats)
    return [
        {"net": n, "size": size, "batch": batch, "train_step_s": statistics.median(t), "train_samples_s": t}
        for n, t in times.items()
    ]


def _add_ratios(rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """``<key>_ratio`` = value / DynUNet's value at the same size (absent when DynUNet is not benchmarked)."""
    reference = {r["size"]: r for r in rows if r["net"] == REFERENCE}
    for row in rows:
        ref = reference.get(row["size"])
        for key in keys:
            if ref is not None and key in row and ref.get(key):
                row[f"{key}_ratio"] = row[key] / ref[key]


def _slopes(rows: list[dict[str, Any]], nets: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for net in nets:
        mine = [r for r in rows if r["net"] == net]
        pixels = [r["pixels"] for r in mine]
        out.append(
            {
                "net": net,
                "flop_slope": scaling_slope(pixels, [r["flops"] for r in mine]),
                "latency_slope": scaling_slope(pixels, [r["latency_s"] for r in mine]),
            }
        )
    reference = next((s for s in out if s["net"] == REFERENCE), None)
    for s in out:
        if reference is not None and s["latency_slope"] is not None:
            s["latency_slope_minus_reference"] = s["latency_slope"] - reference["latency_slope"]
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Measure everything in ``config``; returns {"config", "machine", "forward", "train", "scaling", "seconds"}."""
    _check_sizes(config.nets, config.sizes)
    _check_sizes(config.nets, (config.train_size,), "--train-size")
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    forward: list[dict[str, Any]] = []
    largest = max(config.sizes)
    for size in sorted(config.sizes):
        repeats = config.largest_repeats if size == largest and config.largest_repeats else config.repeats
        forward.extend(_bench_size(config, size, repeats))
    if config.memory:
        _log(f"peak forward memory: {len(forward)} fresh processes")
        probes = [(r["net"], config.spatial_dims, r["size"]) for r in forward]
        for row, memory in zip(forward, measure_peak_memory(probes, config.threads)):
            row.update(memory)
    _add_ratios(forward, ("latency_s", "forward_mib", "flops", "gflops_per_s"))
    train = _bench_train(config) if config.train_repeats > 0 else []
    _add_ratios(train, ("train_step_s",))
    return {
        "config": asdict(config),
        "machine": _machine(),
        "forward": forward,
        "train": train,
        "scaling": _slopes(forward, config.nets),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_markdown(results: dict[str, Any]) -> str:
    """The results as markdown: a forward table per size, a training-step table and a scaling table."""
    cfg, machine = results["config"], results["machine"]
    dims = cfg["spatial_dims"]
    side = lambda s: "×".join([str(s)] * dims)  # noqa: E731 - tiny local formatter
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({cfg['threads']} threads), "
        f"{machine['date_utc']} UTC; {IN_CHANNELS} input channel, {OUT_CHANNELS} classes, batch 1, "
        f"{dims}D; total {results['seconds'] / 60:.1f} min.",
        "",
        "### Forward pass",
        "",
    ]
    header = [
        "size", "network", "params (M)", "GFLOPs", "latency (s)", "n", "peak fwd mem (MiB)", "process peak (MiB)",
        "GFLOP/s", "latency ×DynUNet", "memory ×DynUNet", "FLOPs ×DynUNet", "GFLOP/s ×DynUNet",
    ]  # fmt: skip
    rows = [
        [
            side(r["size"]), r["net"], _fmt(r["params"] / 1e6), _fmt(r["flops"] / 1e9, 1), _fmt(r["latency_s"], 3),
            str(r["repeats"]), _fmt(r.get("forward_mib"), 0), _fmt(r.get("process_peak_mib"), 0),
            _fmt(r["gflops_per_s"], 1), _fmt(r.get("latency_s_ratio")), _fmt(r.get("forward_mib_ratio")),
            _fmt(r.get("flops_ratio")), _fmt(r.get("gflops_per_s_ratio")),
        ]  # fmt: skip
        for r in results["forward"]
    ]
    lines += _table(header, rows)
    if results["train"]:
        first = results["train"][0]
        lines += ["", f"### Training step (forward + backward + SGD, {side(first['size'])}, batch {first['batch']})", ""]
        rows = [[r["net"], _fmt(r["train_step_s"], 3), _fmt(r.get("train_step_s_ratio"))] for r in results["train"]]
        lines += _table(["network", "train step (s)", "train step ×DynUNet"], rows)
    if len(cfg["sizes"]) < 2:
        return "\n".join(lines) + "\n"
    lines += ["", "### Scaling (log-log slope against pixel count; 1.00 = linear)", ""]
    rows = [
        [s["net"], _fmt(s["flop_slope"]), _fmt(s["latency_slope"]), _fmt(s.get("latency_slope_minus_reference"))]
        for s in results["scaling"]
    ]
    lines += _table(["network", "FLOP slope", "latency slope", "latency slope − DynUNet's"], rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- CLI
def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    dims = args.dims
    quick = args.quick
    sizes = tuple(args.sizes) if args.sizes else ((QUICK_SIZE[dims],) if quick else DEFAULT_SIZES[dims])
    nets = tuple(args.nets) if args.nets else DEFAULT_NETS[dims]
    for name in nets:
        _parse_net(name)
    if len(set(nets)) != len(nets):
        raise UsemaError(f"--nets: each network once, got {list(nets)}")
    if not args.no_memory and not os.path.exists("/proc/self/status"):
        raise UsemaError("--no-memory: peak memory is read from Linux /proc; pass --no-memory on this system")
    repeats = args.repeats or (1 if quick else 5)
    train_size = args.train_size or (min(sizes) if quick else DEFAULT_TRAIN_SIZE[dims])
    return BenchConfig(
        spatial_dims=dims,
        sizes=sizes,
        nets=nets,
        repeats=repeats,
        largest_repeats=args.largest_repeats,
        train_size=train_size,
        train_batch=args.train_batch,
        train_repeats=0 if args.no_train else repeats,
        threads=args.threads or len(os.sched_getaffinity(0)),
        memory=not args.no_memory,
    )


def _outputs(path: str | None, overwrite: bool) -> tuple[Path, Path] | None:
    if path is None:
        return None
    md = Path(path)
    if md.suffix != ".md":
        raise UsemaError(f"--output: a .md file expected, got {path}")
    ensure_writable_dir(md.parent, "--output directory")  # fail now, not after the measurements
    js = md.with_suffix(".json")
    refuse_existing([md, js], overwrite, "benchmark report")
    return md, js


def run(args: argparse.Namespace) -> int:
    """`usema bench`: run the benchmark, print the markdown table, optionally write FILE.md and FILE.json."""
    config = _config_from_args(args)
    outputs = _outputs(args.output, args.overwrite)
    results = run_benchmark(config)
    report = format_markdown(results)
    print(report)
    if outputs is not None:
        md, js = outputs
        atomic_write_text(js, json.dumps(results, indent=1))
        atomic_write_text(md, report)
        _log(f"wrote {md} and {js}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `usema bench`."""
    p = subparsers.add_parser(
        "bench",
        help="cost of USEMA vs. MONAI networks: params, GFLOPs, latency, memory, train step",
        description="Params, forward GFLOPs, latency (interleaved rounds), peak forward memory (fresh process), "
        "GFLOP/s, training-step time and log-log scaling slopes of USEMA presets and MONAI networks; "
        "prints a markdown table with ratios against DynUNet.",
    )
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D or 3D networks (default 2)")
    p.add_argument("--sizes", type=_positive_int, nargs="+", help="input sides (default 256 512 1024 / 64 96 128)")
    p.add_argument("--nets", nargs="+", help=f"networks among {' '.join(DEFAULT_NETS[2])} segresnet")
    p.add_argument("--repeats", type=_positive_int, help="timed rounds after the warm-up (default 5; --quick 1)")
    p.add_argument("--largest-repeats", type=_positive_int, help="timed rounds at the largest size (default --repeats)")
    p.add_argument("--train-size", type=_positive_int, help="training-step input side (default 256 / 64)")
    p.add_argument("--train-batch", type=_positive_int, default=2, help="training-step batch size (default 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores of this process)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small size, 1 round")
    p.add_argument("--output", metavar="FILE.md", help="also write the table to FILE.md and all numbers to FILE.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
    return p
