"""Forward time of the 2D tiny preset with its widths (16…128, usema 0.4) and its former ones (16…256), and of
MONAI's BasicUNet, on the slice batch `usema infer` runs: four 256² slices, channels-last for USEMA (as the
command runs it on CPU), 2 threads, usema's allocator settings, interleaved rounds.

    python benchmarks/tiny_widths.py [--rounds 10] [--output benchmarks/results/tiny_widths.md]

Backs the width cap of ``PRESETS[2]["tiny"]`` (docs/benchmarks.md, "Tiny's widths"); demo_brain's Dice for the two
widths comes from ``benchmarks/arch_accuracy.sh current former_tiny``. Run it on a quiet machine (`uptime`); the
load average before the run is printed.
"""

from __future__ import annotations

import statistics

import torch
from monai.networks.nets import BasicUNet

from usema.bench.timing import forward_step, interleaved_rounds
from usema.inference.model_loading import place_for_inference
from usema.nets import USEMA
from usema.run.spec import FORMER_PRESET_FEATURES

from report_output import print_and_write
from timed_run import start_timed_run

BATCH, SIDE, CLASSES = 4, 256, 4


def networks() -> dict[str, torch.nn.Module]:
    """The three networks in the layout `usema infer` gives them on the CPU (channels-last for 2D USEMA)."""
    former = FORMER_PRESET_FEATURES[(2, "tiny")]
    nets = {
        "usema-tiny (16…128)": USEMA(2, 1, CLASSES, "tiny", deep_supervision=False),
        "usema-tiny, former widths (16…256)": USEMA(2, 1, CLASSES, "tiny", deep_supervision=False, features=former),
        "basicunet": BasicUNet(2, 1, CLASSES),
    }
    return {name: place_for_inference(net, torch.device("cpu")) for name, net in nets.items()}


def main() -> None:
    args, load = start_timed_run(__doc__, rounds=10)
    x = torch.randn(BATCH, 1, SIDE, SIDE)
    nets = networks()
    steps = {name: forward_step(net, x) for name, net in nets.items()}  # one channel: x is channels-last as well
    interleaved_rounds(steps, 2)
    times = {name: statistics.median(s) for name, s in interleaved_rounds(steps, args.rounds).items()}
    basic = times["basicunet"]
    lines = [f"Forward of {BATCH} slices {SIDE}², torch {torch.__version__}, {args.threads} threads, median of "
             f"{args.rounds} interleaved rounds; load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", "",
             "| network | params (M) | forward (s) | BasicUNet ÷ this |", "|---" * 4 + "|"]
    lines += [f"| {name} | {sum(p.numel() for p in nets[name].parameters()) / 1e6:.2f} | {t:.3f} | {basic / t:.2f} |"
              for name, t in times.items()]
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
