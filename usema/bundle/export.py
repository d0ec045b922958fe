"""`usema export`: a trained run as a MONAI Bundle (SPEC §7) that `python -m monai.bundle run` can execute.

Layout written (atomically: built in a temporary sibling directory, then swapped into place)::

    BUNDLE/LICENSE
    BUNDLE/configs/metadata.json    schema-valid metadata (schema meta_schema_20240725)
    BUNDLE/configs/inference.json   MONAI pipeline equivalent to `usema infer` (no TTA)
    BUNDLE/configs/usema.json       the run's network spec, recipe, norm stats, labels (for `usema infer`)
    BUNDLE/models/model.pt          state_dict
    BUNDLE/models/model.ts          TorchScript (scripted, else traced at the window size; absent if neither works)
    BUNDLE/docs/README.md

Every value copied into the configs is validated first (the network spec again, class and run names), so
the only ``$`` expressions are the pipeline's own (``usema.bundle.configs.ALLOWED_EXPRESSIONS``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from usema.bundle.configs import INPUT_FORMATS, detect_input_format, inference_config, usema_args
from usema.bundle.describe import LICENSE_TEXT, eval_metrics, metadata, readme
from usema.bundle.swap import build_beside, check_output, replace_dir
from usema.bundle.torchscript import write_torchscript
from usema.errors import UsemaError, os_reason
from usema.inference.model_loading import LoadedModel, load_model
from usema.run.layout import (
    BUNDLE_INFERENCE,
    BUNDLE_LICENSE,
    BUNDLE_METADATA,
    BUNDLE_README,
    BUNDLE_USEMA_ARGS,
    BUNDLE_WEIGHTS,
)
from usema.run.spec import CONFIG_SYNTAX_PREFIXES, spec_from_dict, spec_to_dict


def check_plain_names(model: LoadedModel, run_name: str) -> None:
    """Class and run names are copied into the bundle's configs as data: refuse any that MONAI would parse.

    MONAI's ConfigParser runs strings starting with ``$``, reads the file a ``%`` macro names and resolves
    ``@`` references, also in metadata.json (``ckpt_export`` and ``run`` load it).
    """
    names = {f"labels.{k}": v for k, v in model.labels.items()} | {"name": run_name}
    for key, text in names.items():
        if text.startswith(CONFIG_SYNTAX_PREFIXES):
            raise UsemaError(
                f"{model.source}: {key}: expected a plain name, got {text!r} "
                "(MONAI bundle configs treat text starting with $, % or @ as code, file macro or reference)"
            )


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def export_bundle(
    run: str | Path,
    output: str | Path,
    overwrite: bool = False,
    input_format: str | None = None,
) -> Path:
    """Export RUN (run dir or checkpoint) as a MONAI bundle at ``output``; returns the bundle directory.

    ``input_format`` ("nifti" or "png") is what the bundle reads and writes; None = as the run's training data.
    """
    output = Path(output)
    if input_format not in (None, *INPUT_FORMATS):
        raise UsemaError(f"--input-format: expected one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    check_output(output, [Path(run)], overwrite)
    model = load_model(run, "cpu")
    check_output(output, [Path(run), model.source], overwrite)
    # the spec goes into inference.json, which MONAI parses: validate what is written, not only what was read
    spec_from_dict(spec_to_dict(model.spec), f"{model.source}: network")
    input_format = input_format or detect_input_format(model.recipe)
    run_name = model.recipe.name or Path(run).name
    check_plain_names(model, run_name)
    try:
        with build_beside(output) as build:
            (build / BUNDLE_LICENSE).write_text(LICENSE_TEXT.format(authors="usema developers"))
            _write_json(build / BUNDLE_METADATA, metadata(model, run_name, input_format))
            _write_json(build / BUNDLE_INFERENCE, inference_config(model, input_format))
            (build / BUNDLE_WEIGHTS).parent.mkdir()
            torch.save(model.network.state_dict(), build / BUNDLE_WEIGHTS)
            torchscript = write_torchscript(build, model)
            args = usema_args(model, torchscript, input_format, eval_metrics(model.metrics))
            _write_json(build / BUNDLE_USEMA_ARGS, args)
            (build / BUNDLE_README).parent.mkdir()
            (build / BUNDLE_README).write_text(readme(model, run_name, torchscript, input_format))
            replace_dir(build, output)
    except OSError as exc:  # disk full or permissions: the bundle is built aside, so the old one is untouched
        raise UsemaError(f"{output}: could not write the bundle ({os_reason(exc)}); the previous one is kept") from exc
    return output
