"""Iteration-indexed sampling: the sample drawn at every training step is a pure function of the step.

The training dataset is deterministic in (seed, index), so a run resumed at step ``s`` sees exactly the
batches an uninterrupted run would, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler


def sample_indices(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Dataset indices of ``rank``'s batch at global ``step``: step*batch*world + rank*batch + b."""
    first = (step * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


class StepBatchSampler(Sampler[list[int]]):
    """Batches for global steps ``start_step`` .. ``total_steps - 1`` of one rank (a DataLoader batch_sampler)."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start_step = start_step
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield sample_indices(step, self.batch_size, self.rank, self.world_size)
