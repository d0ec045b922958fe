"""models/model.ts: the bundle's TorchScript module, made by MONAI's own ``ckpt_export``."""

from __future__ import annotations

import warnings
from pathlib import Path

from usema.inference.model_loading import LoadedModel
from usema.run.layout import BUNDLE_INFERENCE, BUNDLE_METADATA, BUNDLE_TORCHSCRIPT, BUNDLE_WEIGHTS


def write_torchscript(bundle: Path, model: LoadedModel) -> str:
    """models/model.ts through ``monai.bundle.ckpt_export``: scripted if possible, else traced at the window size.

    Returns how it was made ("script", "trace") or why it is absent.
    """
    from monai.bundle import ckpt_export  # noqa: PLC0415

    shape = [1, model.in_channels, *model.settings.roi_size]
    failures = []
    for use_trace in (False, True):
        try:
            with warnings.catch_warnings():
                # tracing warns about every shape-dependent branch; the README states the traced input shape
                warnings.simplefilter("ignore")
                ckpt_export(
                    net_id="network_def",
                    filepath=str(bundle / BUNDLE_TORCHSCRIPT),
                    ckpt_file=str(bundle / BUNDLE_WEIGHTS),
                    meta_file=str(bundle / BUNDLE_METADATA),
                    config_file=str(bundle / BUNDLE_INFERENCE),
                    use_trace=use_trace,
                    input_shape=shape if use_trace else None,
                    bundle_root=str(bundle),
                )
            return "trace" if use_trace else "script"
        except Exception as exc:  # noqa: BLE001 - TorchScript support is optional: record why and move on
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            failures.append(f"{'trace' if use_trace else 'script'}: {type(exc).__name__}: {reason}")
    (bundle / BUNDLE_TORCHSCRIPT).unlink(missing_ok=True)
    return "not exported (" + "; ".join(failures) + ")"

