"""What glibc's allocator settings (usema/allocator.py) change in the time of `usema infer` and `usema train`.

    python benchmarks/allocator.py --workdir /tmp/usema_alloc [--rounds 2] [--output benchmarks/results/allocator.md]

Every run is a fresh `python -m usema` process, as a user starts it: `usema infer` of random-weight 2D checkpoints
(usema-tiny, usema-base, DynUNet, BasicUNet) on a synthetic 256×256×200 NIfTI, one window per slice, and two
epochs of `usema train demo_brain`. Each command runs with usema's allocator settings (`retained`) and with
glibc's defaults (`glibc default`: an empty GLIBC_TUNABLES, which usema leaves alone), alternately. Reported:
median wall seconds, system CPU seconds and minor page faults of the process. Run it on a quiet machine (check
`uptime`); the load average before the run is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from usema.allocator import USER_SETTINGS
from usema.bench.infer import write_checkpoint, write_volume

from report_output import print_and_write

NETS = ("usema-tiny", "usema-base", "dynunet", "basicunet")
SHAPE = (256, 256, 200)
MODES = {"retained": {}, "glibc default": {"GLIBC_TUNABLES": ""}}
EPOCH = re.compile(r"^epoch \d+/\d+ .* ([0-9.]+)s$", re.M)


def timed(args: list[str], extra_env: dict[str, str]) -> dict[str, float | str]:
    """Wall seconds, system seconds and minor page faults of one `python -m usema` process, and its output."""
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS} | extra_env
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "usema", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"usema {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return {"wall": wall, "sys": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt,
            "log": done.stdout + done.stderr}


def median_row(label: str, runs: dict[str, list[dict]], key: str = "wall") -> str:
    cells = []
    for mode in MODES:
        m = {k: statistics.median(float(r[k]) for r in runs[mode]) for k in (key, "sys", "faults")}
        cells.append(f"{m[key]:.1f} | {m['sys']:.1f} | {m['faults'] / 1e6:.2f}")
    ratio = statistics.median(float(r[key]) for r in runs["retained"]) / statistics.median(
        float(r[key]) for r in runs["glibc default"])
    return f"| {label} | {' | '.join(cells)} | {ratio:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    volume = write_volume(args.workdir / "volume.nii.gz", SHAPE)
    checkpoints = {net: write_checkpoint(net, SHAPE[:2], args.workdir / f"{net}.pt") for net in NETS}
    load = os.getloadavg()
    lines = [f"Allocator settings, fresh `python -m usema` processes, {args.threads} threads, {args.rounds} round(s); "
             f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", "",
             "| command | retained: wall (s) | sys (s) | page faults (M) | glibc default: wall (s) | sys (s) "
             "| page faults (M) | wall retained ÷ default |", "|---" * 8 + "|"]
    for net, ckpt in checkpoints.items():
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode, env in MODES.items():
                runs[mode].append(timed(["infer", str(ckpt), "--input", str(volume), "--output",
                                         str(args.workdir / "pred"), "--overwrite", "--no-progress", "--threads",
                                         str(args.threads)], env))
        lines.append(median_row(f"`usema infer` {'×'.join(map(str, SHAPE))}, {net}", runs))
        print(lines[-1], flush=True)
    if not args.no_train:
        runs = {mode: [] for mode in MODES}
        for mode, env in MODES.items():
            run = timed(["train", "demo_brain", "--output", str(args.workdir / "train"), "--overwrite", "--threads",
                         str(args.threads), "--set", "train.epochs=2"], env)
            run["epoch"] = statistics.mean(float(s) for s in EPOCH.findall(str(run["log"])))
            runs[mode].append(run)
        lines.append(median_row("`usema train demo_brain`, 2 epochs (mean epoch s)", runs, key="epoch"))
        print(lines[-1], flush=True)
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
