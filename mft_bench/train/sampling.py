"""Training data order: length-grouped batches, seeded per epoch.

transformers' ``LengthGroupedSampler`` draws from the global torch RNG when ``__iter__`` runs. After a resume that
RNG is in a different state than it was at the same epoch of an uninterrupted run, so the data order (and the
result) would differ. Seeding a private generator with ``seed + epoch`` makes the order a pure function of
(seed, epoch): identical across restarts and across ranks (accelerate then shards the batches).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Indices grouped by length in mega-batches of ``batch_size`` (shuffled), reproducible per (seed, epoch)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def sequence_lengths(dataset) -> list[int]:
    """Token count of every row (from ``input_ids``), read column-wise so a large dataset stays cheap."""
    if hasattr(dataset, "column_names") and "input_ids" in dataset.column_names:
        return [len(ids) for ids in dataset["input_ids"]]
    return [len(row["input_ids"]) for row in dataset]
