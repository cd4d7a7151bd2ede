"""The shard labeling loop: one image shard in, one sidecar label shard out (no Prefect).

`<pseudo>/labels-NNNNNN.tar` holds `{key}.{ext}` for the images the teacher kept, in
the image shard's order; `<pseudo>/labels-NNNNNN.json` (written after the tar) holds
the shard's counts and the digest of its inputs (its `key`), so a finished shard is
never labeled twice: a run killed mid-way resumes with the shards whose json is
missing or records another key. Both files are written to a temporary name and
renamed, so a final name never holds a partial file, and the json's presence means
its tar is complete. A corrupt image is logged with its shard and key, counted,
skipped. A shard that cannot be read to its end (cut off, not a tar, an empty file)
has its readable records labeled; its json counts it as broken and holds the error,
and is as final as any other, so the shard is not read again until its content (and
so the key) changes.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from configs import PseudoLabelConfig
from data import storage
from data.shards import (
    CorruptImageError,
    ImageTooLargeError,
    ShardReadError,
    decode_image,
    image_bytes,
    iter_shard,
    write_shard,
)
from engine.contract import Family
from engine.loop import autocast
from engine.rundir import atomic_write_json, json_digest, read_json

log = logging.getLogger("noisy_student.labeling")


def sidecar_paths(out_dir: str | Path, index: int) -> tuple[Path | str, Path | str]:
    """The sidecar tar and json of shard `index` in `out_dir` (a folder or an object-storage URL)."""
    return storage.join(out_dir, f"labels-{index:06d}.tar"), storage.join(out_dir, f"labels-{index:06d}.json")


def remove_temporaries(out_dir: str | Path, index: int | Iterable[int] | None = None) -> list[Path]:
    """Remove the temporary files of sidecar writes that never finished (a killed run or
    worker leaves `.labels-NNNNNN.{tar,json}.*.tmp` behind): every shard's, or only those
    of shard `index` (or of the shards in it). One listing of the folder, however many
    shards: a folder of 10,000 shards holds 20,000 files. Returns the removed paths. Call
    it only while nothing else writes there."""
    if storage.is_remote(out_dir):
        return []  # objects are uploaded whole: no temporaries on object storage
    wanted = None if index is None else {index} if isinstance(index, int) else set(index)
    removed = []
    try:
        with os.scandir(out_dir) as entries:
            names = sorted(e.name for e in entries if e.name.startswith(".labels-") and e.name.endswith(".tmp"))
    except FileNotFoundError:
        return []
    for name in names:
        number = name[len(".labels-") :].split(".", 1)[0]
        if wanted is None or (number.isdigit() and int(number) in wanted):
            p = Path(out_dir) / name
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def finished_shards(out_dir: str | Path, indices: list[int], keys: list[str]) -> tuple[dict[int, dict], list[int]]:
    """The resume check of labeling: ({index: recorded stats} of the shards among
    `indices` whose sidecar json records their key (of `keys`) and whose tar exists, [the
    other indices]). The flow plans its tasks with it; each task attempt checks its own
    shards again, so a retried attempt keeps what a failed one finished."""
    done, todo = {}, []
    for index, key in zip(indices, keys, strict=True):
        out_tar, out_json = sidecar_paths(out_dir, index)
        stats = read_json(out_json)
        if isinstance(stats, dict) and stats.get("key") == key and storage.exists(out_tar):
            done[index] = stats
        else:
            todo.append(index)
    return done, todo


def empty_stats(num_classes: int) -> dict:
    """Counts every family has; a family's `label_stats` may add more additive keys."""
    return {
        "images": 0,
        "kept": 0,
        "corrupt": 0,
        "too_large": 0,  # images whose header declares more than pseudo.max_image_pixels
        "labels": 0,
        "class_counts": [0] * num_classes,
        # shards not readable to their end, records they cut off, shards without records
        "broken_shards": 0,
        "lost_records": 0,
        "empty_shards": 0,
    }


ADDITIVE_SKIP = frozenset({"key", "shard", "sidecar"})


def add_stats(total: dict, part: dict) -> dict:
    """Sum additive statistics: ints add, lists add elementwise; a key new to `total`
    starts at zero; the bookkeeping keys (key, shard, sidecar) are not summed."""
    out = dict(total)
    for k, v in part.items():
        if k in ADDITIVE_SKIP:
            continue
        if k not in out:
            if isinstance(v, list):
                out[k] = [0] * len(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = 0
            else:
                continue
        if isinstance(v, list):
            base = out[k] + [0] * (len(v) - len(out[k]))
            out[k] = [a + b for a, b in zip(base, v + [0] * (len(base) - len(v)))]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = out[k] + v
    return out


def pool_outputs(prefix: str, per_shard: list[dict], keys: list[str], num_classes: int) -> dict:
    """The pseudo-label stage's outputs from every shard's stats: the sidecar files, the
    (shard, `prefix` + sidecar) pairs the student reads, the stage's digest (its shards'
    keys), the summed stats and the broken shards, each named with its error."""
    per_shard = sorted(per_shard, key=lambda s: s["sidecar"])
    total = empty_stats(num_classes)
    for s in per_shard:
        total = add_stats(total, s)
    return {
        "files": [s["sidecar"] for s in per_shard] + [s["sidecar"].replace(".tar", ".json") for s in per_shard],
        "pairs": [[s["shard"], prefix + s["sidecar"]] for s in per_shard],
        "digest": json_digest(keys),
        "stats": total,
        # Broken shards are final for their content; they are named again on every run.
        "broken": [{"shard": s["shard"], "error": s["error"]} for s in per_shard if s.get("error")],
        "empty": [s["shard"] for s in per_shard if s.get("empty_shards")],
    }


def _decoded_batches(
    shard: str, batch_size: int, damage: list[ShardReadError], threads: int = 1, max_pixels: int | None = None
) -> Iterator[tuple[list[str], list[torch.Tensor], list[str], int]]:
    """(keys, images, skipped keys, how many of those were too large) per batch, in shard
    order, decoded ahead of the teacher. An image is skipped when it cannot be decoded or
    its header declares more than `max_pixels` pixels (then it is never decoded).

    `threads` batches decode at once, each in a thread of its own (PIL's decoders release
    the GIL), and one more is read ahead, so the teacher's forward never waits on a
    decode that could have run meanwhile. A damaged shard ends the batches early; its
    error is appended to `damage`."""

    def decode(records):
        keys, images, corrupt, too_large = [], [], [], 0
        for key, record in records:
            found = image_bytes(record)
            try:
                if found is None:
                    raise CorruptImageError(f"no image member in {sorted(record)}")
                images.append(decode_image(found[1], max_pixels))
                keys.append(key)
            except ImageTooLargeError as err:
                log.warning("image above the pixel limit skipped: shard %s key %s (%s)", shard, key, err)
                corrupt.append(key)
                too_large += 1
            except CorruptImageError as err:
                log.warning("corrupt image skipped: shard %s key %s (%s)", shard, key, err)
                corrupt.append(key)
        return keys, images, corrupt, too_large

    def chunks():
        chunk = []
        try:
            for item in iter_shard(shard):
                chunk.append(item)
                if len(chunk) == batch_size:
                    yield chunk
                    chunk = []
        except ShardReadError as err:
            damage.append(err)
        if chunk:
            yield chunk

    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for chunk in chunks():
            pending.append(pool.submit(decode, chunk))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@torch.inference_mode()
def label_shard(
    family: Family,
    model: nn.Module,
    shard: str,
    out_tar: str | Path,
    out_json: str | Path,
    image_size: int,
    rule: PseudoLabelConfig,
    num_classes: int,
    key: str,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Label one image shard, writing the sidecar tar then its stats json.

    `key` is the digest of everything that decides the labels, recorded in `out_json`;
    the caller skips shards already finished (`finished_shards`). Returns the stats dict:
    images, kept, corrupt, labels, class_counts, broken_shards, lost_records,
    empty_shards, the family's own additive counts, shard, sidecar, and for a broken
    shard `error` (the reason, naming the shard). A broken or empty shard is logged as
    a warning.
    """
    stats = empty_stats(num_classes)
    damage: list[ShardReadError] = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # a model may have none

    def records():
        nonlocal stats
        batches = _decoded_batches(shard, rule.batch_size, damage, rule.decode_threads, rule.max_image_pixels)
        for keys, images, skipped, too_large in batches:
            stats["corrupt"] += len(skipped) - too_large
            stats["too_large"] += too_large
            with autocast(device, rule.amp):
                labels = family.label_images(model, images, image_size, rule) if images else []
            for k, lab in zip(keys, labels):
                stats["images"] += 1
                if lab is None:
                    continue
                stats["kept"] += 1
                stats = add_stats(stats, family.label_stats(lab, num_classes))
                yield k, {family.sidecar_ext: family.encode(lab)}
            if progress is not None:
                progress(len(keys) + len(skipped))

    write_shard(out_tar, records())
    if damage:
        err = damage[0]
        stats.update(broken_shards=1, lost_records=int(err.lost_key is not None), error=str(err))
        log.warning("broken shard %s: its %d readable record(s) were labeled; %s", shard, err.records, err)
    elif stats["images"] + stats["corrupt"] + stats["too_large"] == 0:
        stats["empty_shards"] = 1
        log.warning("shard %s holds no records", shard)
    stats.update({"key": key, "shard": str(shard), "sidecar": storage.name(out_tar)})
    atomic_write_json(out_json, stats)
    return stats
