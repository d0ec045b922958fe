"""The benchmark results as markdown tables."""

from __future__ import annotations

import math
from typing import Any, Sequence

from usema.bench.settings import IN_CHANNELS, OUT_CHANNELS

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
