"""Freed activations are reused, not unmapped and faulted in again at every window (usema/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from usema.allocator import USER_SETTINGS, retain_freed_memory

# allocates, writes and frees a 48 MiB tensor 30 times (above glibc's largest adaptive mmap threshold, 32 MiB),
# as a network does with an activation at every sliding window, and prints the page faults of the last 10
# rounds (the steady state: this VM's first rounds may fault in any case)
PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    if sys.argv[1] == "retain":
        from usema.allocator import retain_freed_memory
        assert retain_freed_memory()
    for round in range(30):
        if round == 20:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activation = torch.empty(12 << 20).fill_(1.0)
        del activation
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES_PER_TENSOR = (48 << 20) // 4096


def page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_a_freed_activation_is_reused_without_faulting_its_pages_in_again():
    default, retained = page_faults("default"), page_faults("retain")
    assert default >= 9 * PAGES_PER_TENSOR  # glibc unmaps every 48 MiB block and maps a fresh one
    assert retained <= PAGES_PER_TENSOR // 2  # the block is reused


@pytest.mark.parametrize("chosen", [{"LD_PRELOAD": "libjemalloc.so.2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                    {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_an_allocator_the_user_chose_is_left_alone(chosen, monkeypatch):
    import ctypes

    def no_libc(*args: object) -> None:
        raise AssertionError("mallopt must not be reached")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert retain_freed_memory(dict(chosen)) is False


def test_the_command_line_sets_up_the_allocator(monkeypatch):
    from usema import cli

    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True))
    assert cli.main(["datasets", "--help-that-does-not-exist"]) == 2
    assert calls == [True]
