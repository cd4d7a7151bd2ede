"""Local paths and object-storage URLs (`s3://`, `gs://`, ...) behind one fsspec layer.

A path without a scheme (or with `file://`) is a local file, handled with the os
module as before; a URL with any other scheme goes through fsspec, which picks the
backend by its scheme: s3fs for `s3://`, gcsfs for `gs://` (installed separately:
`pip install gcsfs`), `memory://` for tests.

Credentials and endpoints are the backends' own settings, read from the environment
of every process that touches the files (the flow, its Dask workers, training ranks):

- S3 and S3-compatible stores (s3fs over botocore): `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY` (`AWS_SESSION_TOKEN`), or `AWS_PROFILE` with
  `~/.aws/credentials`, or an instance role; `AWS_ENDPOINT_URL` (or
  `AWS_ENDPOINT_URL_S3`) for MinIO, Ceph and other S3-compatible servers;
  `AWS_DEFAULT_REGION`.
- Google Cloud Storage (gcsfs): `GOOGLE_APPLICATION_CREDENTIALS` or the metadata server.

Writes never leave a partial file under a final name: a local file is written to a
hidden temporary name beside it and renamed; an object is uploaded whole and appears
only when its upload completes (S3 `PutObject` or a completed multipart upload), and a
failed write discards the upload.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

LOCAL_SCHEMES = ("", "file", "local")


def text(path: Any) -> str:
    """The string form of a path, URL or UPath (a UPath of a URL is no os.PathLike; its str is the URL)."""
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)


# The backends' settings (credentials, endpoints) in the environment: what a process
# needs to reach the store. Processes started from multiprocessing's fork server (data
# loader workers, training ranks) inherit the environment of the moment the server
# started, once per process, so these are handed to them explicitly (`settings`).
SETTINGS_PREFIXES = ("AWS_", "GOOGLE_", "FSSPEC_", "GCSFS_")


def settings() -> dict[str, str]:
    """This process's storage settings from the environment (names in SETTINGS_PREFIXES)."""
    return {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIXES)}


def scheme(path: str | os.PathLike) -> str:
    """The URL scheme of `path` ('' for a plain local path)."""
    s = text(path)
    head, sep, _ = s.partition("://")
    return head.lower() if sep and "/" not in head else ""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object-storage (or other fsspec) URL, not a local file."""
    return scheme(path) not in LOCAL_SCHEMES


def local(path: str | os.PathLike) -> Path:
    """The local Path of a plain path or `file://` URL."""
    s = text(path)
    return Path(s.split("://", 1)[1] if scheme(s) in ("file", "local") else s)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a remote URL. Listings that fsspec cached
    are dropped first: other processes (Dask workers, ranks) write the same store."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(p)
    return fs, p


def join(base: str | os.PathLike, *names: str) -> str | Path:
    """`base/name/...`: a Path for a local base, a '/'-joined URL for a remote one."""
    if not is_remote(base):
        return local(base).joinpath(*names)
    return "/".join([text(base).rstrip("/"), *names])


def parent(path: str | os.PathLike) -> str | Path:
    """The folder holding a path or URL (a Path for a local one)."""
    if not is_remote(path):
        return local(path).parent
    return text(path).rstrip("/").rsplit("/", 1)[0]


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URL."""
    return text(path).rstrip("/").rsplit("/", 1)[-1]


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary file object reading `path` (a local path or a URL)."""
    if not is_remote(path):
        return open(local(path), "rb")
    fs, p = filesystem(text(path))
    return fs.open(p, "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_read(path) as f:
        return f.read()


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return local(path).exists()
    fs, p = filesystem(text(path))
    return fs.exists(p)


def is_file(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return local(path).is_file()
    fs, p = filesystem(text(path))
    return fs.isfile(p)


def info(path: str | os.PathLike) -> dict:
    """The backend's metadata of a remote object (size, ETag, ...); FileNotFoundError if absent."""
    fs, p = filesystem(text(path))
    return fs.info(p)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or object; a missing one is not an error."""
    if not is_remote(path):
        local(path).unlink(missing_ok=True)
        return
    fs, p = filesystem(text(path))
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def list_names(folder: str | os.PathLike) -> list[str]:
    """Names of the entries directly in `folder`, sorted ([] when it does not exist)."""
    if not is_remote(folder):
        try:
            with os.scandir(local(folder)) as entries:
                return sorted(e.name for e in entries)
        except FileNotFoundError:
            return []
    fs, p = filesystem(text(folder))
    try:
        return sorted(name(e) for e in fs.ls(p, detail=False, refresh=True))
    except FileNotFoundError:
        return []


def write_remote(url: str, write: Callable[[IO[bytes]], object]) -> str:
    """Call `write(f)` on an upload to `url`; the object appears only once `write` returns.

    On any error the upload is discarded (an aborted multipart upload, or nothing sent),
    so an older object under `url` is left as it was, and the error is re-raised."""
    fs, p = filesystem(url)
    f = fs.open(p, "wb")
    try:
        write(f)
    except BaseException:
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()  # fsspec's buffered files: drop the buffer and abort a multipart upload
            f.closed = True  # and never flush it: closing would upload what was written
        else:  # a backend without discard (local-like): close, then remove what it wrote
            f.close()
            remove(url)
        raise
    f.close()
    return url


def path(p: str | os.PathLike) -> Any:
    """A pathlib object for `p`: a Path for a local path, a universal_pathlib UPath (the
    pathlib API over fsspec: `/`, exists, read_bytes, iterdir, ...) for a URL. Its
    listings are not cached, since other processes write the same store."""
    if isinstance(p, Path) or not is_remote(p):
        return local(p)
    from upath import UPath

    if isinstance(p, UPath):
        return p
    options = {"use_listings_cache": False} if scheme(p) in ("s3", "s3a", "gs", "gcs") else {}
    return UPath(text(p), **options)


def makedirs(p: str | os.PathLike) -> None:
    """Create a local folder and its parents; object stores have no folders to create."""
    if not is_remote(p):
        local(p).mkdir(parents=True, exist_ok=True)


def torch_load(p: str | os.PathLike, **kwargs: Any) -> Any:
    """`torch.load` of a local file or an object (read whole into memory first)."""
    import io

    import torch

    if not is_remote(p):
        return torch.load(local(p), **kwargs)
    return torch.load(io.BytesIO(read_bytes(p)), **kwargs)
