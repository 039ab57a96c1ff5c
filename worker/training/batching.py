"""Length-grouped batches of preference pairs, in an order that still depends on the seed.

DPO pads a batch's chosen and rejected sequences to the longest of them, so batches of pairs
of similar length waste less compute on padding. Sorting the whole data set would also put
every long pair into the same few optimizer steps in a fixed order, so pairs are sorted only
within windows of a seeded permutation, and the resulting batches are shuffled again.
"""

from collections.abc import Iterator, Sequence

import torch
from datasets import Dataset
from torch.utils.data import Sampler

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_lengths(dataset: Dataset) -> list[int]:
    """Return each tokenized pair's padded width: prompt plus the longer of its two answers."""
    return [
        len(prompt) + max(len(chosen), len(rejected))
        for prompt, chosen, rejected in zip(
            dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
        )
    ]


class LengthBucketSampler(Sampler[int]):
    """Yield every index once, in batches of `batch_size` indices of similar length.

    Each epoch draws a permutation from `seed` and the epoch number, sorts each window of
    `window_batches` batches by length, cuts it into batches and shuffles the batches. The one
    batch that can be smaller than `batch_size` comes last, so that a DataLoader with the same
    batch size cuts the stream at the batch boundaries.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = 16
    ) -> None:
        if batch_size < 1 or window_batches < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and window_batches ({window_batches}) must be >= 1"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.window = batch_size * window_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's order from the seed and `epoch`; the Trainer calls this."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """Return this epoch's batches of indices, in the order they are trained."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        full, partial = [], []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__)
            for offset in range(0, len(window), self.batch_size):
                batch = window[offset : offset + self.batch_size]
                (full if len(batch) == self.batch_size else partial).append(batch)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return shuffled + partial

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
