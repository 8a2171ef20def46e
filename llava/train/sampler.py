"""Length-grouped sampling that keeps image and text-only samples in separate batches.

LLaVA's ``group_by_modality_length``: a batch of text-only samples does not pay for image positions and
similar lengths pad little. [VisionZip-LLaVA] The order is a function of (seed, epoch) only (the original
draws from the global RNG), so a resumed run that skips the batches it has already seen continues with
exactly the samples the interrupted run would have used.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


def balanced_split(indices: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Split ``indices`` (sorted longest first) into ``parts`` equal-size groups of similar total length:
    each index goes to the lightest group that still has room."""
    capacity = len(indices) // parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for index in indices:
        open_groups = [g for g in range(parts) if len(groups[g]) < capacity]
        target = min(open_groups, key=lambda g: totals[g])
        groups[target].append(index)
        totals[target] += lengths[index]
    return groups


def megabatches(indices: list[int], lengths: list[int], megabatch_size: int, world_size: int) -> list[list[int]]:
    """Consecutive chunks of ``megabatch_size`` (one step over all processes), each sorted by length and
    balanced across processes; the last chunk may be short and is returned as is (sorted)."""
    chunks = []
    for start in range(0, len(indices), megabatch_size):
        chunk = sorted(indices[start : start + megabatch_size], key=lambda i: lengths[i], reverse=True)
        if len(chunk) == megabatch_size:
            chunk = [i for group in balanced_split(chunk, lengths, world_size) for i in group]
        chunks.append(chunk)
    return chunks


def modality_grouped_order(
    modality_lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A permutation of the dataset in which every full megabatch (``batch_size * world_size``
    consecutive indices) holds one modality. ``modality_lengths``: positive for image samples, negative
    for text-only ones. The two remainders (one per modality) form the final, possibly mixed, steps."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
    lengths = [abs(length) for length in modality_lengths]
    megabatch_size = batch_size * world_size
    groups = []
    remainders: list[int] = []
    for wanted_image in (True, False):
        members = [i for i, length in enumerate(modality_lengths) if (length > 0) == wanted_image]
        if not members:
            continue
        shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        chunks = megabatches(shuffled, lengths, megabatch_size, world_size)
        if len(chunks[-1]) < megabatch_size:
            remainders.extend(chunks.pop())
        groups.extend(chunks)
    order = [groups[j] for j in torch.randperm(len(groups), generator=generator).tolist()]
    return [i for chunk in order for i in chunk] + remainders


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields the whole dataset once per epoch, in ``modality_grouped_order``; ``set_epoch`` reshuffles.

    It returns indices for all processes: the data loader (accelerate) hands consecutive batches of
    ``batch_size`` to processes in turn, so each megabatch becomes one step on every process.
    """

    def __init__(self, modality_lengths: list[int], batch_size: int, world_size: int, seed: int = 0):
        self.modality_lengths = list(modality_lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_order(self.modality_lengths, self.batch_size, self.world_size, generator))
