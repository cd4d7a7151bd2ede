"""Endless loaders and batches that mix human and pseudo samples at a fixed ratio.

A mixed batch holds exactly `n_human` human samples first, then `n_pseudo` pseudo
samples (DESIGN.md section 7; 1:1 by default, as in the paper). Both streams are
endless and seeded, so a training stage restarted at step k gets a fresh stream
seeded by (seed, k).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from data.augment import apply_level
from data.shards import decode_image, image_bytes, iter_with_sidecar


# Loader workers start from a fork server, not by forking the training process: a
# process that has initialized CUDA, or that runs Prefect's threads and event loop,
# cannot be forked safely (forked workers of a Prefect task die at exit with code 1).
WORKER_CONTEXT = "forkserver"


def loader_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for `num_workers` worker processes."""
    if num_workers == 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": WORKER_CONTEXT}


def list_collate(samples: list) -> list:
    """Keep a loader's batch as a list of samples (the family collates the mix)."""
    return samples


class InfiniteSampler(Sampler[int]):
    """Endless reshuffled passes over range(n), seeded."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()


class PseudoLabeledShards(IterableDataset):
    """Endless stream of augmented pseudo-labeled samples from (image shard, sidecar) pairs.

    Each image shard is read in lockstep with its sidecar (`iter_with_sidecar`), so only
    kept images appear. Loader workers split the shards; samples pass through a shuffle
    buffer. Yields `(image uint8 [3,S,S], target)` like a labeled dataset.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        decode_label: Callable[[bytes], dict],
        sidecar_ext: str,
        augment_level: str,
        size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        loop: bool = True,
    ):
        if not pairs:
            raise ValueError("no pseudo-label shards to read")
        self.pairs = list(pairs)
        self.decode_label = decode_label
        self.sidecar_ext = sidecar_ext
        self.augment_level, self.size = augment_level, size
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop

    def _records(self, rng: random.Random, worker: int, workers: int):
        order = list(self.pairs)
        rng.shuffle(order)
        if len(order) >= workers:
            for image_shard, sidecar in order[worker::workers]:
                for _, record, side in iter_with_sidecar(image_shard, sidecar):
                    yield record, side
        else:  # fewer shards than workers: split samples instead
            i = 0
            for image_shard, sidecar in order:
                for _, record, side in iter_with_sidecar(image_shard, sidecar):
                    if i % workers == worker:
                        yield record, side
                    i += 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}-{epoch}-{worker}")
            buffer: list = []
            for item in self._records(random.Random(f"{self.seed}-{epoch}"), worker, workers):
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield self._sample(buffer.pop(rng.randrange(len(buffer))))
            rng.shuffle(buffer)
            for item in buffer:
                yield self._sample(item)
            epoch += 1
            if not self.loop:
                return

    def _sample(self, item):
        record, side = item
        _, data = image_bytes(record)
        image = decode_image(data)
        target = self.decode_label(side[self.sidecar_ext])
        return apply_level(image, target, self.augment_level, self.size)


def endless_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int
) -> Iterator[list]:
    """Endless iterator of lists of `batch_size` samples (map-style or iterable dataset)."""
    g = torch.Generator().manual_seed(seed)
    common = dict(
        batch_size=batch_size,
        collate_fn=list_collate,
        generator=g,
        persistent_workers=num_workers > 0,
        **loader_options(num_workers),
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=True,
    )
    if isinstance(dataset, IterableDataset):
        return iter(DataLoader(dataset, **common))
    return iter(DataLoader(dataset, sampler=InfiniteSampler(len(dataset), seed), **common))


def mixed_batches(
    human: Iterator[list], pseudo: Iterator[list] | None, collate: Callable[[list], dict]
) -> Iterator[dict]:
    """Collated batches of human samples then pseudo samples; `num_human` marks the split."""
    while True:
        samples = next(human)
        num_human = len(samples)
        if pseudo is not None:
            samples = samples + next(pseudo)
        batch = collate(samples)
        batch["num_human"] = num_human
        yield batch
