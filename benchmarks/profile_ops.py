"""Per-operator time of usema vs DynUNet (torch.profiler, CPU): where does a forward / training step go?

    python benchmarks/profile_ops.py --threads 2 --output benchmarks/results/profile.md

Profiles, for each network, a training step (forward + backward + SGD) at 256² batch 2 and a forward pass at
1024² batch 1, after one warm-up, and prints the operators that take the most self CPU time, grouped into
kinds (convolution, matmul/linear, normalisation, attention, elementwise, layout copies, ...). Run it on a quiet
machine (check `uptime`): the shares are what matter, but heavy foreign load skews them.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from usema.bench.networks import build_bench_network, make_input
from usema.bench.timing import forward_step, train_step

from report_output import print_and_write

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


def profiled(fn) -> list[tuple[str, float, int]]:
    fn()  # warm-up: first-call allocations and oneDNN primitive creation are not the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]


def train_case(net: torch.nn.Module, size: int, batch: int):
    y = torch.randint(0, 4, (batch, size, size), generator=torch.Generator().manual_seed(1))
    return train_step(net, make_input(2, size, batch), y)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["usema-base", "dynunet"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--output", help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    out = [f"Profile: torch {torch.__version__}, {args.threads} threads, load average before "
           f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}", ""]
    cases = (("Training step 256², batch 2 (forward + backward + SGD)", 256, lambda n: train_case(n, 256, 2)),
             ("Forward 1024², batch 1", 1024, lambda n: forward_step(n, make_input(2, 1024, 1))))
    for title, size, make in cases:
        rows = {}
        for name in args.nets:
            torch.manual_seed(0)
            rows[name] = profiled(make(build_bench_network(name, 2, size)))
        out += [f"### {title}", "", *table(rows, args.top), ""]
    print_and_write(out, args.output)


if __name__ == "__main__":
    main()
