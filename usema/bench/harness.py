"""Run a benchmark configuration: forward, memory, training step, ratios against DynUNet, scaling slopes."""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch

from usema.bench.flops import count_flops
from usema.bench.memory import measure_peak_memory
from usema.bench.networks import build_all, check_sizes, make_input
from usema.bench.settings import OUT_CHANNELS, REFERENCE, BenchConfig
from usema.bench.timing import forward_step, interleaved_rounds, train_step
from usema.threads import usable_cpus

def scaling_slope(pixels: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(pixel count); 1.0 = linear cost. None below 2 sizes."""
    if len(pixels) < 2:
        return None
    slope, _ = np.polyfit(np.log(np.asarray(pixels, float)), np.log(np.asarray(values, float)), 1)
    return float(slope)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _bench_size(config: BenchConfig, size: int, repeats: int) -> list[dict[str, Any]]:
    """Forward metrics of every net at one size: params, FLOPs and latency over interleaved rounds."""
    models = build_all(config.nets, config.spatial_dims, size)
    x = make_input(config.spatial_dims, size)
    rows = []
    for name, model in models.items():
        model.eval()
        log(f"{size}: counting FLOPs of {name}")
        rows.append(
            {
                "net": name,
                "size": size,
                "pixels": size**config.spatial_dims,
                "params": sum(p.numel() for p in model.parameters()),
                "flops": count_flops(model, x),
            }
        )
    steps = {n: forward_step(m, x) for n, m in models.items()}
    log(f"{size}: warm-up + {repeats} interleaved latency rounds")
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
    models = build_all(config.nets, config.spatial_dims, size)
    x = make_input(config.spatial_dims, size, batch)
    labels_shape = (batch, *(size,) * config.spatial_dims)
    target = torch.randint(0, OUT_CHANNELS, labels_shape, generator=torch.Generator().manual_seed(1))
    steps = {n: train_step(m, x, target) for n, m in models.items()}
    log(f"train {size}, batch {batch}: warm-up + {config.train_repeats} interleaved rounds")
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
        "cores": usable_cpus(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Measure everything in ``config``; returns {"config", "machine", "forward", "train", "scaling", "seconds"}."""
    check_sizes(config.nets, config.sizes)
    check_sizes(config.nets, (config.train_size,), "--train-size")
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    forward: list[dict[str, Any]] = []
    largest = max(config.sizes)
    for size in sorted(config.sizes):
        repeats = config.largest_repeats if size == largest and config.largest_repeats else config.repeats
        forward.extend(_bench_size(config, size, repeats))
    if config.memory:
        log(f"peak forward memory: {len(forward)} fresh processes")
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
