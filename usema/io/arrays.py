"""Whole-image array checks and conversions done block by block, so that none allocates a full-size temporary."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from usema.errors import UsemaError

BLOCK_ELEMENTS = 1 << 22
# integer types tried in order for a label map: the first that holds its value range is used
COMPACT_INTEGERS = (np.uint8, np.uint16, np.int16, np.int32, np.int64)


def blocks(array: np.ndarray, size: int | None = None) -> Iterator[np.ndarray]:
    """Views of ``array`` of at most ``size`` (default BLOCK_ELEMENTS) elements that together cover it once."""
    size = size or BLOCK_ELEMENTS
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        array = array.T  # element-wise work does not care about the order: walk along memory
    if array.size <= size or array.ndim <= 1:
        if array.ndim == 1 and array.size > size:
            yield from (array[i : i + size] for i in range(0, array.size, size))
        else:
            yield array
        return
    for sub in array:
        yield from blocks(sub, size)


def all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite (integer arrays always are)."""
    if array.dtype.kind not in "fc":
        return True
    return all(np.isfinite(block).all() for block in blocks(array))


def compact_integer_dtype(low: int, high: int) -> np.dtype:
    """The smallest integer type of COMPACT_INTEGERS holding every value in [low, high]."""
    return np.dtype(next(t for t in COMPACT_INTEGERS if np.iinfo(t).min <= low and high <= np.iinfo(t).max))


def integer_labels(array: np.ndarray, name: str, atol: float) -> np.ndarray:
    """``array`` as the most compact integer type holding its values; float values must be integers within ``atol``.

    Raises UsemaError naming ``name`` for NaN/inf or fractional values. Float input is converted block by block.
    """
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind in "iu":
        if array.size == 0:
            return array.astype(np.uint8)
        dtype = compact_integer_dtype(int(array.min()), int(array.max()))
        return array.astype(dtype, copy=False)
    if array.dtype.kind != "f":
        raise UsemaError(f"{name}: expected integer class labels, got {array.dtype} values")
    if not all_finite(array):
        raise UsemaError(f"{name}: expected integer class labels, found NaN or inf")
    for block in blocks(array):
        if np.abs(np.rint(block) - block).max(initial=0) > atol:
            raise UsemaError(f"{name}: expected integer class labels, found fractional values")
    low, high = (int(np.rint(array.min(initial=0))), int(np.rint(array.max(initial=0))))
    if low < np.iinfo(np.int64).min or high > np.iinfo(np.int64).max:
        raise UsemaError(f"{name}: expected integer class labels, found values beyond 64-bit integers")
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)  # so that ``out`` below is walked in the same blocks
    out = np.empty_like(array, dtype=compact_integer_dtype(low, high))  # same memory order: same blocks
    for src, dst in zip(blocks(array), blocks(out)):
        np.rint(src, out=dst, casting="unsafe")
    return out
