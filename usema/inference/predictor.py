"""Sliding-window prediction shared by validation, `usema infer` and the bundle.

A 2D network on a 3D volume runs slice by slice along ``slice_axis`` (MONAI ``SliceInferer``),
with in-plane sliding windows; otherwise MONAI ``SlidingWindowInferer`` tiles the image.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer


def make_inferer(
    roi_size: Sequence[int],
    image_spatial_dims: int,
    net_spatial_dims: int,
    slice_axis: int | None,
    *,
    overlap: float,
    sw_batch_size: int,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    sw_device: torch.device | str | None = None,
) -> Inferer:
    """Inferer for an image with ``image_spatial_dims`` spatial axes and a network with ``net_spatial_dims``.

    ``overlap`` and ``sw_batch_size`` have no defaults here: the recipe's ``val`` section is their one source.

    ``device`` is where the stitched output lives (``"cpu"`` bounds GPU memory on large volumes);
    ``sw_device`` is where the windows run (default: the input's device).
    """
    kwargs = dict(
        roi_size=list(roi_size),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=mode,
        device=device,
        sw_device=sw_device,
    )
    if net_spatial_dims == image_spatial_dims:
        return SlidingWindowInferer(**kwargs)
    if net_spatial_dims == 2 and image_spatial_dims == 3:
        if slice_axis is None:
            raise ValueError("slice_axis is required to run a 2D network on a 3D image")
        return SliceInferer(spatial_dim=slice_axis, **kwargs)
    raise ValueError(f"cannot run a {net_spatial_dims}D network on a {image_spatial_dims}D image")


@torch.no_grad()
def predict_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    inferer: Inferer,
    tta: bool = False,
) -> torch.Tensor:
    """Logits (B, K, *spatial) for ``image`` (B, C, *spatial); ``tta`` averages mirrored predictions.

    Mirroring uses every non-empty subset of the in-plane axes (the axes the network sees).
    """
    logits = inferer(image, network)
    if not tta:
        return logits
    spatial = list(range(2, image.ndim))
    if isinstance(inferer, SliceInferer):
        spatial.remove(2 + inferer.spatial_dim)
    flips = [[a for i, a in enumerate(spatial) if mask >> i & 1] for mask in range(1, 2 ** len(spatial))]
    for axes in flips:
        logits = logits + inferer(image.flip(axes), network).flip(axes)
    return logits / (len(flips) + 1)
