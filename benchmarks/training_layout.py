"""Training-step time of 2D USEMA channels-first, channels-last with PyTorch's group-norm backward, and
channels-last with usema's instance-norm backward (what `usema train` runs on CPU), against DynUNet.

    python benchmarks/training_layout.py [--threads 2] [--rounds 5] [--output benchmarks/results/training_layout.md]

Backs ``USEMA.training_memory_format`` and ``usema.nets.norm.InstanceNorm``: forward + cross-entropy + backward +
SGD step (``usema.bench.timing.train_step``, as `usema bench`) at 256² and 512², batch 2 (the issue's sizes), and
at the demos' 128², batch 8, interleaved rounds after a warm-up, with the allocator settings and the passive
OpenMP waits of the usema commands. "PyTorch's backward" swaps each ``InstanceNorm`` for the ``nn.GroupNorm`` it
derives from (the same parameters and forward). Run it on a quiet machine (check `uptime`).
"""

from __future__ import annotations

from usema.threads import prefer_passive_waits

prefer_passive_waits()  # as the usema commands: before torch loads its OpenMP runtime

import copy  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from usema.bench.networks import build_all, make_input  # noqa: E402
from usema.bench.timing import interleaved_rounds, train_step  # noqa: E402
from usema.nets.norm import InstanceNorm  # noqa: E402

from report_output import print_and_write  # noqa: E402
from timed_run import start_timed_run  # noqa: E402

CASES = (  # (side, batch, networks, rounds divisor)
    (128, 8, ("usema-tiny",), 1),
    (256, 2, ("usema-tiny", "usema-base", "dynunet"), 1),
    (512, 2, ("usema-base", "dynunet"), 2),
)
VARIANTS = ("channels-first", "channels-last, PyTorch's backward", "channels-last, usema's backward")


def with_group_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``InstanceNorm`` modules are plain ``nn.GroupNorm`` with the same parameters."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InstanceNorm):
                plain = nn.GroupNorm(child.num_groups, child.num_channels, child.eps)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return model


def variant_steps(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    if not name.startswith("usema"):
        return {(name, "default"): train_step(model, x, target)}
    cl = torch.channels_last
    return {
        (name, VARIANTS[0]): train_step(copy.deepcopy(model), x, target, memory_format=torch.contiguous_format),
        (name, VARIANTS[1]): train_step(with_group_norms(model), x, target, memory_format=cl),
        (name, VARIANTS[2]): train_step(model, x, target),
    }


def case_rows(side: int, batch: int, nets: tuple[str, ...], rounds: int) -> list[str]:
    x = make_input(2, side, batch)
    target = torch.randint(0, 4, (batch, side, side), generator=torch.Generator().manual_seed(1))
    steps = {}
    for name, model in build_all(nets, 2, side).items():
        steps.update(variant_steps(name, model, x, target))
    interleaved_rounds(steps, 1)
    times = {key: statistics.median(samples) for key, samples in interleaved_rounds(steps, rounds).items()}
    reference = times.get(("dynunet", "default"))
    rows = []
    for (name, variant), seconds in times.items():
        ratio = f"{seconds / reference:.2f}" if reference else "–"
        own = seconds / times[(name, VARIANTS[0])] if (name, VARIANTS[0]) in times else 1.0
        rows.append(f"| {side}², batch {batch} | {name} | {variant} | {seconds:.3f} | {own:.2f} | {ratio} |")
    return rows


def main() -> None:
    args, load = start_timed_run(__doc__, rounds=5)
    lines = [f"Training step by layout, torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, {args.rounds} interleaved rounds (512²: half); load "
             f"average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", "",
             "| input | network | layout | train step (s) | ÷ channels-first | ÷ DynUNet |", "|---" * 6 + "|"]
    for side, batch, nets, divisor in CASES:
        rows = case_rows(side, batch, nets, max(1, args.rounds // divisor))
        lines += rows
        print("\n".join(rows), flush=True)
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
