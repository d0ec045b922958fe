"""Training-step time in float32 and under bfloat16 autocast on the CPU (``train.precision: bf16``).

    python benchmarks/train_precision.py [--threads 2] [--output benchmarks/results/train_precision.md]

Forward + cross-entropy + backward + SGD step at 256², batch 2, for usema-tiny, usema-base and DynUNet, both
precisions of every network timed in interleaved rounds after a warm-up, with usema's allocator settings as the
commands run. bf16 needs a processor with native bfloat16 kernels (AVX512-BF16 or AMX); elsewhere autocast would
emulate them and the script stops. Run it on a quiet machine (check `uptime`); the load before it is printed.
"""

from __future__ import annotations

import statistics

import torch

from usema.bench.networks import build_bench_network, make_input
from usema.bench.timing import interleaved_rounds, train_step
from usema.inference.precision import cpu_supports_bf16

from report_output import print_and_write
from timed_run import start_timed_run

NETS = ("usema-tiny", "usema-base", "dynunet")
SIDE, BATCH, CLASSES = 256, 2, 4


def main() -> None:
    args, load = start_timed_run(__doc__, rounds=5)
    if not cpu_supports_bf16():
        raise SystemExit("this processor has no native bfloat16 kernels (AVX512-BF16 or AMX)")
    x = make_input(2, SIDE, BATCH)
    target = torch.randint(0, CLASSES, (BATCH, SIDE, SIDE), generator=torch.Generator().manual_seed(0))
    steps = {(net, dtype): train_step(build_bench_network(net, 2, SIDE), x, target, dtype)
             for net in NETS for dtype in (None, torch.bfloat16)}
    interleaved_rounds(steps, 1)
    times = {key: statistics.median(samples) for key, samples in interleaved_rounds(steps, args.rounds).items()}
    lines = [f"Training step {SIDE}², batch {BATCH}, fp32 vs bf16 autocast, torch {torch.__version__}, {args.threads} "
             f"threads, {args.rounds} rounds; load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", "",
             "| network | fp32 step (s) | bf16 step (s) | bf16 ÷ fp32 |", "|---" * 4 + "|"]
    lines += [f"| {net} | {times[(net, None)]:.3f} | {times[(net, torch.bfloat16)]:.3f} | "
              f"{times[(net, torch.bfloat16)] / times[(net, None)]:.2f} |" for net in NETS]
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
