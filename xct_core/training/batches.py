"""The training data stream: each rank's shard of the train split (:class:`ShardSampler`)
and the endless batch stream that continues at a resumed step (:func:`batch_stream`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["ShardSampler", "batch_stream"]


class ShardSampler(DistributedSampler):
    """``DistributedSampler`` (same shuffling and padding: every rank gets
    ``ceil(N / world)`` indices per epoch, permutation seeded by ``seed + epoch``) that can
    start an epoch part-way: :meth:`set_start` skips the first ``start`` indices of this
    rank's shard (exact resume without reading the skipped data)."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def batch_stream(
    loader: DataLoader, sampler: ShardSampler, start_step: int, steps_per_epoch: int, batch_size: int
) -> Iterator[Mapping[str, Any]]:
    """Endless batches continuing at ``start_step``: epoch ``s // steps_per_epoch``, starting
    ``(s % steps_per_epoch) · batch_size`` indices into this rank's shard."""
    s = start_step
    while True:
        epoch, off = divmod(s, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(off * batch_size)
        n = 0
        for batch in loader:
            yield batch
            s += 1
            n += 1
            if off + n >= steps_per_epoch:
                break
