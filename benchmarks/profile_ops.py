"""Per-operator time of usema vs DynUNet (torch.profiler, CPU): where does a forward / training step go?

    python benchmarks/profile_ops.py --threads 2 --output benchmarks/results/profile.md

Profiles, for each network, a training step (forward + backward + SGD) at 256² batch 2 and a forward pass at
1024² batch 1, after one warm-up, averaged over --steps calls (default 3), and prints the operators that take the
most self CPU time, grouped into kinds (convolution, matmul/linear, normalisation, attention, elementwise, layout
copies, ...); then each SEMA block of usema-base alone, at the shape it sees in the training step. The process is set
up as the usema commands set it up (passive OpenMP waits, the allocator settings), the training step runs in
`usema train`'s layout and the forward in `usema infer`'s (2D USEMA channels-last). Run it on a quiet machine
(check `uptime`): the shares are what matter, but heavy foreign load skews them.
"""

from __future__ import annotations

from usema.threads import prefer_passive_waits

prefer_passive_waits()  # as the usema commands: before torch loads its OpenMP runtime

import argparse  # noqa: E402
import os  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from usema.bench.networks import build_bench_network, make_input  # noqa: E402
from usema.bench.timing import forward_step, train_step  # noqa: E402
from usema.inference.model_loading import place_for_inference  # noqa: E402
from usema.nets.sema import SEMABlock  # noqa: E402
from usema.nets.usema import USEMA  # noqa: E402

from report_output import print_and_write  # noqa: E402
from timed_run import start_timed_run  # noqa: E402

KINDS = {
    "convolution": ("conv", "mkldnn_convolution", "thnn_conv", "slow_conv", "convolution_backward"),
    "matmul / linear": ("addmm", "mm", "bmm", "matmul", "linear"),
    "normalisation": ("norm", "batch_norm", "layer_norm", "native_layer_norm", "instance_norm"),
    "attention": ("scaled_dot_product", "flash_attention", "_softmax", "softmax"),
    "layout copies": ("copy_", "clone", "contiguous", "permute", "transpose", "_to_copy", "cat", "constant_pad",
                      "upsample", "_unsafe_view", "view", "reshape", "expand"),
    "activations": ("leaky_relu", "gelu", "silu", "relu"),
    "elementwise / reduce": ("add", "mul", "sum", "mean", "div", "sub", "fill_", "zero_", "threshold", "where"),
}


def kind(name: str) -> str:
    op = name.removeprefix("aten::")
    for label, keys in KINDS.items():
        if any(op == k or op.startswith(k) or k in op for k in keys):
            return label
    return "other"


def profiled(fn, steps: int) -> list[tuple[str, float, int]]:
    """(operator, self CPU seconds per call of ``fn``, calls per call of ``fn``), averaged over ``steps`` profiled
    calls: one profiled step moves by 10-30% per operator on this machine."""
    fn()  # warm-up: first-call allocations and oneDNN primitive creation are not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return [(e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps)
            for e in prof.key_averages() if e.key.startswith("aten::")]


def train_case(net: torch.nn.Module, size: int, batch: int):
    y = torch.randint(0, 4, (batch, size, size), generator=torch.Generator().manual_seed(1))
    return train_step(net, make_input(2, size, batch), y)


def sema_block_rows(size: int, batch: int, steps: int) -> list[str]:
    """Forward + backward of each SEMA block of usema-base alone, at the shape it sees for ``size``² inputs of
    ``batch``, channels-last: profiled self time, and the part of it in the linear layers (GEMMs)."""
    torch.manual_seed(0)
    net = USEMA(2, 1, 4, "base", deep_supervision=False)
    lines = ["| block | input (B, C, H, W) | self CPU (ms) | linear layers (ms) | rest (ms) |", "|---|---|---|---|---|"]
    for stage, layers in enumerate(net.encoder):
        side = size // 2**stage
        for index, block in enumerate(m for m in layers.modules() if isinstance(m, SEMABlock)):
            width = block.norm1.normalized_shape[0]
            x = torch.randn(batch, width, side, side).contiguous(memory_format=torch.channels_last).requires_grad_()
            block.to(memory_format=torch.channels_last)
            rows = profiled(lambda b=block, t=x: b(t).sum().backward(), steps)
            total = sum(t for _, t, _ in rows)
            linear = sum(t for name, t, _ in rows if kind(name) == "matmul / linear")
            lines.append(f"| stage {stage} block {index} | ({batch}, {width}, {side}, {side}) | {total * 1e3:.1f} | "
                         f"{linear * 1e3:.1f} | {(total - linear) * 1e3:.1f} |")
    return lines


def inference_placed(net: torch.nn.Module) -> torch.nn.Module:
    return place_for_inference(net.eval(), torch.device("cpu"))


def table(rows: dict[str, list[tuple[str, float, int]]], top: int) -> list[str]:
    nets = list(rows)
    totals = {n: sum(t for _, t, _ in rows[n]) for n in nets}
    lines = ["| kind | " + " | ".join(f"{n} (s)" for n in nets) + " | " + " | ".join(f"{n} share" for n in nets) + " |",
             "|---" * (1 + 2 * len(nets)) + "|"]
    by_kind = {n: defaultdict(float) for n in nets}
    for n in nets:
        for name, t, _ in rows[n]:
            by_kind[n][kind(name)] += t
    kinds = sorted({k for n in nets for k in by_kind[n]}, key=lambda k: -by_kind[nets[0]][k])
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(f"{by_kind[n][k]:.3f}" for n in nets) + " | "
                     + " | ".join(f"{by_kind[n][k] / totals[n]:.0%}" for n in nets) + " |")
    lines.append("| **total (self CPU)** | " + " | ".join(f"**{totals[n]:.3f}**" for n in nets) + " |" + " |" * len(nets))
    lines += ["", "Top operators (self CPU seconds, calls):", ""]
    for n in nets:
        ops = sorted(rows[n], key=lambda r: -r[1])[:top]
        lines.append(f"- {n}: " + "; ".join(f"`{name.removeprefix('aten::')}` {t:.3f} ({c})" for name, t, c in ops))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nets", nargs="+", default=["usema-base", "dynunet"])
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="profiled calls per case, averaged (default 3)")


def main() -> None:
    args, load = start_timed_run(__doc__, add_arguments=add_arguments)
    out = [f"Profile: torch {torch.__version__}, {args.threads} threads, mean of {args.steps} profiled calls, "
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average before "
           f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", ""]
    cases = (("Training step 256², batch 2 (forward + backward + SGD)", 256, lambda n: train_case(n, 256, 2)),
             ("Forward 1024², batch 1", 1024, lambda n: forward_step(inference_placed(n), make_input(2, 1024, 1))))
    for title, size, make in cases:
        rows = {}
        for name in args.nets:
            torch.manual_seed(0)
            rows[name] = profiled(make(build_bench_network(name, 2, size)), args.steps)
        out += [f"### {title}", "", *table(rows, args.top), ""]
    out += ["### usema-base's SEMA blocks alone, 256², batch 2 (forward + backward)", "",
            *sema_block_rows(256, 2, args.steps), ""]
    print_and_write(out, args.output)


if __name__ == "__main__":
    main()
