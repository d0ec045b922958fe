"""torch.compile for a command's network, its failures as one-line errors naming the option that asked for it.

Compilation is lazy: ``torch.compile`` only wraps the module, and the first forward (and, in training, the first
backward) traces and compiles it. A failure therefore surfaces where the compiled module is first run, so
commands run it inside :func:`compile_failures`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from usema.errors import UsemaError


def compile_module(module: nn.Module, option: str, remedy: str) -> nn.Module:
    """``torch.compile(module)`` (inductor); the wrapper shares ``module``'s parameters and leaves its state_dict
    keys alone (a checkpoint reads the original module, never the wrapper's ``_orig_mod.`` names)."""
    try:
        return torch.compile(module)
    except RuntimeError as exc:  # torch.compile itself refuses some platforms (a Python version it does not support)
        reason = " ".join(str(exc).split())[:200]
        raise UsemaError(f"{option}: torch.compile is not available here ({reason}); {remedy}") from exc


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "could not compile" rather than "the computation failed" (out of memory stays itself).

    Inductor wraps its C++ errors in dynamo's exceptions while compiling a graph; a kernel built later (autotuning,
    a recompilation for a new shape) may raise them bare.
    """
    import torch._dynamo.exc as dynamo_exc  # noqa: PLC0415 - dynamo loads only when compiling
    import torch._inductor.exc as inductor_exc  # noqa: PLC0415

    names = ("InvalidCxxCompiler", "CppCompileError", "CUDACompileError")
    return (dynamo_exc.TorchDynamoException, *(getattr(inductor_exc, n) for n in names if hasattr(inductor_exc, n)))


@contextlib.contextmanager
def compile_failures(option: str, remedy: str, enabled: bool = True) -> Iterator[None]:
    """Turn a torch.compile failure inside the block into ``UsemaError("<option>: ... (<reason>); <remedy>")``."""
    if not enabled:
        yield
        return
    try:
        yield
    except _compile_errors() as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsemaError(f"{option}: torch.compile could not compile the network ({reason[:200]}); {remedy}") from exc
