"""Seeding and RNG snapshots that survive ``torch.load(..., weights_only=True)``.

Exact resume needs every generator the training loop draws from (python ``random``, numpy's global
generator, torch CPU and CUDA). The snapshots hold only tensors, ints, floats, strings and lists so that
checkpoints stay loadable without unpickling arbitrary objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from usema.threads import single_thread_worker

# numpy's legacy seeding accepts at most 2**32 - 1
_SEED_MOD = 2**32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % _SEED_MOD)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive python/numpy seeds from the worker's torch seed, and give the worker
    one intra-op thread (it would otherwise start as many as the main process, which is busy training).

    torch already seeds each worker with ``base_seed + worker_id`` (base_seed from the loader's own
    generator); numpy and python would otherwise inherit the parent's state in every forked worker.
    """
    seed = torch.initial_seed() % _SEED_MOD
    random.seed(seed)
    np.random.seed(seed)
    single_thread_worker(worker_id)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of python, numpy, torch CPU and CUDA generator states as checkpoint-safe values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only when CUDA is present."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
