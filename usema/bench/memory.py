"""Peak forward memory: the tensors a forward holds at once (counted op by op, deterministic), and the resident
memory of a fresh process (VmHWM is per process), which also carries the allocator's and oneDNN's share."""

from __future__ import annotations

import gc
import weakref
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from usema.allocator import retain_freed_memory
from usema.bench.networks import build_bench_network, make_input
from usema.bench.processes import fresh_processes, proc_status_mib, reset_peak_rss
from usema.inference.model_loading import place_for_inference


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that operators create while the mode is on and that are still alive: ``now``,
    and its maximum ``peak``. Storages an operator shares with its inputs (views, in-place results) and those that
    existed before (weights, the input) are not counted; a storage leaves the count when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key and key not in inputs and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
        return out


def peak_tensor_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB of tensors one no-grad forward of ``model`` on ``x`` holds at its peak (activations and output; not the
    weights, the input, nor buffers libraries allocate outside PyTorch tensors, such as oneDNN's scratchpads).

    Unlike a process's resident memory it does not depend on which freed blocks the allocator keeps or reuses, so
    it is the same in every run."""
    counter = LiveTensorBytes()
    with torch.no_grad(), counter:
        model(x)
    return counter.peak / 2**20


def memory_probe(name: str, spatial_dims: int, size: int, threads: int) -> dict[str, float | bool]:
    """Peak memory of one no-grad forward in this process (meant to run in a fresh subprocess).

    ``baseline_mib`` is the resident memory after imports, model construction and input creation;
    ``forward_mib`` the VmHWM rise above it during the forward; ``process_peak_mib`` the VmHWM at the end;
    ``tensor_mib`` the tensors the forward holds at once (``peak_tensor_mib``, measured afterwards: here its
    dispatch-mode forward cannot change the heap a timed forward runs on). The allocator and the network's layout
    are set up as `usema infer` sets them up.
    """
    retain_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = place_for_inference(build_bench_network(name, spatial_dims, size).eval(), torch.device("cpu"))
    x = make_input(spatial_dims, size)
    gc.collect()
    reset = reset_peak_rss()
    before = proc_status_mib("VmRSS", "VmHWM")
    baseline = before["VmRSS"] if reset else before["VmHWM"]
    with torch.no_grad():
        model(x)
    peak = proc_status_mib("VmHWM")["VmHWM"]
    return {"baseline_mib": baseline, "forward_mib": peak - baseline, "process_peak_mib": peak, "hwm_reset": reset,
            "tensor_mib": peak_tensor_mib(model, x)}


def measure_peak_memory(
    probes: Sequence[tuple[str, int, int]], threads: int, repeats: int = 3
) -> list[dict[str, float | bool | list[float]]]:
    """``memory_probe`` for each (name, spatial_dims, size), ``repeats`` times each in a fresh process, results in
    order: the median of each value, and the forward rises in ``forward_samples_mib``.

    VmHWM is per process (and ru_maxrss would inherit this process's peak), so every measurement gets a new
    child (``fresh_processes``). One process's figure varies by tens of MiB (which freed block the allocator
    reuses depends on thread timing), hence the median.
    """
    with fresh_processes(["usema.bench.memory", "usema.nets"]) as pool:
        samples = [[pool.apply(memory_probe, probe + (threads,)) for _ in range(repeats)] for probe in probes]
    return [_median_sample(runs) for runs in samples]


def _median_sample(runs: list[dict[str, float | bool]]) -> dict[str, float | bool | list[float]]:
    median = sorted(runs, key=lambda r: r["forward_mib"])[len(runs) // 2]
    return {**median, "forward_samples_mib": [r["forward_mib"] for r in runs]}
