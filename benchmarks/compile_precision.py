"""Compilation and precision: what `train.compile`, `usema infer --compile` and `--precision` cost and change.

    python benchmarks/compile_precision.py --workdir /tmp/usema_compile_precision [--run runs/demo_brain]
    python benchmarks/compile_precision.py --workdir /tmp/usema_compile_precision --skip-training --run RUN

(a) Training: `usema train demo_brain` (its default budget) in two fresh processes, eager and with
`--set train.compile=true`: wall time of each, and the compile overhead read from metrics.csv as the first
epoch's time minus the median of the later epochs (the first epoch holds the compilation), compiled minus eager.
(b) Inference: the held-out slices of `usema datasets export-demo brain --heldout-slices` segmented by RUN (default:
the eager run of (a)) with --precision fp32 and bf16, each eager and with --compile: wall time of `usema infer`
(a fresh process: start-up and model loading included), the seconds its summary line reports (after loading),
and the mean Dice of `usema evaluate --recipe demo_brain`, with the Dice change against fp32 of the same mode.

Prints markdown tables (and writes them to --markdown when given). Wall times: run it on a quiet machine and state
the load averages it prints with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from usema.io.files import atomic_write_text

_SUMMARY_SECONDS = re.compile(r"voxels in ([0-9.]+) s")


@dataclass
class Result:
    """One command's outcome: wall seconds, and its stdout, or the one-line error that stopped it."""

    wall_s: float
    stdout: str
    error: str | None = None


def usema(*args: str, threads: int | None = None) -> Result:
    """``usema ARGS`` in a fresh interpreter (imports and start-up are part of what a user waits for)."""
    extra = ["--threads", str(threads)] if threads is not None and args[0] in ("train", "infer") else []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "usema", *args, *extra], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    return Result(wall, proc.stdout, error)


def epoch_seconds(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [float(row["seconds"]) for row in csv.DictReader(fh)]


def last_mean_dice(run_dir: Path) -> float | None:
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row["mean_dice"]]
    return float(rows[-1]["mean_dice"]) if rows else None


def first_epoch_excess(seconds: list[float]) -> float | None:
    """The first epoch's time above the steady state (median of the later epochs); None with one epoch."""
    return seconds[0] - statistics.median(seconds[1:]) if len(seconds) > 1 else None


def train_row(name: str, run_dir: Path, extra: list[str], threads: int | None) -> dict:
    result = usema("train", "demo_brain", "--output", str(run_dir), "--overwrite", *extra, threads=threads)
    if result.error:
        return {"mode": name, "error": result.error, "wall_s": result.wall_s}
    seconds = epoch_seconds(run_dir)
    return {"mode": name, "wall_s": result.wall_s, "epoch1_s": seconds[0],
            "steady_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
            "excess_s": first_epoch_excess(seconds), "mean_dice": last_mean_dice(run_dir)}


def infer_row(run: Path, slices: Path, workdir: Path, precision: str, compiled: bool, args: argparse.Namespace) -> dict:
    name = precision + ("+compile" if compiled else "")
    pred, scores = workdir / f"pred_{name}", workdir / f"eval_{name}.json"
    flags = ["--precision", precision, "--device", args.device, *(["--compile"] if compiled else [])]
    result = usema("infer", str(run), "--input", str(slices / "imagesTs"), "--output", str(pred), "--overwrite",
                   "--no-progress", *flags, threads=args.threads)
    row = {"mode": name, "precision": precision, "compiled": compiled, "wall_s": result.wall_s}
    if result.error:
        return {**row, "error": result.error}
    found = _SUMMARY_SECONDS.search(result.stdout)
    row["infer_s"] = float(found.group(1)) if found else None
    evaluation = usema("evaluate", "--pred", str(pred), "--truth", str(slices / "labelsTs"), "--recipe", "demo_brain",
                       "--output", str(scores), "--overwrite")
    if evaluation.error:
        return {**row, "error": evaluation.error}
    return {**row, "mean_dice": json.loads(scores.read_text())["mean_dsc"]}


def _cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def training_table(rows: list[dict]) -> str:
    lines = ["| demo_brain training | wall (s) | epoch 1 (s) | later epochs, median (s) | epoch 1 excess (s) "
             "| last mean Dice |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {_cell(r['epoch1_s'])} | {_cell(r['steady_s'])} | "
                     f"{_cell(r['excess_s'])} | {_cell(r['mean_dice'], 4)} |")
    excess = [r.get("excess_s") for r in rows]
    if len(rows) == 2 and None not in excess:
        lines.append(f"\nCompile overhead (epoch 1 excess, compiled − eager): {excess[1] - excess[0]:.1f} s; "
                     f"wall time compiled − eager: {rows[1]['wall_s'] - rows[0]['wall_s']:+.1f} s")
    return "\n".join(lines)


def inference_table(rows: list[dict]) -> str:
    reference = {r["compiled"]: r.get("mean_dice") for r in rows if r["precision"] == "fp32"}
    lines = ["| usema infer | wall (s) | after loading (s) | mean Dice | Δ Dice vs fp32 (same mode) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | failed: {r['error']} | | |")
            continue
        base = reference.get(r["compiled"])
        delta = None if base is None or r["precision"] == "fp32" else r["mean_dice"] - base
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {_cell(r['infer_s'])} | {_cell(r['mean_dice'], 4)} | "
                     f"{'–' if delta is None else f'{delta:+.5f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usema_compile_precision"),
                        help="runs, exported slices, predictions and evaluations go here (reused with --overwrite)")
    parser.add_argument("--run", type=Path, help="trained demo_brain run for (b) (default: the eager run of (a))")
    parser.add_argument("--skip-training", action="store_true", help="only (b); needs --run")
    parser.add_argument("--device", default="cpu", help="device of `usema infer` (cpu or cuda)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                        help="--precision values to compare (fp32 first: the reference); fp16 needs cuda")
    parser.add_argument("--threads", type=int, help="--threads for usema train and infer (default: theirs)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    if args.skip_training and args.run is None:
        parser.error("--skip-training needs --run")
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    parts = []
    if not args.skip_training:
        rows = [train_row("eager", args.workdir / "train_eager", [], args.threads),
                train_row("train.compile=true", args.workdir / "train_compiled", ["--set", "train.compile=true"],
                          args.threads)]
        parts.append(training_table(rows))
    run = args.run or args.workdir / "train_eager"
    slices = args.workdir / "heldout"
    exported = usema("datasets", "export-demo", "brain", "--heldout-slices", "--output", str(slices), "--overwrite")
    if exported.error:
        raise SystemExit(f"export-demo: {exported.error}")
    rows = [infer_row(run, slices, args.workdir, precision, compiled, args)
            for compiled in (False, True) for precision in args.precisions]
    parts.append(inference_table(rows))
    parts.append(f"load average before {load_before}, after {os.getloadavg()}; {os.cpu_count()} CPUs; "
                 f"model {run}; device {args.device}")
    text = "\n\n".join(parts) + "\n"
    print(text, end="")
    if args.markdown:
        atomic_write_text(args.markdown, text)


if __name__ == "__main__":
    main()
