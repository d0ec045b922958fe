"""Accuracy of the current USEMA layout with one of its choices undone: runs any `usema` command (normally `train`)
with every USEMA the command builds rebuilt by arch_ablation's undo functions.

    python benchmarks/arch_accuracy.py --undo instance_norm concat_fusion -- train demo_brain --set train.seed=1 \\
        --output /tmp/acc/concat_fusion_s1 --threads 1

`--undo` takes one or more of arch_ablation.UNDO's names, or none for the current network. USEMA's own options
(`--set model.overrides.stem=residual`, ...) need no script. The best validation Dice of each run is in its
metrics.csv; benchmarks/arch_accuracy.sh runs the seeds and prints the table. A run with `concat_fusion` undone
holds tensors `usema infer` cannot place (that layout is not a USEMA option); `instance_norm` alone holds the
same tensors as the current network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import usema.nets  # noqa: E402
from arch_ablation import UNDO, apply_undo  # noqa: E402
from usema.cli import main as usema_main  # noqa: E402
from usema.nets.usema import USEMA  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--undo", nargs="*", default=[], choices=sorted(UNDO))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the usema command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    build = usema.nets.build_network

    def build_undone(*a: object, **kw: object):
        net = build(*a, **kw)
        if isinstance(net, USEMA):
            apply_undo(net, args.undo)
        return net

    usema.nets.build_network = build_undone  # the run spec imports it from usema.nets at build time
    return usema_main(command)


if __name__ == "__main__":
    raise SystemExit(main())
