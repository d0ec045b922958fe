"""`usema bench`: options, output files, and the run (measurement modules are imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from usema.bench.settings import DEFAULT_NETS, DEFAULT_SIZES, DEFAULT_TRAIN_SIZE, QUICK_SIZE, BenchConfig, parse_net
from usema.errors import UsemaError
from usema.threads import usable_cpus
from usema.io.files import atomic_write_text, ensure_writable_dir, refuse_existing

def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    dims = args.dims
    quick = args.quick
    sizes = tuple(args.sizes) if args.sizes else ((QUICK_SIZE[dims],) if quick else DEFAULT_SIZES[dims])
    nets = tuple(args.nets) if args.nets else DEFAULT_NETS[dims]
    for name in nets:
        parse_net(name)
    if len(set(nets)) != len(nets):
        raise UsemaError(f"--nets: each network once, got {list(nets)}")
    if not args.no_memory and not os.path.exists("/proc/self/status"):
        raise UsemaError("--no-memory: peak memory is read from Linux /proc; pass --no-memory on this system")
    repeats = args.repeats or (1 if quick else 5)
    train_size = args.train_size or (min(sizes) if quick else DEFAULT_TRAIN_SIZE[dims])
    return BenchConfig(
        spatial_dims=dims,
        sizes=sizes,
        nets=nets,
        repeats=repeats,
        largest_repeats=args.largest_repeats,
        train_size=train_size,
        train_batch=args.train_batch,
        train_repeats=0 if args.no_train else repeats,
        threads=args.threads or usable_cpus(),
        memory=not args.no_memory,
    )


def _outputs(path: str | None, overwrite: bool) -> tuple[Path, Path] | None:
    if path is None:
        return None
    md = Path(path)
    if md.suffix != ".md":
        raise UsemaError(f"--output: a .md file expected, got {path}")
    ensure_writable_dir(md.parent, "--output directory")  # fail now, not after the measurements
    js = md.with_suffix(".json")
    refuse_existing([md, js], overwrite, "benchmark report")
    return md, js


def run(args: argparse.Namespace) -> int:
    """`usema bench`: run the benchmark, print the markdown table, optionally write FILE.md and FILE.json."""
    from usema.bench.harness import log, run_benchmark  # noqa: PLC0415 - torch only once the bench runs
    from usema.bench.report import format_markdown  # noqa: PLC0415

    config = _config_from_args(args)
    outputs = _outputs(args.output, args.overwrite)
    results = run_benchmark(config)
    report = format_markdown(results)
    print(report)
    if outputs is not None:
        md, js = outputs
        atomic_write_text(js, json.dumps(results, indent=1))
        atomic_write_text(md, report)
        log(f"wrote {md} and {js}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer expected, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive integer expected, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `usema bench`."""
    p = subparsers.add_parser(
        "bench",
        help="cost of USEMA vs. MONAI networks: params, GFLOPs, latency, memory, train step",
        description="Params, forward GFLOPs, latency (interleaved rounds), peak forward memory (fresh process), "
        "GFLOP/s, training-step time and log-log scaling slopes of USEMA presets and MONAI networks; "
        "prints a markdown table with ratios against DynUNet.",
    )
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D or 3D networks (default 2)")
    p.add_argument("--sizes", type=_positive_int, nargs="+", help="input sides (default 256 512 1024 / 64 96 128)")
    p.add_argument("--nets", nargs="+", help=f"networks among {' '.join(DEFAULT_NETS[2])} segresnet")
    p.add_argument("--repeats", type=_positive_int, help="timed rounds after the warm-up (default 5; --quick 1)")
    p.add_argument("--largest-repeats", type=_positive_int, help="timed rounds at the largest size (default --repeats)")
    p.add_argument("--train-size", type=_positive_int, help="training-step input side (default 256 / 64)")
    p.add_argument("--train-batch", type=_positive_int, default=2, help="training-step batch size (default 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores of this process)")
    p.add_argument("--quick", action="store_true", help="smoke run: one small size, 1 round")
    p.add_argument("--output", metavar="FILE.md", help="also write the table to FILE.md and all numbers to FILE.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
    return p
