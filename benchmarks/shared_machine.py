"""How much slower does a usema demo epoch get while another usema process runs inference beside it?

    python benchmarks/shared_machine.py --workdir /tmp/usema_shared [--epochs 2]

Fair sharing of the machine's cores between two busy processes costs 2x; more than that is waste: OpenMP
threads spinning at barriers while their peer thread is descheduled. For each OpenMP wait policy (`default`:
usema's, PASSIVE; ACTIVE, which always spins; spin=N, the runtime's own policy with its spin count set), this
trains demo_brain alone and then with a loop of 2-thread `usema infer` runs on the brain volume beside it, and
reports the mean epoch time (the trainer's own per-epoch figure, validation included) and the slowdown factor. Run it on a quiet machine
(check `uptime`); the load average before each phase is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

EPOCH = re.compile(r"^epoch \d+/\d+ .* ([0-9.]+)s$", re.M)


def usema(*args: str, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "usema", *args], env=env, **kwargs)


def train_epochs(workdir: Path, epochs: int, env: dict[str, str]) -> list[float]:
    out = workdir / "train"
    proc = usema("train", "demo_brain", "--output", str(out), "--overwrite", "--set", f"train.epochs={epochs}",
                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"training failed:\n{log[-2000:]}")
    return [float(s) for s in EPOCH.findall(log)]


def with_neighbour(workdir: Path, epochs: int, env: dict[str, str], model: Path, volume: Path) -> tuple[list[float], int]:
    """Epoch times while `usema infer` (2 threads) runs again and again beside the training."""
    stop = workdir / "stop"
    stop.unlink(missing_ok=True)
    loop = (f"n=0; while [ ! -e {stop} ]; do {sys.executable} -m usema infer {model} --input {volume} "
            f"--output {workdir / 'pred'} --overwrite --no-progress --threads 2 >/dev/null 2>&1; n=$((n+1)); done; "
            f"echo $n")
    neighbour = subprocess.Popen(["bash", "-c", loop], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(5)  # the neighbour is past its imports and predicting
    try:
        times = train_epochs(workdir, epochs, env)
    finally:
        stop.touch()
        runs = int(neighbour.communicate()[0].strip() or 0)
    return times, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/usema_shared"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["default", "ACTIVE"],
                        help="default (usema's), ACTIVE, PASSIVE, or spin=N (GOMP_SPINCOUNT=N, OMP_WAIT_POLICY unset; "
                        "spin=300000 is the OpenMP runtime's own default)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    data = args.workdir / "brain"
    if not (data / "imagesTs").is_dir():
        subprocess.run([sys.executable, "-m", "usema", "datasets", "export-demo", "brain", "--output", str(data)],
                       check=True, env=base_env, stdout=subprocess.DEVNULL)
    model = args.workdir / "model"
    if not (model / "checkpoints" / "last.pt").is_file():
        subprocess.run([sys.executable, "-m", "usema", "train", "demo_brain", "--output", str(model), "--overwrite",
                        "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=2"],
                       check=True, env=base_env, stdout=subprocess.DEVNULL)
    print("| OpenMP wait policy | epoch alone (s) | epoch beside `usema infer` (s) | slowdown | infer runs | load before |")
    print("|---|---|---|---|---|---|")
    for policy in args.policies:
        env = dict(base_env)
        if policy.startswith("spin="):
            env["GOMP_SPINCOUNT"] = policy.removeprefix("spin=")
        elif policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        load = os.getloadavg()[0]
        alone = train_epochs(args.workdir, args.epochs, env)
        shared, runs = with_neighbour(args.workdir, args.epochs, env, model, data / "imagesTs")
        a, s = statistics.mean(alone), statistics.mean(shared)
        print(f"| {policy} | {a:.1f} | {s:.1f} | {s / a:.2f}x | {runs} | {load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
