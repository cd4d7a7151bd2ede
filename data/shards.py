"""Webdataset-compatible tar shards: brace patterns, atomic writing, streaming reading.

A shard is a plain (uncompressed) tar whose members are `{key}.{ext}`; consecutive
members with the same key form one record `{ext: bytes}`. This is the layout that
`webdataset.WebDataset` and `webdataset.TarWriter` use, so shards written here are
read by webdataset and vice versa (docs/design.md, Shards).

- The unlabeled pool holds `{key}.jpg` (or .png/.webp) per record.
- A pseudo-label *sidecar* shard holds a subset of an image shard's keys, in the same
  order; `iter_with_sidecar` reads both in lockstep.

Pure Python + torch/torchvision/PIL; no Prefect here (docs/design.md, Layers).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, islice
from pathlib import Path
from typing import IO

import numpy as np
import torch
from braceexpand import braceexpand

from configs import MAX_IMAGE_PIXELS
from data import storage
from data.files import atomic_write

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# Fixed tar header fields: the same records always give the same bytes, so a shard's
# digest identifies its content (resumable stages compare digests).
_MTIME = 0
_MODE = 0o444
_SIX_DIGITS = 6


class CorruptImageError(ValueError):
    """Image bytes that cannot be decoded (truncated, garbage, unsupported format)."""


class ImageTooLargeError(CorruptImageError):
    """An image whose header declares more pixels than the limit: it is never decoded
    (a 20,000 x 20,000 PNG of 400 KB would take 1.2 GB), so readers that skip corrupt
    images skip it too."""


# --------------------------------------------------------------------------- patterns


def expand_urls(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths named by brace patterns, in order.

    `pattern` is one pattern (`pool-{000000..000012}.tar`, `{a,b}.tar`,
    `s3://bucket/pool-{000000..000012}.tar`, a webdataset `pipe:` command) or a sequence
    of patterns. A string is always one pattern, spaces and all: folders such as
    `my projects/` are common, so several patterns are a list (a YAML list in a config),
    never a string split at whitespace. Each is expanded with `braceexpand`; the results
    are concatenated in the given order (duplicates are kept: the caller decides). An
    empty string gives [].
    """
    if isinstance(pattern, (str, os.PathLike)):
        parts = [os.fspath(pattern)]
    else:
        parts = []
        for p in pattern:
            if not isinstance(p, (str, os.PathLike)):
                raise TypeError(f"shard pattern must be a string or path, got {type(p).__name__}: {p!r}")
            parts.append(os.fspath(p))
    return [url for part in parts if part.strip() for url in braceexpand(part.strip())]


def brace_pattern(prefix: str, count: int, suffix: str = ".tar") -> str:
    """`{prefix}-{000000..NNNNNN}{suffix}` naming `count` shards ('' when count is 0).

    One shard gives the plain name `{prefix}-000000{suffix}` (no braces needed).
    """
    if count < 0:
        raise ValueError(f"shard count must be >= 0, got {count}")
    if count == 0:
        return ""
    if count == 1:
        return f"{prefix}-{0:0{_SIX_DIGITS}d}{suffix}"
    return f"{prefix}-{{{0:0{_SIX_DIGITS}d}..{count - 1:0{_SIX_DIGITS}d}}}{suffix}"


def shard_name(prefix: str, index: int, suffix: str = ".tar") -> str:
    """`{prefix}-{index:06d}{suffix}`."""
    return f"{prefix}-{index:0{_SIX_DIGITS}d}{suffix}"


# ---------------------------------------------------------------------- write / read


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"invalid shard key {key!r}: keys must be non-empty and contain no '.' or '/'")
    return key


def _check_ext(key: str, ext: object) -> str:
    # Dots are allowed inside an extension (webdataset's "seg.png" style), slashes not.
    if not isinstance(ext, str) or not ext or "/" in ext or ext.startswith("."):
        raise ValueError(f"invalid extension {ext!r} for key {key!r}")
    return ext


def write_shard(path: str | os.PathLike, records: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write records to a tar shard at `path` (a local path or an object-storage URL),
    atomically; return the number of records.

    Each record `(key, {ext: bytes})` becomes members `{key}.{ext}` (extensions in
    sorted order), records in iteration order, written by webdataset's TarWriter. Keys
    must be non-empty, contain no '.' or '/', and be unique within the shard (ValueError
    naming the key otherwise); values must be bytes-like (TypeError). The tar goes to a
    hidden temporary file beside `path` and is renamed into place only when complete
    (an object is uploaded whole), so `path` never holds a partial shard; on any error
    the temporary file is removed and the error re-raised. Header fields are fixed
    (mtime 0, mode 0444, uid/gid 0, no user names), so the same records always give
    byte-identical files. Parent folders are created.
    """
    import webdataset as wds

    count = 0
    seen: set[str] = set()

    def samples() -> Iterator[dict]:
        nonlocal count
        for key, members in records:
            _check_key(key)
            if key in seen:
                # A repeated key would merge or split records on reading.
                raise ValueError(f"duplicate shard key {key!r} in {storage.text(path)}")
            seen.add(key)
            sample: dict = {"__key__": key}
            for ext, data in members.items():
                _check_ext(key, ext)
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise TypeError(f"member {key}.{ext} must be bytes, got {type(data).__name__}")
                sample[ext] = bytes(data)
            count += 1
            yield sample

    def write(f) -> None:
        # encoder=False: members are stored as the bytes given; TarWriter sorts them by
        # extension. user/group "" and mtime 0 keep the bytes a function of the records.
        with wds.TarWriter(f, user="", group="", mode=_MODE, mtime=_MTIME, encoder=False, format="PAX_FORMAT") as sink:
            for sample in samples():
                sink.write(sample)

    # Hidden temporary name not ending in .tar: a leftover never matches a shard pattern.
    atomic_write(path, write)
    return count


# webdataset skips `__key__`-style meta members entirely.
_META = r"__[^/]*__($|/)"
_BLOCK = 512


class ShardReadError(tarfile.ReadError):
    """A shard that cannot be read to its end: cut off, not a tar, an empty file.

    `records` records were read before the error; `lost_key` is the key of the record
    the error cut off (None when it struck between records). The message names the shard.
    """

    def __init__(self, path: str, records: int, lost_key: str | None, reason: str):
        self.path, self.records, self.lost_key, self.reason = path, records, lost_key, reason
        at = f"record {lost_key!r} cut off" if lost_key is not None else "between records"
        super().__init__(f"shard {path} is unreadable after {records} record(s) ({at}): {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.records, self.lost_key, self.reason)


# What a damaged tar raises while it is read: tarfile's own errors, and the
# decompressors' for a damaged .tar.gz. OSError (a failing disk or mount) is not one.
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class _Tail(io.RawIOBase):
    """A reader that remembers how many bytes passed and the last block of them.

    Past its first member tarfile takes any unreadable header for the end of the archive,
    so a shard cut off at or inside a header would read as complete. A whole tar is a
    run of 512-byte blocks ending in zero blocks (the end-of-archive marker and the
    record padding): `ended_properly` checks that, once the stream has been drained."""

    def __init__(self, f: IO[bytes], head: bytes = b""):
        self.f, self.head, self.total, self.last = f, head, 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.head:
            data, self.head = self.head[: len(buf)], self.head[len(buf) :]
        else:
            data = self.f.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.total += n
        self.last = (self.last + data)[-_BLOCK:]
        return n

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def ended_properly(self) -> bool:
        return self.total > 0 and self.total % _BLOCK == 0 and self.last == bytes(_BLOCK)


def _open_stream(path: str) -> IO[bytes]:
    """A binary stream of a shard: `pipe:command` through webdataset's gopen (as in its
    shard lists), any other URL or path through data.storage (fsspec)."""
    if path.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(path, "rb")
    return storage.open_read(path)


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream `(key, {ext: bytes})` records from a tar shard, in member order.

    `path` is a local path, an object-storage URL (`s3://bucket/pool-000000.tar`) or a
    webdataset `pipe:` command. The tar is read sequentially by webdataset's own
    readers (`tar_file_iterator`, one member in memory at a time, then `group_by_keys`:
    consecutive members with the same key form one record, the key being the path up
    to the first '.' of the file name, the extension lower-cased; members without an
    extension and `__meta__` members are skipped; a key that reappears after another
    key starts a new record). Gzip-compressed tars are accepted. A repeated extension
    within one record raises ValueError.

    A damaged shard (cut off anywhere, garbage, an empty file, no end-of-archive
    marker) raises ShardReadError after the records read before the damage were
    yielded: a record whose members were all read when the damage is met is yielded,
    the one whose member was being read is lost (its key is in the error). A file that
    cannot be opened raises OSError as usual.
    """
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

    path = storage.text(path)
    yielded = 0
    reading: list[str] = []  # the member tar_file_iterator is reading (webdataset's hook runs before its read)
    damage: list[BaseException] = []

    def select(fname: str) -> bool:
        reading[:] = [fname]
        return True

    def members(tail: _Tail) -> Iterator[dict]:
        try:
            for member in tar_file_iterator(tail, skip_meta=_META, select_files=select):
                member["__url__"] = path
                reading.clear()
                yield member
            tail.drain()
            if not tail.ended_properly():
                raise tarfile.ReadError(f"no end-of-archive marker after {tail.total} bytes")
        except _DAMAGED as err:
            damage.append(err)  # stop here: group_by_keys yields what it holds, checked below

    with _open_stream(path) as raw:
        head = raw.read(2)
        source: IO[bytes] = raw
        if head == b"\x1f\x8b":  # gzip: the tar (and its end) is checked after decompression
            source, head = gzip.GzipFile(fileobj=_Tail(raw, head), mode="rb"), b""
        tail = _Tail(source, head)
        lost = None
        pending = None
        try:
            for sample in group_by_keys(members(tail), keys=base_plus_ext, lcase=True):
                if pending is not None:
                    yielded += 1
                    yield pending
                key = sample.pop("__key__")
                sample.pop("__url__", None)
                pending = (key, sample)
            if damage and reading:
                lost = base_plus_ext(reading[0])[0]
            if pending is not None and pending[0] != lost:
                # the last record is whole unless the damage struck inside one of its members
                yielded += 1
                yield pending
        finally:
            if source is not raw:
                source.close()
        if damage:
            err = damage[0]
            # webdataset appends " @ <stream object>" to the messages it passes on
            reason = str(err).split(" @ <", 1)[0]
            raise ShardReadError(path, yielded, lost, f"{type(err).__name__}: {reason}") from err


def image_bytes(record: dict[str, bytes]) -> tuple[str, bytes] | None:
    """The first image member of a record as `(ext, bytes)`, in IMAGE_EXTS order; None if none.

    Extensions are compared case-insensitively.
    """
    lowered = {ext.lower(): ext for ext in record}
    for ext in IMAGE_EXTS:
        if ext in lowered:
            return ext, record[lowered[ext]]
    return None


def iter_with_sidecar(
    image_shard: str | os.PathLike, sidecar_shard: str | os.PathLike
) -> Iterator[tuple[str, dict[str, bytes], dict[str, bytes]]]:
    """Yield `(key, image_record, sidecar_record)` for keys present in both shards.

    The sidecar holds a subset of the image shard's keys in the same order (images the
    teacher left empty, or corrupt ones, are absent). Both shards are streamed once, in
    lockstep: image records are skipped until the next sidecar key. A sidecar key that
    is not found (absent, or out of order) raises ValueError naming both shards and the
    key, after the matched records before it were yielded.
    """
    images = iter_shard(image_shard)
    sidecar = iter_shard(sidecar_shard)
    try:
        for side_key, side_record in sidecar:
            for key, record in images:
                if key == side_key:
                    yield key, record, side_record
                    break
            else:
                raise ValueError(
                    f"sidecar shard {storage.text(sidecar_shard)} has key {side_key!r} that is not in "
                    f"image shard {storage.text(image_shard)} (or not in the same order)"
                )
    finally:
        # Close both files now, also when the consumer stops early.
        images.close()
        sidecar.close()


# --------------------------------------------------------------------------- identity

# A shard is identified by the sha256 of its bytes, so any change of content changes
# its identity, while rewriting the same bytes (a restore, a re-download, `touch`) does
# not, and its shard is not labeled again. Partial hashes are cheaper (about 2 ms for
# the first and last MiB of a 100 MB file) but miss a change inside a member, and an
# identity holding the mtime relabels a shard whenever its file is rewritten unchanged.
# A full hash costs about 155 ms per 100 MB shard on one core here (about 4 minutes
# for 1,700 such shards, spread over threads; under 1% of what labeling them costs),
# and only once: digests are cached by (size, mtime_ns, ctime_ns, inode), which every
# write or replacement of the file changes. ctime cannot be set back from user space
# (`touch -d`, `cp -p` and `rsync -t` set mtime only), so a regenerated shard never
# inherits a stale digest, and a later run costs one stat per shard.
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def remote_identity(url: str) -> dict:
    """`{"path", "size", "etag"}` of an object: the store's own checksum of its bytes
    (S3's ETag, an MD5 of the content or of its parts; GCS's md5Hash or crc32c), which
    changes with any change of content and is known without reading the object."""
    meta = storage.info(url)
    tag = next((meta[k] for k in ("ETag", "etag", "md5Hash", "crc32c") if meta.get(k)), None)
    if tag is None:  # a backend without a content checksum: hash the bytes once
        h = hashlib.sha256()
        with storage.open_read(url) as f:
            while block := f.read(_HASH_CHUNK):
                h.update(block)
        tag = "sha256:" + h.hexdigest()
    return {"path": url, "size": int(meta.get("size", 0)), "etag": str(tag).strip('"')}


def shard_identities(
    paths: Sequence[str | os.PathLike], cache_path: str | os.PathLike | None = None, threads: int = 4
) -> list[dict]:
    """`{"path": resolved path, "size": bytes, "sha256": hex}` per local shard file, in order;
    `{"path": url, "size": bytes, "etag": checksum}` per object-storage URL (`remote_identity`).

    Local digests are looked up in the json file `cache_path` (when given) by resolved path
    and (size, mtime_ns, ctime_ns, inode); the others are hashed, in up to `threads`
    threads, and the cache is rewritten atomically. A cache that is missing or
    unreadable is rebuilt. Raises FileNotFoundError naming every missing shard.
    """
    names = [storage.text(p) for p in paths]
    urls = list(dict.fromkeys(n for n in names if storage.is_remote(n)))
    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        remote = dict(zip(urls, pool.map(_remote_or_none, urls)))
    resolved = {n: storage.local(n).resolve() for n in names if n not in remote}
    missing = [n for n in names if (remote[n] is None if n in remote else not resolved[n].is_file())]
    if missing:
        raise FileNotFoundError(f"unlabeled shard(s) not found: {', '.join(missing)}")
    local = _local_identities(list(dict.fromkeys(resolved.values())), cache_path, threads)
    return [remote[n] if n in remote else local[resolved[n]] for n in names]


def _remote_or_none(url: str) -> dict | None:
    try:
        return remote_identity(url)
    except FileNotFoundError:
        return None


def _local_identities(resolved: list[Path], cache_path: str | os.PathLike | None, threads: int) -> dict[Path, dict]:
    stats = {str(r): os.stat(r) for r in resolved}
    cache: dict = {}
    if cache_path is not None:
        try:
            cache = json.loads(storage.read_bytes(cache_path))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            cache = {}
        if not isinstance(cache, dict):
            cache = {}
    digests = {}
    for path, st in stats.items():
        entry = cache.get(path)
        if isinstance(entry, dict) and entry.get("stat") == _stat_key(st) and isinstance(entry.get("sha256"), str):
            digests[path] = entry["sha256"]
    todo = [p for p in stats if p not in digests]
    if todo:
        with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:  # hashlib releases the GIL
            digests.update(zip(todo, pool.map(file_sha256, todo)))
        if cache_path is not None:
            for path in todo:
                cache[path] = {"stat": _stat_key(stats[path]), "sha256": digests[path]}
            _atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return {r: {"path": str(r), "size": stats[str(r)].st_size, "sha256": digests[str(r)]} for r in resolved}


# --------------------------------------------------------------------------- decoding


def _decode_torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    # bytearray: torch.frombuffer needs a writable buffer (else it warns).
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    img = tv_decode(buf, mode=ImageReadMode.RGB)
    if img.ndim == 4:  # animated image: first frame
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise RuntimeError(f"unexpected decoded dtype {img.dtype}")
    return img


def _decode_pil(data: bytes) -> torch.Tensor:
    from PIL import Image

    # PIL raises on truncated files as long as ImageFile.LOAD_TRUNCATED_IMAGES is False
    # (its default); nothing here changes that global.
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.int64)
            arr = np.clip(arr >> 8 if im.mode.startswith("I;16") else arr, 0, 255).astype(np.uint8)
            arr = np.repeat(arr[..., None], 3, axis=2)
        else:
            arr = np.array(im.convert("RGB"))  # a writable copy for torch.from_numpy
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def declared_pixels(data: bytes) -> float | None:
    """Width x height that an image's header declares, read without decoding a pixel;
    inf when PIL refuses the header itself (more than twice its own limit); None when
    PIL cannot read the header (the decoder then says why)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return float(im.size[0] * im.size[1])
    except Image.DecompressionBombError:
        return math.inf
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode JPEG/PNG/WebP bytes to a uint8 tensor [3,H,W], RGB.

    Grayscale, RGBA (alpha dropped), palette and CMYK images are converted to RGB;
    16-bit PNGs keep their high byte; an animated image gives its first frame. EXIF
    orientation is not applied (the same pixels for teacher and student). Decoding uses
    torchvision's native decoders and falls back to PIL for what they refuse. Raises
    CorruptImageError for empty, garbage or truncated data, and ImageTooLargeError,
    before any pixel is decoded, for an image whose header declares more than
    `max_pixels` pixels (None: no limit).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise CorruptImageError("empty image data")
    data = bytes(data)
    if max_pixels is not None and (pixels := declared_pixels(data)) is not None and pixels > max_pixels:
        declared = f"more than {2 * MAX_IMAGE_PIXELS:,}" if math.isinf(pixels) else f"{pixels:,.0f}"
        raise ImageTooLargeError(
            f"its header declares {declared} pixels, above the limit of {max_pixels:,}; not decoded"
        )
    try:
        return _decode_torchvision(data)
    except Exception as tv_err:  # torchvision raises RuntimeError for bad data
        try:
            return _decode_pil(data)
        except Exception as pil_err:
            raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {pil_err}; {tv_err}") from pil_err


# ------------------------------------------------------------------ folder converter


def _folder_key(rel_stem: str) -> str:
    key = rel_stem.replace("/", "_").replace(".", "_")
    return key or "_"


def build_shards_from_folder(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    per_shard: int = 1000,
    prefix: str = "pool",
    progress: Callable[[int, int], None] | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> dict:
    """Convert an image folder (ImageNet or OpenImages layout) to webdataset shards.

    Files under `image_dir` (recursively) ending in .jpg/.jpeg/.png/.webp (any case) are
    taken in sorted relative-path order. Each is decoded once as a check; corrupt ones
    are skipped, counted and listed, and so are images whose header declares more than
    `max_pixels` pixels (never decoded: `decode_image`); `workers` threads check files
    at once (default: every core). A valid image is stored with its original bytes as
    `{key}.{ext}`, ext lower-cased and jpeg written as jpg; key = relative path without
    extension, '/' and '.' replaced by '_', with `_1`, `_2`, ... appended on collision.
    Shards `{prefix}-000000.tar`, ... of `per_shard` images each (the last may be
    shorter) are written atomically, then `{out_dir}/shards.json`:
    `{"shards": [names], "images": n, "corrupt": n, "corrupt_files": [relative paths],
    "too_large": n, "too_large_files": [relative paths], "max_pixels": N,
    "per_shard": N, "pattern": "pool-{000000..00000K}.tar" (None if no image was valid)}`.
    Shard files `{prefix}-NNNNNN.tar` left in `out_dir` by an earlier, longer run are
    removed so a glob never mixes the two. `progress(done_files, total_files)` is called
    after each file. Raises ValueError if per_shard < 1, image_dir is not a folder, the
    prefix is not a valid key-like name, or no image file is found.
    """
    if not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"per_shard must be an integer >= 1, got {per_shard!r}")
    if not prefix or "/" in prefix:
        raise ValueError(f"invalid shard prefix {prefix!r}")
    workers = workers or os.cpu_count() or 1
    root = Path(image_dir)
    if not root.is_dir():
        raise ValueError(f"image_dir does not exist or is not a folder: {os.fspath(image_dir)}")
    out = Path(out_dir)

    files: list[tuple[str, str]] = []  # (relative posix path, lower-case ext)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            stem, dot, ext = name.rpartition(".")
            if dot and ext.lower() in IMAGE_EXTS:
                rel = Path(dirpath, name).relative_to(root).as_posix()
                files.append((rel, ext.lower()))
    files.sort()
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_EXTS)} files under {os.fspath(image_dir)}")
    total = len(files)

    corrupt_files: list[str] = []
    too_large_files: list[str] = []
    used: set[str] = set()
    done = 0

    def checked(rel: str) -> tuple[bytes, str]:
        """A file's bytes and its verdict: ok, corrupt or too_large (decoded once as a check)."""
        data = (root / rel).read_bytes()
        try:
            decode_image(data, max_pixels)
        except ImageTooLargeError:
            return data, "too_large"
        except CorruptImageError:
            return data, "corrupt"
        return data, "ok"

    def in_order() -> Iterator[tuple[str, str, bytes, str]]:
        """Every file checked, in sorted order, by `workers` threads at once (the
        decoders release the GIL), with at most a few images per worker in memory."""
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            for rel, ext in files:
                pending.append((rel, ext, pool.submit(checked, rel)))
                if len(pending) >= 4 * workers:
                    rel0, ext0, fut = pending.popleft()
                    yield rel0, ext0, *fut.result()
            while pending:
                rel0, ext0, fut = pending.popleft()
                yield rel0, ext0, *fut.result()

    def valid_records() -> Iterator[tuple[str, dict[str, bytes]]]:
        nonlocal done
        for rel, ext, data, verdict in in_order():
            if verdict == "too_large":
                too_large_files.append(rel)
            elif verdict == "corrupt":
                corrupt_files.append(rel)
            ok = verdict == "ok"
            done += 1
            if progress is not None:
                progress(done, total)
            if not ok:
                continue
            base = _folder_key(rel[: -(len(ext) + 1)])
            key, n = base, 0
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            yield key, {"jpg" if ext == "jpeg" else ext: data}

    # Stream: one shard's worth of records is pulled lazily from the file walk, so
    # only one image is in memory at a time.
    stream = valid_records()
    shards: list[str] = []
    images = 0
    while True:
        first = next(stream, None)
        if first is None:
            break
        name = shard_name(prefix, len(shards))
        images += write_shard(out / name, chain([first], islice(stream, per_shard - 1)))
        shards.append(name)

    manifest = {
        "shards": shards,
        "images": images,
        "corrupt": len(corrupt_files),
        "corrupt_files": corrupt_files,
        "too_large": len(too_large_files),
        "too_large_files": too_large_files,
        "max_pixels": max_pixels,
        "per_shard": per_shard,
        "pattern": brace_pattern(prefix, len(shards)) or None,
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "shards.json", json.dumps(manifest, indent=2) + "\n")

    stale = re.compile(rf"^{re.escape(prefix)}-(\d{{{_SIX_DIGITS}}})\.tar$")
    for entry in out.iterdir():
        m = stale.match(entry.name)
        if m and int(m.group(1)) >= len(shards) and entry.is_file():
            entry.unlink()
    return manifest


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
