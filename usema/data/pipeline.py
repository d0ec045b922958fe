"""Training patches: nnU-Net-style sampling with MONAI augmentation, deterministic per sample index.

Sample ``i`` of a :class:`PatchDataset` is a pure function of ``(seed, i)``: a numpy generator seeded with
``(seed, i)`` picks the case, decides foreground oversampling, picks the patch centre, and seeds the MONAI
transforms (``Compose.set_random_state``). So any DataLoader worker count and any order give identical
batches, which is what exact resume relies on.

Patch centres follow nnU-Net: with probability ``fg_oversample`` a foreground class present in the case is
chosen uniformly and the centre is a random voxel of that class (from locations sampled once per case);
otherwise the centre is uniform over the volume. For a 2D network on 3D volumes the centre also picks the
slice, so foreground-containing slices are oversampled.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
    SpatialPadd,
)

# nnU-Net keeps at most this many sampled voxel locations per class and case
LOCATIONS_PER_CLASS = 10_000
KEYS = ("image", "label")


@dataclass
class TrainCase:
    """A training case. ``image`` (C, *spatial) float32 normalised and ``label`` (*spatial) integer classes.

    With caching off, ``image``/``label`` are None and ``load()`` decodes them on demand.
    ``locations`` maps each foreground class present to sampled voxel coordinates (N, ndim).
    """

    name: str
    image: np.ndarray | None
    label: np.ndarray | None
    locations: dict[int, np.ndarray]
    shape: tuple[int, ...]
    loader: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, label), decoding them when not cached."""
        if self.image is not None:
            return self.image, self.label
        return self.loader()


def class_locations(label: np.ndarray, seed: int = 0) -> dict[int, np.ndarray]:
    """Up to LOCATIONS_PER_CLASS random voxel coordinates (N, ndim) int64 for every class > 0 in ``label``."""
    rng = np.random.default_rng(seed)
    flat = label.reshape(-1)
    out = {}
    for cls in np.flatnonzero(np.bincount(flat)):  # labels are small non-negative ints: faster than np.unique
        if cls == 0:
            continue
        idx = np.flatnonzero(flat == cls)
        if idx.size > LOCATIONS_PER_CLASS:
            idx = rng.choice(idx, LOCATIONS_PER_CLASS, replace=False)
        out[int(cls)] = np.stack(np.unravel_index(np.sort(idx), label.shape), axis=1)
    return out


def make_case(name: str, image: np.ndarray, label: np.ndarray, cache: bool = True,
              loader: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> TrainCase:
    """A TrainCase from decoded arrays; with ``cache=False`` the arrays are dropped and ``loader`` used later."""
    label = label.astype(np.uint8 if label.max(initial=0) < 256 else np.int16, copy=False)
    locations = class_locations(label, seed=zlib.crc32(name.encode()))
    if cache or loader is None:
        return TrainCase(name, image, label, locations, tuple(label.shape))
    return TrainCase(name, None, None, locations, tuple(label.shape), loader)


AUGMENTATIONS = ("nnunet", "light", "none")


def augmentation(patch_size: Sequence[int], scheme: str = "light") -> Compose:
    """Pad to ``patch_size``, then augment {"image": (C,*p), "label": (1,*p)} with ``scheme``.

    - "nnunet": nnU-Net v2's default training set (``nnunet_transforms``).
    - "light": rotation +-15 deg and scaling +-15% (p=0.2), flips along every axis (p=0.5 each), intensity
      scale/shift (p=0.15), gaussian noise (p=0.1).
    - "none": padding only.
    """
    pad = SpatialPadd(KEYS, spatial_size=list(patch_size), mode="constant")
    if scheme == "none":
        return Compose([pad])
    if scheme == "nnunet":
        return Compose([pad, *nnunet_transforms(len(patch_size))])
    if scheme != "light":
        raise ValueError(f"augmentation scheme {scheme!r}: expected one of {AUGMENTATIONS}")
    ndim = len(patch_size)
    angle = math.radians(15)
    rotate = (angle,) if ndim == 2 else (angle, angle, angle)
    return Compose(
        [
            pad,
            RandAffined(KEYS, prob=0.2, rotate_range=rotate, scale_range=(0.15,) * ndim,
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            *[RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(ndim)],
            RandScaleIntensityd("image", factors=0.25, prob=0.15),
            RandShiftIntensityd("image", offsets=0.1, prob=0.15),
            RandGaussianNoised("image", prob=0.1, std=0.1),
        ]
    )


def nnunet_transforms(ndim: int) -> list:
    """nnU-Net v2's default augmentation (nnUNetTrainer), in its order, from MONAI transforms.

    Rotation (2D: full circle; 3D: +-30 deg per axis) p=0.2 and scaling 0.7-1.4 p=0.2 are drawn independently,
    as in nnU-Net (which resamples both in one step; here the 4% of patches that draw both are interpolated
    twice); no elastic deformation. Then gaussian noise (variance up to
    0.1, i.e. std up to 0.316) p=0.1, gaussian blur (sigma 0.5-1) p=0.2, multiplicative brightness 0.75-1.25
    p=0.15, contrast 0.75-1.25 around the mean keeping the value range p=0.15, simulated low resolution (zoom
    0.5-1) p=0.25, gamma 0.7-1.5 on the inverted image p=0.1 and on the image p=0.3 (both keeping mean and
    std), mirroring along every axis p=0.5 each.
    """
    angle = math.pi if ndim == 2 else math.radians(30)
    ranges = {"range_x": angle} if ndim == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
    sigma = {f"sigma_{axis}": (0.5, 1.0) for axis in "xyz"[:ndim]}
    return [
        RandRotated(KEYS, prob=0.2, mode=("bilinear", "nearest"), padding_mode="zeros", **ranges),
        RandZoomd(KEYS, prob=0.2, min_zoom=0.7, max_zoom=1.4, mode=("bilinear", "nearest"), padding_mode="constant",
                  keep_size=True),
        RandGaussianNoised("image", prob=0.1, std=math.sqrt(0.1), sample_std=True),
        RandGaussianSmoothd("image", prob=0.2, **sigma),
        RandScaleIntensityd("image", factors=(-0.25, 0.25), prob=0.15),
        RandScaleIntensityFixedMeand("image", factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0),
                                   upsample_mode="bicubic" if ndim == 2 else "trilinear"),
        RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True),
        *[RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(ndim)],
    ]


def _sample_seed(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]))


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches; ``self[i]`` = {"image": (C, *patch) float32, "label": (1, *patch) float32}.

    ``spatial_dims`` is the network's; when the cases are 3D and it is 2, patches are 2D slices along
    ``slice_axis``. ``length`` only sets ``len()``: any index >= 0 is valid.
    """

    def __init__(self, cases: Sequence[TrainCase], patch_size: Sequence[int], spatial_dims: int, slice_axis: int = 2,
                 fg_oversample: float = 0.33, seed: int = 0, length: int = 1, augment: str = "light") -> None:
        if not cases:
            raise ValueError("PatchDataset needs at least one training case")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.spatial_dims = spatial_dims
        self.slice_axis = slice_axis
        self.fg_oversample = fg_oversample
        self.seed = seed
        self.length = length
        self.transform = augmentation(self.patch_size, augment)

    def __len__(self) -> int:
        return self.length

    def _centre(self, case: TrainCase, rng: np.random.Generator) -> np.ndarray:
        """A voxel coordinate (ndim,) in the case: foreground-oversampled or uniform."""
        if case.locations and rng.random() < self.fg_oversample:
            classes = sorted(case.locations)
            points = case.locations[classes[rng.integers(len(classes))]]
            return points[rng.integers(len(points))]
        return np.array([rng.integers(n) for n in case.shape])

    def _crop(self, image: np.ndarray, label: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The patch around ``centre`` (slice first for 2D-on-3D), clipped to the image; padding comes later."""
        if label.ndim == 3 and self.spatial_dims == 2:
            z = int(centre[self.slice_axis])
            image = np.take(image, z, axis=1 + self.slice_axis)
            label = np.take(label, z, axis=self.slice_axis)
            centre = np.delete(centre, self.slice_axis)
        box = []
        for c, p, n in zip(centre, self.patch_size, label.shape):
            start = int(np.clip(c - p // 2, 0, max(n - p, 0)))
            box.append(slice(start, start + p))
        return image[(slice(None), *box)], label[tuple(box)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = _sample_seed(self.seed, index)
        case = self.cases[rng.integers(len(self.cases))]
        image, label = case.arrays()
        image, label = self._crop(image, label, self._centre(case, rng))
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        out = self.transform({"image": np.ascontiguousarray(image), "label": label[None].astype(np.float32)})
        return {k: torch.as_tensor(np.asarray(out[k]), dtype=torch.float32).contiguous() for k in KEYS}
