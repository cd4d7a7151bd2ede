"""Endless loaders and batches that mix human and pseudo samples at a fixed ratio.

A mixed batch holds exactly `n_human` human samples first, then `n_pseudo` pseudo
samples (docs/design.md, Mixed batches; 1:1 by default, as in the paper). Both streams are
endless and seeded, so a training stage restarted at step k gets a fresh stream
seeded by (seed, k).

With several training processes (ranks), each draws its own part of the global batch:
- human samples: every rank walks the same seeded global order and takes its block of
  each step's global batch (rank r: positions [r*b, (r+1)*b) of the step's B = N*b), so
  the N per-rank batches of a step together are exactly the one-process batch;
- pseudo samples: the shards whose sidecar holds a label are split over (rank, loader
  worker) pairs, so no image shard is read by two processes (when there are fewer such
  shards than pairs, the samples are split instead); a shard the teacher left empty
  goes to no one, so no reader is left without samples. Each rank's stream is fixed by
  the seed; their union covers the pool, but a step's pseudo samples differ from a
  one-process run's.
Augmentation randomness is drawn per rank (`rank_seed`), never shared between ranks.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from data import storage
from data.augment import Augment, as_augment
from data.shards import decode_image, image_bytes, iter_shard, iter_with_sidecar

# Loader workers start from a fork server, not by forking the training process: a
# process that has initialized CUDA, or that runs Prefect's threads and event loop,
# cannot be forked safely (forked workers of a Prefect task die at exit with code 1).
WORKER_CONTEXT = "forkserver"


def _set_environment(values: dict[str, str], worker_id: int) -> None:
    os.environ.update(values)


def loader_options(num_workers: int) -> dict:
    """DataLoader keyword arguments for `num_workers` worker processes."""
    if num_workers == 0:
        return {"num_workers": 0}
    # The fork server's environment may predate the storage settings (credentials a
    # Prefect job set, a test's S3 endpoint): each worker gets this process's.
    return {
        "num_workers": num_workers,
        "multiprocessing_context": WORKER_CONTEXT,
        "worker_init_fn": functools.partial(_set_environment, storage.settings()),
    }


def rank_seed(seed: int, rank: int) -> int:
    """`seed` for rank 0; for other ranks a 63-bit seed derived from (seed, rank)."""
    return seed if rank == 0 else random.Random(f"{seed}-rank-{rank}").getrandbits(63)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")


def list_collate(samples: list) -> list:
    """Keep a loader's batch as a list of samples (the family collates the mix)."""
    return samples


class InfiniteSampler(Sampler[int]):
    """Endless reshuffled passes over range(n), seeded; this rank's share of it.

    The global stream is the same on every rank (same seed). It is cut into blocks of
    `block` indices (a rank's batch size) dealt round-robin: rank r gets blocks r, r+N,
    r+2N, ... With world_size=1 it is the whole stream.
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, block: int = 1):
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        _check_rank(rank, world_size)
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.n, self.seed = n, seed
        self.rank, self.world_size, self.block = rank, world_size, block

    def _global(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        if self.world_size == 1:
            yield from self._global()
            return
        for position, index in enumerate(self._global()):
            if (position // self.block) % self.world_size == self.rank:
                yield index


def _has_record(sidecar: str) -> bool:
    """Whether a sidecar shard holds a record; reads only its first one."""
    records = iter_shard(sidecar)
    try:
        return next(records, None) is not None
    finally:
        records.close()


class PseudoLabeledShards(IterableDataset):
    """Endless stream of augmented pseudo-labeled samples from (image shard, sidecar) pairs.

    Each image shard is read in lockstep with its sidecar (`iter_with_sidecar`), so only
    kept images appear. The (rank, loader worker) pairs split the shards whose sidecar
    holds a label (`labeled_pairs`); samples pass through a shuffle buffer. Yields
    `(image uint8 [3,S,S], target)` like a labeled dataset. `rank`/`world_size`: this
    training process among all of them.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        decode_label: Callable[[bytes], dict],
        sidecar_ext: str,
        augment_level: str | Augment,
        size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        loop: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not pairs:
            raise ValueError("no pseudo-label shards to read")
        _check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.pairs = list(pairs)
        self.decode_label = decode_label
        self.sidecar_ext = sidecar_ext
        self.augment, self.size = as_augment(augment_level), size
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        self._labeled: list[tuple[str, str]] | None = None

    def labeled_pairs(self) -> list[tuple[str, str]]:
        """The pairs whose sidecar holds at least one label, in the given order.

        Found once per dataset by reading the first record of each sidecar (the sidecar
        tar itself, whatever stats lie beside it), before the dataset is copied to loader
        workers (`__getstate__`), so every reader deals the same shards. A shard whose
        teacher kept nothing would leave the readers dealt only such shards without a
        sample. Raises RuntimeError naming the sidecars when none holds a label.
        """
        if self._labeled is None:
            sidecars = [str(side) for _, side in self.pairs]
            with ThreadPoolExecutor(min(16, len(sidecars))) as pool:  # remote sidecars: one round trip each
                has = list(pool.map(_has_record, sidecars))
            labeled = [pair for pair, h in zip(self.pairs, has) if h]
            if not labeled:
                shown = ", ".join(sidecars[:5]) + (f" and {len(sidecars) - 5} more" if len(sidecars) > 5 else "")
                raise RuntimeError(
                    f"no labeled record in any of the {len(sidecars)} pseudo-label sidecar(s) ({shown}): "
                    "no image passed the pseudo-label rule"
                )
            self._labeled = labeled
        return self._labeled

    def __getstate__(self) -> dict:
        self.labeled_pairs()
        return self.__dict__.copy()

    def _records(self, rng: random.Random, reader: int, readers: int):
        order = list(self.labeled_pairs())
        rng.shuffle(order)
        if len(order) >= readers:
            for image_shard, sidecar in order[reader::readers]:
                for _, record, side in iter_with_sidecar(image_shard, sidecar):
                    yield record, side
            return
        # fewer labeled shards than readers: split samples instead, over as many passes
        # as it takes to give every reader one (fewer kept images than readers)
        i = 0
        while True:
            start = i
            for image_shard, sidecar in order:
                for _, record, side in iter_with_sidecar(image_shard, sidecar):
                    if i % readers == reader:
                        yield record, side
                    i += 1
            if i >= readers or i == start:
                return

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # readers: every loader worker of every rank; with one rank, reader == worker
        reader, readers = self.rank * workers + worker, self.world_size * workers
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}-{epoch}-{reader}")
            buffer: list = []
            seen = 0
            for item in self._records(random.Random(f"{self.seed}-{epoch}"), reader, readers):
                seen += 1
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield self._sample(buffer.pop(rng.randrange(len(buffer))))
            rng.shuffle(buffer)
            for item in buffer:
                yield self._sample(item)
            if seen == 0:  # looping again would spin forever (a sidecar emptied since it was read)
                raise RuntimeError(
                    f"pseudo-label reader {reader}/{readers} found no labeled record in the "
                    f"{len(self.labeled_pairs())} labeled shard pair(s) ({self.labeled_pairs()[0][1]} ...)"
                )
            epoch += 1
            if not self.loop:
                return

    def _sample(self, item):
        record, side = item
        _, data = image_bytes(record)
        image = decode_image(data)
        target = self.decode_label(side[self.sidecar_ext])
        return self.augment(image, target, self.size)


def endless_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[list]:
    """Endless iterator of lists of `batch_size` samples (map-style or iterable dataset).

    batch_size: this rank's share of the global batch. A map-style dataset is read in
    the global order of `InfiniteSampler(seed)`, this rank's blocks; an iterable dataset
    splits itself by rank (build it with the same rank). Loader workers' random seeds
    come from `rank_seed(seed, rank)`.
    """
    _check_rank(rank, world_size)
    g = torch.Generator().manual_seed(rank_seed(seed, rank))
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
    sampler = InfiniteSampler(len(dataset), seed, rank, world_size, block=batch_size)
    return iter(DataLoader(dataset, sampler=sampler, **common))


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
