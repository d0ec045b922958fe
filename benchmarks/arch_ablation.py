"""Each choice of the current USEMA layout measured alone: the network with one choice undone at a time, its
options, and the layout of usema 0.1, against DynUNet in the same interleaved rounds.

    python benchmarks/arch_ablation.py --threads 2 --rounds 5 [--output benchmarks/results/arch_ablation.md]

The undone choices are rebuilt here from the older code (same widths and blocks; the older parameters where they
differed): `instance_norm` (nn.InstanceNorm modules instead of the equivalent one-group-per-channel GroupNorm: the
usema 0.2 network), `sema_channels_first` (the 0.1 SEMA block forward: channels-first CPE, six layout switches),
`strided_shortcut` (0.1's strided 1x1 conv instead of ResNet-D's average pool + 1x1), `concat_fusion` (0.1's
concatenation of the skip, fused 2C->C by a 1x1 conv, instead of adding). The options are USEMA's own
(`stem="residual"`, `decoder_block="conv"`); two more rows price the SEMA blocks: without any
(`sema_stages="none"`, the CNN alone) and with one block instead of two at the bottleneck (`sema_depth=(1, 1, 1)`).
The process is set up as the usema commands set it up (passive OpenMP waits, the allocator settings); forwards run
in `usema infer`'s layout and training steps in `usema train`'s (2D USEMA channels-last). Run on a quiet machine
(`uptime`); the load average is printed.
"""

from __future__ import annotations

from usema.threads import prefer_passive_waits

prefer_passive_waits()  # as the usema commands: before torch loads its OpenMP runtime

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402
from torch import nn  # noqa: E402

from usema.bench.networks import build_bench_network, make_input  # noqa: E402
from usema.bench.settings import IN_CHANNELS, OUT_CHANNELS  # noqa: E402
from usema.bench.timing import forward_step, interleaved_rounds, train_step  # noqa: E402
from usema.inference.model_loading import place_for_inference  # noqa: E402
from usema.nets import build_network  # noqa: E402
from usema.nets.sema import SEMABlock, sema_attention  # noqa: E402
from usema.nets.usema import USEMA, ResidualConvBlock  # noqa: E402

from report_output import print_and_write  # noqa: E402
from timed_run import start_timed_run  # noqa: E402


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


def instance_norm(net: USEMA) -> None:
    cls = nn.InstanceNorm2d if net.spatial_dims == 2 else nn.InstanceNorm3d
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                norm = cls(child.num_channels, eps=child.eps, affine=True)
                norm.load_state_dict(child.state_dict())
                setattr(module, name, norm)


def strided_shortcut(net: USEMA) -> None:
    for m in net.modules():
        if isinstance(m, ResidualConvBlock) and isinstance(m.shortcut, nn.Sequential) and len(m.shortcut) > 1:
            conv = m.shortcut[1]
            cls = nn.Conv2d if net.spatial_dims == 2 else nn.Conv3d
            m.shortcut = cls(conv.in_channels, conv.out_channels, 1, stride=2, bias=False)


def _merge_skip_01(self: USEMA, stage: int, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """usema 0.1's decoder input: concatenate [upsampled, skip] and fuse 2C->C with a 1x1 conv."""
    return self.fusion[stage](torch.cat([up, skip], dim=1))


def concat_fusion(net: USEMA) -> None:
    cls = nn.Conv2d if net.spatial_dims == 2 else nn.Conv3d
    net.fusion = nn.ModuleList(cls(2 * f, f, 1) for f in net.config.features[:-1])
    net.merge_skip = types.MethodType(_merge_skip_01, net)


# applied in this order (instance_norm last, so that it also reaches the modules the others add)
UNDO = {"sema_channels_first": sema_channels_first, "strided_shortcut": strided_shortcut,
        "concat_fusion": concat_fusion, "instance_norm": instance_norm}
# row label -> (USEMA options, undone choices)
VARIANTS: dict[str, tuple[dict[str, object], list[str]]] = {
    "current": ({}, []),
    "stem=residual (option)": ({"stem": "residual"}, []),
    "decoder_block=conv (option)": ({"decoder_block": "conv"}, []),
    "sema_depth=(1, 1, 1)": ({"sema_depth": (1, 1, 1)}, []),
    "sema_stages=none (no SEMA block)": ({"sema_stages": "none"}, []),
    "with nn.InstanceNorm = usema 0.2": ({}, ["instance_norm"]),
    "with 0.1's channels-first SEMA block": ({}, ["sema_channels_first"]),
    "with 0.1's strided 1×1 shortcuts": ({}, ["strided_shortcut"]),
    "with 0.1's concat + 1×1 fusion": ({}, ["concat_fusion"]),
    "usema 0.1": ({"stem": "residual"}, list(UNDO)),
}


def apply_undo(net: USEMA, undo: list[str]) -> None:
    for name, undo_one in UNDO.items():
        if name in undo:
            undo_one(net)


def variant(options: dict[str, object], undo: list[str]) -> nn.Module:
    torch.manual_seed(0)
    net = build_network("usema", 2, IN_CHANNELS, OUT_CHANNELS, preset="base", **options)
    apply_undo(net, undo)
    return net


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--forward-size", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=256)


def main() -> None:
    args, load = start_timed_run(__doc__, rounds=5, add_arguments=add_arguments)
    x = make_input(2, args.forward_size, 1)
    xs = make_input(2, args.train_size, 2)
    y = torch.randint(0, 4, (2, args.train_size, args.train_size), generator=torch.Generator().manual_seed(1))
    nets, steps = {}, {}
    for label, spec in [*VARIANTS.items(), ("DynUNet", None)]:
        build = (lambda: build_bench_network("dynunet", 2, 256)) if spec is None else (lambda v=spec: variant(*v))
        torch.manual_seed(0)
        nets[label] = build()
        steps[(label, "forward")] = forward_step(place_for_inference(nets[label], torch.device("cpu")), x)
        torch.manual_seed(0)  # a second instance: train_step leaves its network in training mode
        steps[(label, "train step")] = train_step(build(), xs, y)
    interleaved_rounds(steps, 1)  # warm-up
    samples = interleaved_rounds(steps, args.rounds)
    med = {label: {kind: statistics.median(samples[(label, kind)]) for kind in ("forward", "train step")}
           for label in nets}
    ref, new = med["DynUNet"], med["current"]
    lines = [f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, {args.rounds} "
             f"interleaved rounds after a warm-up, load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
             f"forward {args.forward_size}² batch 1, train step {args.train_size}² batch 2 (SGD)", "",
             "| network | params (M) | forward (s) | ×DynUNet | ×current | train step (s) | ×DynUNet | ×current |",
             "|---|---|---|---|---|---|---|---|"]
    for label, m in med.items():
        params = sum(p.numel() for p in nets[label].parameters()) / 1e6
        lines.append(f"| {label} | {params:.2f} | {m['forward']:.3f} | {m['forward'] / ref['forward']:.2f} | "
                     f"{m['forward'] / new['forward']:.2f} | {m['train step']:.3f} | "
                     f"{m['train step'] / ref['train step']:.2f} | {m['train step'] / new['train step']:.2f} |")
    print_and_write(lines, args.output)


if __name__ == "__main__":
    main()
