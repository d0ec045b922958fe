"""Forward time of each network with its weights channels-first (PyTorch's default) and channels-last, on CPU.

    python benchmarks/inference_layout.py [--threads 2] [--output benchmarks/results/inference_layout.md]

Backs ``USEMA.inference_memory_format`` (the layout `usema infer` converts a network to on CPU): for 2D at 256²
(batch 4, the pipeline's slice batch) and 1024² (batch 1), and 3D at 64³ and 128³ (batch 1), the median of
interleaved no-grad forwards of each network in both layouts, with usema's allocator settings, as the commands
run. Run it on a quiet machine (check `uptime`); the load average before the run is printed.
"""

from __future__ import annotations

import copy
import statistics

import torch

from usema.bench.networks import build_all, make_input
from usema.bench.timing import forward_step, interleaved_rounds

from report_output import print_and_write
from timed_run import start_timed_run

CASES = (  # (dims, side, batch, networks, rounds)
    (2, 256, 4, ("usema-tiny", "usema-base", "dynunet", "basicunet"), 5),
    (2, 1024, 1, ("usema-tiny", "usema-base", "dynunet"), 3),
    (3, 64, 1, ("usema-tiny", "usema-base", "dynunet"), 5),
    (3, 128, 1, ("usema-base", "dynunet"), 3),
)


def case_rows(dims: int, side: int, batch: int, nets: tuple[str, ...], rounds: int) -> list[str]:
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = make_input(dims, side, batch)
    steps = {}
    for name, model in build_all(nets, dims, side).items():
        steps[(name, "default")] = forward_step(model, x)
        steps[(name, "channels-last")] = forward_step(copy.deepcopy(model).to(memory_format=layout), x)
    interleaved_rounds(steps, 1)
    times = {key: statistics.median(samples) for key, samples in interleaved_rounds(steps, rounds).items()}
    shape = "×".join([str(side)] * dims)
    return [f"| {shape}, batch {batch} | {name} | {times[(name, 'default')]:.3f} | {times[(name, 'channels-last')]:.3f} "
            f"| {times[(name, 'channels-last')] / times[(name, 'default')]:.2f} |" for name in nets]


def main() -> None:
    args, load = start_timed_run(__doc__)
    lines = [f"Forward time by weight layout, torch {torch.__version__}, {args.threads} threads; load average before "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", "",
             "| input | network | default (s) | channels-last (s) | channels-last ÷ default |", "|---" * 5 + "|"]
    for case in CASES:
        lines += case_rows(*case)
        print("\n".join(lines[-len(case[3]):]), flush=True)
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
