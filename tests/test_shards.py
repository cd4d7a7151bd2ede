"""data/shards.py: brace patterns, atomic deterministic writing, streaming reading,
sidecar merge-join, image decoding and the folder converter."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.shards import (
    IMAGE_EXTS,
    CorruptImageError,
    ShardReadError,
    brace_pattern,
    build_shards_from_folder,
    decode_image,
    expand_urls,
    image_bytes,
    iter_shard,
    iter_with_sidecar,
    shard_identities,
    write_shard,
)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


RECORDS = [
    ("a", {"jpg": b"\xff\xd8one", "json": b'{"x": 1}'}),
    ("b_2", {"png": b"\x89PNGtwo"}),
    ("c", {"jpg": b"", "seg.png": b"three"}),  # empty member and a dotted extension
]


# --------------------------------------------------------------------------- patterns


def test_expand_urls_ranges_lists_and_spaces():
    assert expand_urls("d/pool-{000008..000011}.tar") == [f"d/pool-{i:06d}.tar" for i in range(8, 12)]
    assert expand_urls(["p-{0..1}.tar", "q.tar"]) == ["p-0.tar", "p-1.tar", "q.tar"]
    assert expand_urls("") == [] and expand_urls([]) == []
    # a string is one pattern: a folder with spaces is never split into several
    assert expand_urls("my projects/pool-{0..1}.tar") == ["my projects/pool-0.tar", "my projects/pool-1.tar"]
    assert expand_urls(["a b/x.tar", "c d/y-{0..1}.tar"]) == ["a b/x.tar", "c d/y-0.tar", "c d/y-1.tar"]


def test_brace_pattern_roundtrips_through_expand():
    assert expand_urls(brace_pattern("pool", 13)) == [f"pool-{i:06d}.tar" for i in range(13)]
    assert brace_pattern("pool", 1) == "pool-000000.tar"
    assert brace_pattern("pool", 0) == ""


# ---------------------------------------------------------------------- write / read


def test_roundtrip_preserves_keys_order_and_bytes(tmp_path):
    path = tmp_path / "s.tar"
    assert write_shard(path, iter(RECORDS)) == 3
    assert list(iter_shard(path)) == RECORDS
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]  # no temp file left


def test_write_is_deterministic(tmp_path):
    write_shard(tmp_path / "a.tar", RECORDS)
    # Same records with members given in another order: same bytes.
    write_shard(tmp_path / "b.tar", [(k, dict(reversed(list(v.items())))) for k, v in RECORDS])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_write_is_atomic_when_records_fail(tmp_path):
    def records():
        yield RECORDS[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_shard(tmp_path / "s.tar", records())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_shard(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, RECORDS)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_shard(path, [("ok", {"jpg": b"1"}), ("bad.key", {"jpg": b"2"})])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"]


@pytest.mark.parametrize("key", ["a.b", "dir/x", ""])
def test_invalid_key_rejected_with_key_in_message(tmp_path, key):
    with pytest.raises(ValueError) as err:
        write_shard(tmp_path / "s.tar", [(key, {"jpg": b"x"})])
    assert repr(key) in str(err.value)
    assert not (tmp_path / "s.tar").exists()


def test_duplicate_key_rejected(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        write_shard(tmp_path / "s.tar", [("a", {"jpg": b"1"}), ("b", {"jpg": b"2"}), ("a", {"png": b"3"})])


def test_reads_webdataset_tarwriter_shards(tmp_path):
    import webdataset as wds

    path = str(tmp_path / "w.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "k0", "jpg": b"img0", "cls": b"3"})
        sink.write({"__key__": "k1", "jpg": b"img1"})
    assert list(iter_shard(path)) == [("k0", {"cls": b"3", "jpg": b"img0"}), ("k1", {"jpg": b"img1"})]


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    write_shard(tmp_path / "s.tar", RECORDS)
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a", "b_2", "c"]
    assert samples[0]["jpg"] == b"\xff\xd8one" and samples[2]["seg.png"] == b"three"


def _member_offsets(path) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a whole tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers()}


GOOD = [(f"k{i}", {"jpg": bytes([i]) * (600 + 300 * i), "json": b"{}"}) for i in range(4)]


@pytest.mark.parametrize("cut", ["data", "header", "boundary"])
def test_a_cut_off_shard_yields_its_whole_records_then_names_the_lost_one(tmp_path, cut):
    path = tmp_path / "s.tar"
    write_shard(path, GOOD)
    data_at, size = _member_offsets(path)["k2.jpg"]
    end = {"data": data_at + size // 2, "header": data_at - 100, "boundary": data_at - 512}[cut]
    path.write_bytes(path.read_bytes()[:end])
    got = []
    with pytest.raises(ShardReadError) as err:
        for key, record in iter_shard(path):
            got.append((key, record))
    assert got == GOOD[:2]  # k0 and k1 whole; k2 was cut off in its first member or header
    assert err.value.records == 2 and str(path) in str(err.value)
    assert err.value.lost_key == ("k2" if cut == "data" else None)  # else k2 had not begun
    assert isinstance(err.value, tarfile.ReadError)  # what callers of tarfile expect


@pytest.mark.parametrize("content", [b"", b"not a tar " * 100], ids=["empty-file", "garbage"])
def test_a_file_that_is_no_tar_raises_shard_read_error(tmp_path, content):
    path = tmp_path / "s.tar"
    path.write_bytes(content)
    with pytest.raises(ShardReadError, match=f"shard {path} is unreadable after 0 record") as err:
        list(iter_shard(path))
    assert err.value.lost_key is None


def test_a_tar_without_members_has_no_records(tmp_path):
    write_shard(tmp_path / "s.tar", [])
    assert list(iter_shard(tmp_path / "s.tar")) == []


def test_a_cut_off_gzip_shard_raises_shard_read_error(tmp_path):
    import gzip

    path = tmp_path / "s.tar"
    write_shard(path, GOOD)
    packed = gzip.compress(path.read_bytes())
    (tmp_path / "s.tar.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ShardReadError):
        list(iter_shard(tmp_path / "s.tar.gz"))


def test_shard_read_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ShardReadError("/x/s.tar", 3, "k3", "ReadError: unexpected end of data")))
    assert (err.path, err.records, err.lost_key) == ("/x/s.tar", 3, "k3") and "k3" in str(err)


def test_image_bytes_picks_first_image_member():
    assert image_bytes({"json": b"{}", "png": b"P", "jpg": b"J"}) == ("jpg", b"J")
    assert image_bytes({"WEBP": b"W"}) == ("webp", b"W")
    assert image_bytes({"json": b"{}"}) is None
    assert IMAGE_EXTS == ("jpg", "jpeg", "png", "webp")


# ------------------------------------------------------------------------- sidecars


def test_sidecar_merge_join_skips_missing_keys(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    write_shard(tmp_path / "img.tar", [(k, {"jpg": k.encode()}) for k in keys])
    kept = ["k1", "k2", "k5"]
    write_shard(tmp_path / "side.tar", [(k, {"json": f'"{k}"'.encode()}) for k in kept])
    out = list(iter_with_sidecar(tmp_path / "img.tar", tmp_path / "side.tar"))
    assert [k for k, _, _ in out] == kept
    assert all(rec["jpg"] == k.encode() and side["json"] == f'"{k}"'.encode() for k, rec, side in out)


def test_sidecar_unknown_key_raises_naming_shards_and_key(tmp_path):
    write_shard(tmp_path / "img.tar", [(k, {"jpg": b"x"}) for k in ("a", "b", "c")])
    write_shard(tmp_path / "side.tar", [(k, {"json": b"{}"}) for k in ("a", "zz")])
    out = []
    with pytest.raises(ValueError) as err:
        for item in iter_with_sidecar(tmp_path / "img.tar", tmp_path / "side.tar"):
            out.append(item[0])
    assert out == ["a"]
    msg = str(err.value)
    assert "'zz'" in msg and "img.tar" in msg and "side.tar" in msg


def test_sidecar_out_of_order_key_raises(tmp_path):
    write_shard(tmp_path / "img.tar", [(k, {"jpg": b"x"}) for k in ("a", "b", "c")])
    write_shard(tmp_path / "side.tar", [(k, {"json": b"{}"}) for k in ("c", "a")])
    with pytest.raises(ValueError, match="'a'"):
        list(iter_with_sidecar(tmp_path / "img.tar", tmp_path / "side.tar"))


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_decode_lossless_formats_exactly(fmt):
    arr = _rgb()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(arr, fmt, **kw))
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 32)
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))


def test_decode_jpeg_and_mode_conversions():
    arr = _rgb()
    jpg = decode_image(_encode(arr, "JPEG", quality=95))
    assert jpg.shape == (3, 24, 32) and jpg.dtype == torch.uint8
    gray = np.full((5, 7), 77, np.uint8)
    out = decode_image(_encode(gray, "PNG"))
    assert out.shape == (3, 5, 7) and bool((out == 77).all())
    rgba = np.dstack([arr, np.full(arr.shape[:2], 10, np.uint8)])
    assert torch.equal(decode_image(_encode(rgba, "PNG")), torch.from_numpy(arr).permute(2, 0, 1))
    pal = Image.fromarray(arr).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    expected = torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decode_image(buf.getvalue()), expected)


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_decode_garbage_raises(data):
    with pytest.raises(CorruptImageError):
        decode_image(data)


def test_decode_falls_back_to_pil(monkeypatch):
    import data.shards as shards

    def refuse(data):
        raise RuntimeError("unsupported by torchvision")

    monkeypatch.setattr(shards, "_decode_torchvision", refuse)
    arr = _rgb()
    assert torch.equal(decode_image(_encode(arr, "PNG")), torch.from_numpy(arr).permute(2, 0, 1))
    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")  # 16-bit grayscale
    assert torch.equal(decode_image(buf.getvalue())[1], torch.from_numpy((wide >> 8).astype(np.uint8)))
    jpg = _encode(_rgb(64, 64), "JPEG")
    with pytest.raises(CorruptImageError):  # PIL refuses truncated data too
        decode_image(jpg[: len(jpg) // 2])


def test_decode_16bit_png_keeps_high_byte():
    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert out.dtype == torch.uint8 and out.shape == (3, 3, 4)
    assert torch.equal(out[0], torch.from_numpy((wide >> 8).astype(np.uint8)))


def test_decode_truncated_jpeg_raises():
    data = _encode(_rgb(64, 64), "JPEG", quality=95)
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2])
    assert issubclass(CorruptImageError, ValueError)


# ------------------------------------------------------------------ folder converter


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    files = {
        "train/n01/a.JPEG": _encode(_rgb(seed=1), "JPEG"),
        "train/n01/b.png": _encode(_rgb(seed=2), "PNG"),
        "train/n02/c.webp": _encode(_rgb(seed=3), "WEBP", lossless=True),
        "train/n02/d.v2.jpg": _encode(_rgb(seed=4), "JPEG"),
        "train/n02/broken.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg",
        "flat_x.jpg": _encode(_rgb(seed=5), "JPEG"),
        "train_n01_a.png": _encode(_rgb(seed=6), "PNG"),  # key collides with train/n01/a.JPEG
        "notes.txt": b"ignored",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


def test_build_shards_from_folder(image_folder, tmp_path):
    root, files = image_folder
    out = tmp_path / "shards"
    calls = []
    report = build_shards_from_folder(root, out, per_shard=2, prefix="pool", progress=lambda d, t: calls.append((d, t)))

    assert report["images"] == 6 and report["corrupt"] == 1
    assert report["corrupt_files"] == ["train/n02/broken.jpg"]
    assert report["shards"] == ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    assert report["pattern"] == "pool-{000000..000002}.tar" and report["per_shard"] == 2
    assert json.loads((out / "shards.json").read_text()) == report
    assert calls[-1] == (7, 7) and len(calls) == 7

    records = [r for name in expand_urls(str(out / report["pattern"])) for r in iter_shard(name)]
    assert [len(list(iter_shard(out / n))) for n in report["shards"]] == [2, 2, 2]
    keys = [k for k, _ in records]
    # Sorted relative paths; '/' and '.' -> '_'; collision gets a counter.
    assert keys == ["flat_x", "train_n01_a", "train_n01_b", "train_n02_c", "train_n02_d_v2", "train_n01_a_1"]
    by_key = dict(records)
    assert by_key["train_n01_a"] == {"jpg": files["train/n01/a.JPEG"]}  # jpeg -> jpg, original bytes
    assert by_key["train_n01_a_1"] == {"png": files["train_n01_a.png"]}
    assert by_key["train_n02_c"] == {"webp": files["train/n02/c.webp"]}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_build_shards_removes_stale_shards_of_a_longer_run(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "shards"
    build_shards_from_folder(root, out, per_shard=1)
    assert (out / "pool-000005.tar").exists()
    report = build_shards_from_folder(root, out, per_shard=4)
    assert sorted(p.name for p in out.glob("*.tar")) == report["shards"] == ["pool-000000.tar", "pool-000001.tar"]


def test_build_shards_rejects_bad_arguments(image_folder, tmp_path):
    root, _ = image_folder
    with pytest.raises(ValueError, match="per_shard"):
        build_shards_from_folder(root, tmp_path / "o", per_shard=0)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        build_shards_from_folder(missing, tmp_path / "o")


def test_written_tar_headers_are_fixed(tmp_path):
    write_shard(tmp_path / "s.tar", RECORDS)
    with tarfile.open(tmp_path / "s.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["a.jpg", "a.json", "b_2.png", "c.jpg", "c.seg.png"]
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname) for i in infos} == {(0, 0o444, 0, 0, "")}
    assert oct(os.stat(tmp_path / "s.tar").st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------------------- identity


def same_size_rewrite(path) -> None:
    """Rewrite a shard with the image payloads of its first two records swapped: same
    size (member sizes are permuted), other content; its mtime is set back."""
    st = os.stat(path)
    records = list(iter_shard(path))
    (k0, r0), (k1, r1) = records[:2]
    write_shard(path, [(k0, r1), (k1, r0), *records[2:]])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_shard_identity_follows_content_not_size_or_mtime(tmp_path):
    path = tmp_path / "pool-000000.tar"
    write_shard(path, [("a", {"jpg": b"1" * 700}), ("b", {"jpg": b"2" * 900}), ("c", {"png": b"3"})])
    cache = tmp_path / "digests.json"
    (before,) = shard_identities([path], cache)
    same_size_rewrite(path)
    (after,) = shard_identities([path], cache)
    assert after["size"] == before["size"] and after["path"] == before["path"] == str(path.resolve())
    assert after["sha256"] != before["sha256"]
    assert shard_identities([path]) == [after]  # the cached digest is the file's digest


def test_shard_digests_are_hashed_once_per_file_state(tmp_path, monkeypatch):
    import data.shards as shards

    hashed = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    paths = [tmp_path / f"pool-{i:06d}.tar" for i in range(3)]
    for i, p in enumerate(paths):
        write_shard(p, [(f"k{i}", {"jpg": bytes([i]) * 100})])
    cache = tmp_path / "digests.json"
    first = shard_identities(paths, cache)
    assert sorted(hashed) == sorted(p.name for p in paths) and len({i["sha256"] for i in first}) == 3
    hashed.clear()
    assert shard_identities(paths, cache) == first and hashed == []  # all from the cache
    os.utime(paths[1])  # touched: hashed again, same identity
    assert shard_identities(paths, cache) == first and hashed == [paths[1].name]
    cache.write_text("{not json")  # an unreadable cache is rebuilt
    hashed.clear()
    assert shard_identities(paths, cache) == first and len(hashed) == 3


def test_missing_shards_are_named_together(tmp_path):
    write_shard(tmp_path / "ok.tar", [("a", {"jpg": b"1"})])
    with pytest.raises(FileNotFoundError, match="gone-1.tar, .*gone-2.tar"):
        shard_identities([tmp_path / "gone-1.tar", tmp_path / "ok.tar", tmp_path / "gone-2.tar"])


def test_a_pipe_command_is_one_pattern_and_is_read_through_webdataset(tmp_path):
    write_shard(tmp_path / "s-0.tar", RECORDS[:1])
    write_shard(tmp_path / "s-1.tar", RECORDS[1:])
    urls = expand_urls(f"pipe:cat {tmp_path}/s-{{0..1}}.tar")
    assert urls == [f"pipe:cat {tmp_path}/s-0.tar", f"pipe:cat {tmp_path}/s-1.tar"]
    assert [r for u in urls for r in iter_shard(u)] == RECORDS


# ---------------------------------------------------------------------- pixel limit


@functools.cache
def big_png(side: int = 20000) -> bytes:
    """A 20,000 x 20,000 grey PNG: 388 KB on disk, 1.2 GB once decoded to RGB."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def test_the_default_limit_is_pils():
    from configs import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS


def test_an_image_above_the_limit_is_refused_before_any_pixel_is_decoded():
    import resource

    from data.shards import ImageTooLargeError

    data = big_png()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLargeError, match="above the limit of 89,478,485; not decoded"):
        decode_image(data)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024, grown_kib  # a decode would take 1.2 GB
    small = io.BytesIO()
    Image.new("RGB", (40, 30)).save(small, "PNG")
    with pytest.raises(ImageTooLargeError, match="1,200 pixels, above the limit of 1,000"):
        decode_image(small.getvalue(), max_pixels=1000)
    assert decode_image(small.getvalue(), max_pixels=1200).shape == (3, 30, 40)
    assert decode_image(small.getvalue(), max_pixels=None).shape == (3, 30, 40)


def test_shards_build_skips_and_lists_images_above_the_limit(image_folder, tmp_path):
    root, _ = image_folder
    (root / "train" / "n02" / "huge.png").write_bytes(big_png())
    report = build_shards_from_folder(root, tmp_path / "shards", per_shard=4)
    assert report["images"] == 6 and report["corrupt"] == 1
    assert report["too_large"] == 1 and report["too_large_files"] == ["train/n02/huge.png"]
    assert report["max_pixels"] == Image.MAX_IMAGE_PIXELS
    # the limit is the caller's: at 24 x 32 = 768 pixels, every valid image is above 767
    strict = build_shards_from_folder(root, tmp_path / "strict", per_shard=4, max_pixels=767)
    assert (strict["images"], strict["too_large"], strict["corrupt"]) == (0, 7, 1)


def test_shards_build_writes_the_same_bytes_on_one_thread_or_several(image_folder, tmp_path):
    root, _ = image_folder
    one = build_shards_from_folder(root, tmp_path / "one", per_shard=2, workers=1)
    three = build_shards_from_folder(root, tmp_path / "three", per_shard=2, workers=3)
    assert one == three
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()
