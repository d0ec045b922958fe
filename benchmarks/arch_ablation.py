"""Each change of the usema 0.2 USEMA layout measured alone: the 0.2 network with one change undone at a time,
and the 0.1 layout with all of them undone, against DynUNet in the same interleaved rounds.

    python benchmarks/arch_ablation.py --threads 2 --rounds 5 [--output benchmarks/results/arch_ablation.md]

The undone changes are rebuilt here from the 0.1 code (same widths and blocks; the 0.1 parameters where they
differed): `sema_channels_first` (the 0.1 SEMA block forward: channels-first CPE, six layout switches), `residual_stem`
(the 1->C residual block with a 1x1 shortcut instead of the plain stem), `strided_shortcut` (a strided 1x1 conv
instead of ResNet-D's average pool + 1x1), `concat_fusion` (concatenate the skip and fuse 2C->C with a 1x1 conv
instead of adding). Run on a quiet machine (`uptime`); the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import types

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from usema.bench.networks import build_bench_network, make_input
from usema.bench.timing import forward_step, interleaved_rounds, train_step
from usema.io.files import atomic_write_text
from usema.nets.sema import SEMABlock, sema_attention
from usema.nets.usema import USEMA, ConvStem, ResidualConvBlock


def _sema_forward_01(self: SEMABlock, x: torch.Tensor) -> torch.Tensor:
    """usema 0.1's SEMA block forward (the same function, channels-first CPE and per-step layout switches)."""
    last = lambda t: rearrange(t, "b c ... -> b ... c")  # noqa: E731
    first = lambda t: rearrange(t, "b ... c -> b c ...")  # noqa: E731
    x = x + self.cpe1(x)
    tokens = last(x)
    h = self.norm1(tokens)
    gate = F.silu(self.gate(h))
    h = F.silu(last(self.dwconv(first(self.in_proj(h)))))
    q, k, v = rearrange(self.attn.qkv(h), "b ... (three h d) -> three b h ... d", three=3, h=self.attn.num_heads)
    out = sema_attention(q, k, v, self.attn.window_size) + last(self.attn.lepe(rearrange(v, "b h ... d -> b (h d) ...")))
    tokens = tokens + self.out_proj(out * gate)
    x = first(tokens)
    x = x + self.cpe2(x)
    tokens = last(x)
    return first(tokens + self.mlp(self.norm2(tokens)))


def sema_channels_first(net: USEMA) -> None:
    for m in net.modules():
        if isinstance(m, SEMABlock):
            m.forward = types.MethodType(_sema_forward_01, m)


class _ResidualStem01(ResidualConvBlock):
    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__(dims, cin, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if dims == 2 else nn.Conv3d(cin, cout, 1, bias=False)


def residual_stem(net: USEMA) -> None:
    stem = net.encoder[0][0]
    assert isinstance(stem, ConvStem)
    net.encoder[0][0] = _ResidualStem01(net.spatial_dims, stem.conv1.in_channels, stem.conv1.out_channels)


def strided_shortcut(net: USEMA) -> None:
    for m in net.modules():
        if isinstance(m, ResidualConvBlock) and isinstance(m.shortcut, nn.Sequential) and len(m.shortcut) == 2:
            conv = m.shortcut[1]
            cls = nn.Conv2d if net.spatial_dims == 2 else nn.Conv3d
            m.shortcut = cls(conv.in_channels, conv.out_channels, 1, stride=2, bias=False)


def _usema_forward_01(self: USEMA, x: torch.Tensor) -> torch.Tensor:
    """usema 0.1's decoder: concatenate [upsampled, skip], fuse 2C->C with a 1x1 conv, then the blocks."""
    skips = []
    for stage in self.encoder:
        x = stage(x)
        skips.append(x)
    x = skips.pop()
    for i in reversed(range(len(self.decoder))):
        x = self.decoder[i](self.fusion[i](torch.cat([self.upsample[i](x), skips.pop()], dim=1)))
    return self.heads[0](x)


def concat_fusion(net: USEMA) -> None:
    cls = nn.Conv2d if net.spatial_dims == 2 else nn.Conv3d
    net.fusion = nn.ModuleList(cls(2 * f, f, 1) for f in net.config.features[:-1])
    net.forward = types.MethodType(_usema_forward_01, net)


UNDO = {"sema_channels_first": sema_channels_first, "residual_stem": residual_stem,
        "strided_shortcut": strided_shortcut, "concat_fusion": concat_fusion}
LABELS = {"sema_channels_first": "0.1's channels-first SEMA block", "residual_stem": "0.1's residual stem",
          "strided_shortcut": "0.1's strided 1×1 shortcuts", "concat_fusion": "0.1's concat + 1×1 fusion"}


def variant(undo: list[str]) -> nn.Module:
    torch.manual_seed(0)
    net = build_bench_network("usema-base", 2, 256)
    for name in undo:
        UNDO[name](net)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forward-size", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    rows = {"usema 0.2 (all changes)": [], **{f"0.2 with {LABELS[k]}": [k] for k in UNDO},
            "usema 0.1 (none of them)": list(UNDO)}
    x = make_input(2, args.forward_size, 1)
    xs = make_input(2, args.train_size, 2)
    y = torch.randint(0, 4, (2, args.train_size, args.train_size), generator=torch.Generator().manual_seed(1))
    nets, steps = {}, {}
    for label, undo in [*rows.items(), ("DynUNet", None)]:
        build = (lambda: build_bench_network("dynunet", 2, 256)) if undo is None else (lambda u=undo: variant(u))
        torch.manual_seed(0)
        nets[label] = build()
        steps[(label, "forward")] = forward_step(nets[label], x)
        torch.manual_seed(0)  # a second instance: train_step leaves its network in training mode
        steps[(label, "train step")] = train_step(build(), xs, y)
    interleaved_rounds(steps, 1)  # warm-up
    samples = interleaved_rounds(steps, args.rounds)
    med = {label: {kind: statistics.median(samples[(label, kind)]) for kind in ("forward", "train step")}
           for label in nets}
    ref, new = med["DynUNet"], med["usema 0.2 (all changes)"]
    lines = [f"{args.threads} threads, {args.rounds} interleaved rounds after a warm-up, load average before "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; forward {args.forward_size}² batch 1, train step "
             f"{args.train_size}² batch 2 (SGD)", "",
             "| network | params (M) | forward (s) | ×DynUNet | ×0.2 | train step (s) | ×DynUNet | ×0.2 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in med.items():
        params = sum(p.numel() for p in nets[label].parameters()) / 1e6
        lines.append(f"| {label} | {params:.2f} | {m['forward']:.3f} | {m['forward'] / ref['forward']:.2f} | "
                     f"{m['forward'] / new['forward']:.2f} | {m['train step']:.3f} | "
                     f"{m['train step'] / ref['train step']:.2f} | {m['train step'] / new['train step']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        atomic_write_text(args.output, text)


if __name__ == "__main__":
    main()
