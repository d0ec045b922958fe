"""Run a benchmark configuration: forward, memory, training steps, `usema infer` throughput, ratios, slopes."""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from usema.bench.flops import count_flops
from usema.bench.infer import bench_inference
from usema.bench.machine import LoadCheck, describe_machine
from usema.bench.memory import measure_peak_memory
from usema.bench.networks import build_all, check_sizes, make_input
from usema.bench.settings import INFER_REFERENCE, OUT_CHANNELS, REFERENCE, BenchConfig
from usema.bench.timing import forward_step, interleaved_rounds, train_step
from usema.inference.model_loading import place_for_inference

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
        place_for_inference(model.eval(), torch.device("cpu"))  # as usema infer runs it
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


def _bench_train(config: BenchConfig, size: int) -> list[dict[str, Any]]:
    """Training-step time and images/s of every net at ``size`` and ``train_batch``, interleaved rounds after a
    warm-up."""
    batch = config.train_batch
    models = build_all(config.nets, config.spatial_dims, size)
    x = make_input(config.spatial_dims, size, batch)
    labels_shape = (batch, *(size,) * config.spatial_dims)
    target = torch.randint(0, OUT_CHANNELS, labels_shape, generator=torch.Generator().manual_seed(1))
    steps = {n: train_step(m, x, target) for n, m in models.items()}
    log(f"train {size}, batch {batch}: warm-up + {config.train_repeats} interleaved rounds")
    interleaved_rounds(steps, 1)
    times = interleaved_rounds(steps, config.train_repeats)
    del models, steps
    gc.collect()
    return [_train_row(n, size, batch, t) for n, t in times.items()]


def _train_row(net: str, size: int, batch: int, samples: list[float]) -> dict[str, Any]:
    step = statistics.median(samples)
    return {"net": net, "size": size, "batch": batch, "train_step_s": step, "train_samples_s": samples,
            "images_per_s": batch / step}  # fmt: skip


def _bench_infer(config: BenchConfig) -> list[dict[str, Any]]:
    """`usema infer` throughput on the synthetic volume, in a temporary folder removed afterwards."""
    if config.infer_shape is None:
        return []
    with tempfile.TemporaryDirectory(prefix="usema-bench-") as workdir:
        return bench_inference(config.nets, config.infer_shape, config.infer_repeats, Path(workdir), log,
                               config.threads)


def _add_ratios(
    rows: list[dict[str, Any]], keys: Sequence[str], reference: str = REFERENCE, group: str = "size"
) -> None:
    """``<key>_ratio`` = value / ``reference``'s value in the same ``group`` (size or shape; absent when the
    reference is not benchmarked)."""
    by_group = {str(r[group]): r for r in rows if r["net"] == reference}
    for row in rows:
        ref = by_group.get(str(row[group]))
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


def check_config(config: BenchConfig) -> None:
    """Every size fits every network (UsemaError naming the option otherwise)."""
    check_sizes(config.nets, config.sizes)
    check_sizes(config.nets, config.train_sizes, "--train-sizes")
    if config.infer_shape is not None:
        check_sizes(config.nets, config.infer_shape[:2], "--infer-shape")


def _bench_forward(config: BenchConfig) -> list[dict[str, Any]]:
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
    _add_ratios(forward, ("latency_s", "tensor_mib", "forward_mib", "flops", "gflops_per_s"))
    return forward


def run_benchmark(config: BenchConfig, load: LoadCheck) -> dict[str, Any]:
    """Measure everything in ``config``; returns {"config", "machine", "forward", "train", "infer", "scaling",
    "seconds"}. ``load`` is the load check made before the run; the machine section adds the load after it."""
    check_config(config)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    forward = _bench_forward(config)
    train = [row for size in config.train_sizes for row in _bench_train(config, size)] if config.train_repeats else []
    _add_ratios(train, ("train_step_s", "images_per_s"))
    infer = _bench_infer(config)
    _add_ratios(infer, ("voxels_per_s",), INFER_REFERENCE, group="shape")
    return {
        "config": asdict(config),
        "machine": describe_machine(load),
        "forward": forward,
        "train": train,
        "infer": infer,
        "scaling": _slopes(forward, config.nets),
        "seconds": time.perf_counter() - start,
    }
