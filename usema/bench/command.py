"""`usema bench`: options, output files, and the run (measurement modules are imported only when it runs)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from usema.bench import machine
from usema.bench.settings import (
    DEFAULT_INFER_SHAPE,
    DEFAULT_NETS,
    DEFAULT_SIZES,
    DEFAULT_TRAIN_SIZES,
    QUICK_INFER_SHAPE,
    QUICK_SIZE,
    BenchConfig,
    parse_net,
)
from usema.errors import UsemaError
from usema.io.files import atomic_write_text, ensure_writable_dir, refuse_existing
from usema.threads import add_threads_argument, positive_int, usable_cpus


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
    train_sizes = (min(sizes),) if quick else DEFAULT_TRAIN_SIZES[dims]
    return BenchConfig(
        spatial_dims=dims,
        sizes=sizes,
        nets=nets,
        repeats=repeats,
        largest_repeats=args.largest_repeats,
        train_sizes=tuple(args.train_sizes) if args.train_sizes else train_sizes,
        train_batch=args.train_batch,
        train_repeats=0 if args.no_train else repeats,
        infer_shape=_infer_shape(args),
        infer_repeats=args.infer_repeats,
        threads=args.threads or usable_cpus(),
        memory=not args.no_memory,
        allow_load=args.allow_load,
    )


def _infer_shape(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """The synthetic volume `usema infer` segments: 2D networks only, since a 3D one needs another recipe."""
    if args.no_infer:
        return None
    if args.dims != 2:
        if args.infer_shape:
            raise UsemaError("--infer-shape: the usema infer benchmark runs 2D networks; use --dims 2 or --no-infer")
        return None
    if args.infer_shape:
        return tuple(args.infer_shape)
    return QUICK_INFER_SHAPE if args.quick else DEFAULT_INFER_SHAPE


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
    """`usema bench`: run the benchmark, print the markdown table, optionally write FILE.md and FILE.json.

    A machine busier than ``machine.LOAD_PER_CPU`` per usable CPU is refused before anything is measured or
    written, unless ``--allow-load``.
    """
    config = _config_from_args(args)
    outputs = _outputs(args.output, args.overwrite)
    load = machine.read_load()  # before importing torch: this process's start-up is not the machine's load
    from usema.bench.harness import check_config, log, run_benchmark  # noqa: PLC0415 - torch only once it runs
    from usema.bench.report import format_markdown  # noqa: PLC0415

    check_config(config)  # option errors first: a busy machine is no reason to hide them
    machine.refuse_loaded(load, config.allow_load)
    results = run_benchmark(config, load)
    report = format_markdown(results)
    print(report)
    if outputs is not None:
        md, js = outputs
        atomic_write_text(js, json.dumps(results, indent=1))
        atomic_write_text(md, report)
        log(f"wrote {md} and {js}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `usema bench`."""
    p = subparsers.add_parser(
        "bench",
        help="cost of USEMA vs. MONAI networks: params, GFLOPs, latency, memory, train step",
        description="Params, forward GFLOPs, latency (interleaved rounds), peak forward memory (fresh process), "
        "GFLOP/s, training-step time and images/s, usema infer voxels/s on a synthetic NIfTI (2D) and log-log "
        "scaling slopes of USEMA presets and MONAI networks; prints markdown tables with ratios against DynUNet "
        "(usema infer: against BasicUNet). Refuses to run on a loaded machine unless --allow-load.",
    )
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D or 3D networks (default 2)")
    p.add_argument("--sizes", type=positive_int, nargs="+", help="input sides (default 256 512 1024 / 64 96 128)")
    p.add_argument("--nets", nargs="+", help=f"networks among {' '.join(DEFAULT_NETS[2])} segresnet")
    p.add_argument("--repeats", type=positive_int, help="timed rounds after the warm-up (default 5; --quick 1)")
    p.add_argument("--largest-repeats", type=positive_int, help="timed rounds at the largest size (default --repeats)")
    p.add_argument("--train-sizes", "--train-size", dest="train_sizes", type=positive_int, nargs="+",
                   help="training-step input sides (default 256 512 / 64; --quick: the smallest --sizes)")
    p.add_argument("--train-batch", type=positive_int, default=2, help="training-step batch size (default 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--infer-shape", type=positive_int, nargs=3, metavar=("X", "Y", "SLICES"),
                   help="synthetic NIfTI that usema infer segments with each 2D net (default 256 256 200; --quick "
                   "64 64 8)")
    p.add_argument("--infer-repeats", type=positive_int, default=1,
                   help="interleaved usema infer rounds after a short warm-up (default 1)")
    p.add_argument("--no-infer", action="store_true", help="skip the usema infer throughput measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_threads_argument(p)
    p.add_argument("--quick", action="store_true", help="smoke run: one small size, 1 round")
    p.add_argument("--allow-load", action="store_true",
                   help="run even when the 1-minute load is above 0.5 per usable CPU (report flagged as loaded)")
    p.add_argument("--output", metavar="FILE.md", help="also write the table to FILE.md and all numbers to FILE.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)
    return p
