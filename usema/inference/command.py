"""`usema infer MODEL [MODEL ...] --input FILE_OR_DIR --output DIR`: segment images with a trained model or an
ensemble (several models, or a cv directory)."""

from __future__ import annotations

import argparse

from usema.threads import add_threads_argument, positive_int

# usema.inference.precision.PRECISIONS, spelt out: importing that module would load torch for --help
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= overlap < 1, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="segment NIfTI / NRRD / MHA volumes or PNG / TIFF images with a trained model",
        description=(
            "Segment every case of --input with MODEL (a run directory, a checkpoint or an exported bundle). "
            "Several MODELs, or a cv directory (usema cv: its folds, then its chosen post-processing), are an "
            "ensemble: their softmax probabilities are averaged before the argmax. "
            "Outputs keep the input's grid exactly and are named CASE<suffix> (nnU-Net channel postfix removed)."
        ),
    )
    parser.add_argument("model", metavar="MODEL", nargs="+",
                        help="run directory, checkpoint file (.pt), bundle directory or cv directory (several: ensemble)")
    parser.add_argument("--input", "-i", required=True, help="an image file or a directory of cases")
    parser.add_argument("--output", "-o", required=True, help="output directory for the label maps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--overlap", type=_overlap, default=None, help="sliding-window overlap (default: recipe's)")
    parser.add_argument("--sw-batch-size", type=positive_int, default=None, help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average predictions over in-plane mirrorings")
    parser.add_argument(
        "--save-probabilities", action="store_true", help="also write softmax probabilities as CASE_prob (channel last)"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="autocast dtype of the network forward; everything after it is float32 "
        "(default auto: fp16 on CUDA, fp32 on CPU; bf16 on CPU needs a processor with bfloat16 support)",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the network(s) before the first window (inductor): a slower start for faster windows",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing results in --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from usema.inference.pipeline import InferenceOptions, run_inference  # noqa: PLC0415 - heavy imports
    from usema.threads import configure_threads  # noqa: PLC0415

    configure_threads(args.threads)
    options = InferenceOptions(
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        save_probabilities=args.save_probabilities,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        precision=args.precision,
        compile=args.compile,
    )
    summary = run_inference(args.model, args.input, args.output, options)
    print(f"usema infer: {summary.line()} -> {args.output}")
    return 0
