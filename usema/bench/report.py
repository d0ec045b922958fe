"""The benchmark results as markdown tables."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from usema.bench.settings import IN_CHANNELS, OUT_CHANNELS

def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _load_text(load: dict[str, float] | None) -> str:
    return "unavailable" if load is None else "/".join(f"{v:.2f}" for v in load.values())


def _header(results: dict[str, Any]) -> list[str]:
    """The machine line (CPU, usable CPUs, load before and after the run), flagged first when it was loaded."""
    cfg, machine = results["config"], results["machine"]
    lines = []
    if machine["loaded"]:
        lines += [
            f"**LOADED MACHINE: timings not comparable** (1-minute load {machine['load_before']['1min']:.2f} before "
            f"the run, above the limit {machine['load_limit_1min']:.2f}; run anyway with --allow-load)",
            "",
        ]
    lines.append(
        f"Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, torch {machine['torch']} "
        f"({cfg['threads']} threads), {machine['date_utc']} UTC; load average (1/5/15 min) "
        f"{_load_text(machine['load_before'])} before, {_load_text(machine['load_after'])} after the run; "
        f"{IN_CHANNELS} input channel, {OUT_CHANNELS} classes, batch 1, {cfg['spatial_dims']}D; "
        f"total {results['seconds'] / 60:.1f} min."
    )
    return lines


def _forward(results: dict[str, Any], side: Callable[[int], str]) -> list[str]:
    header = [
        "size", "network", "params (M)", "GFLOPs", "latency (s)", "n", "peak tensors (MiB)", "peak fwd mem (MiB)",
        "process peak (MiB)", "GFLOP/s", "latency ×DynUNet", "tensors ×DynUNet", "memory ×DynUNet",
        "FLOPs ×DynUNet", "GFLOP/s ×DynUNet",
    ]  # fmt: skip
    rows = [
        [
            side(r["size"]), r["net"], _fmt(r["params"] / 1e6), _fmt(r["flops"] / 1e9, 1), _fmt(r["latency_s"], 3),
            str(r["repeats"]), _fmt(r.get("tensor_mib"), 0), _fmt(r.get("forward_mib"), 0),
            _fmt(r.get("process_peak_mib"), 0), _fmt(r["gflops_per_s"], 1), _fmt(r.get("latency_s_ratio")),
            _fmt(r.get("tensor_mib_ratio")), _fmt(r.get("forward_mib_ratio")), _fmt(r.get("flops_ratio")),
            _fmt(r.get("gflops_per_s_ratio")),
        ]  # fmt: skip
        for r in results["forward"]
    ]
    return ["", "### Forward pass", "", *_table(header, rows)]


def _train(results: dict[str, Any], side: Callable[[int], str]) -> list[str]:
    batch = results["train"][0]["batch"]
    header = ["size", "network", "train step (s)", "images/s", "train step ×DynUNet", "images/s ×DynUNet"]
    rows = [
        [side(r["size"]), r["net"], _fmt(r["train_step_s"], 3), _fmt(r["images_per_s"], 3),
         _fmt(r.get("train_step_s_ratio")), _fmt(r.get("images_per_s_ratio"))]
        for r in results["train"]
    ]  # fmt: skip
    return ["", f"### Training step (forward + backward + SGD, batch {batch}; images/s = batch / step)", "",
            *_table(header, rows)]  # fmt: skip


def _infer(results: dict[str, Any]) -> list[str]:
    shape = "×".join(map(str, results["infer"][0]["shape"]))
    header = ["network", "wall (s)", "n", "voxels/s", "voxels/s ×BasicUNet", "after model load (s)",
              "peak memory (MiB)"]
    rows = [
        [r["net"], _fmt(r["wall_s"], 1), str(r["repeats"]), f"{r['voxels_per_s']:.3g}",
         _fmt(r.get("voxels_per_s_ratio")), _fmt(r["pipeline_s"], 1), _fmt(r["peak_rss_mib"], 0)]
        for r in results["infer"]
    ]  # fmt: skip
    title = (f"### usema infer ({shape} NIfTI, 2D model slice by slice, a fresh process per run; voxels/s = voxels / "
             "wall time; peak memory = the process's peak resident memory)")
    return ["", title, "", *_table(header, rows)]


def _scaling(results: dict[str, Any]) -> list[str]:
    rows = [
        [s["net"], _fmt(s["flop_slope"]), _fmt(s["latency_slope"]), _fmt(s.get("latency_slope_minus_reference"))]
        for s in results["scaling"]
    ]
    header = ["network", "FLOP slope", "latency slope", "latency slope − DynUNet's"]
    return ["", "### Scaling (log-log slope against pixel count; 1.00 = linear)", "", *_table(header, rows)]


def format_markdown(results: dict[str, Any]) -> str:
    """The results as markdown: the machine line, then forward, training-step, `usema infer` and scaling tables."""
    dims = results["config"]["spatial_dims"]
    side = lambda s: "×".join([str(s)] * dims)  # noqa: E731 - tiny local formatter
    lines = _header(results) + _forward(results, side)
    if results["train"]:
        lines += _train(results, side)
    if results.get("infer"):
        lines += _infer(results)
    if len(results["config"]["sizes"]) >= 2:
        lines += _scaling(results)
    return "\n".join(lines) + "\n"
