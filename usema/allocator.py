"""Keep freed memory in the process instead of returning it to the kernel at every free (glibc malloc).

A network's activations are tens to hundreds of MiB each and are freed and allocated again at every window
of ``usema infer`` and every training step. glibc serves a block above its mmap threshold (128 KiB, raised
adaptively to at most 32 MiB) with a fresh ``mmap`` and unmaps it when freed, and trims the top of the heap
beyond twice that: every window then page-faults its activations in again and the kernel zeroes each page.
With glibc's defaults, `usema infer` of a 200-slice volume on 2 cores took 11% longer with usema-base (4.3
million page faults, 0.3 million with these settings), 12% with usema-tiny and 58% with MONAI's BasicUNet
(docs/benchmarks.md, "Memory allocator"). PyTorch's CPU tuning guides swap in jemalloc or tcmalloc for this;
two ``mallopt`` settings get the same reuse from glibc itself.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 20
"""Blocks below 128 MiB come from the heap and are reused: every activation of 2D inference on batches of four
256² slices (up to 128 channels at full resolution, concatenations included) and of 3D patches up to 96³ at 32
channels. Larger ones are still mapped and returned when freed. Reused blocks fragment the heap: peak forward
memory rose 20-30% at 1024² and 128³ with this threshold, and by a third or more with every block kept (1 GiB)."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Up to 1 GiB of free memory at the top of the heap is kept for the next window instead of being trimmed. At 256
MiB (usema 0.3.1) a batch whose activations add up to more (BasicUNet's and DynUNet's four 256² slices, usema-base's
four 512² slices) was trimmed and faulted in again at every window: 2.6-3.7 million page faults per 200-slice volume
for BasicUNet; with 1 GiB `usema infer` took 21% less time for BasicUNet and 4-9% less for usema-base on 512²
slices (with a lower peak), while peak forward memory moved within the probes' spread (docs/benchmarks.md,
"Memory allocator")."""
USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "LD_PRELOAD")


def retain_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds (``MMAP_THRESHOLD_BYTES``, ``TRIM_THRESHOLD_BYTES``); True when set.

    Nothing is changed (False) outside glibc, or when the user chose an allocator or its settings (any of
    ``USER_SETTINGS`` in the environment, e.g. jemalloc in ``LD_PRELOAD``). Takes effect for later
    allocations, so it may run at any time; the commands run it before their first network.
    """
    environ = os.environ if environ is None else environ
    if any(key in environ for key in USER_SETTINGS) or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return all(mallopt(parameter, value) for parameter, value in settings)
