"""Mixed batches hold human and pseudo samples at the configured ratio."""

import io
import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from data import mixing
from data.mixing import InfiniteSampler, PseudoLabeledShards, endless_loader, loader_options, mixed_batches
from data.shards import write_shard
from detection import pseudo


def jpeg(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


class Human(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(3, 128, 128, dtype=torch.uint8), {"source": "human", "index": i}


def pseudo_shards(tmp_path, n_shards=2, per_shard=6):
    pairs = []
    for s in range(n_shards):
        keys = [f"s{s}_{i}" for i in range(per_shard)]
        images = tmp_path / f"pool-{s}.tar"
        write_shard(images, [(k, {"jpg": jpeg((i * 20, 0, 0))}) for i, k in enumerate(keys)])
        # the teacher kept every other image
        label = {
            "boxes_xyxy": torch.tensor([[1.0, 2, 20, 25]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]),
        }
        sidecar = tmp_path / f"labels-{s}.tar"
        write_shard(sidecar, [(k, {"json": pseudo.encode(label)}) for k in keys[::2]])
        pairs.append((str(images), str(sidecar)))
    return pairs


def collate(samples):
    return {"images": torch.stack([s[0] for s in samples]), "targets": [s[1] for s in samples]}


def test_ratio_holds_over_many_batches(tmp_path):
    pairs = pseudo_shards(tmp_path)
    stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "S1", 128, seed=0, shuffle_buffer=4)
    batches = mixed_batches(endless_loader(Human(), 4, 0, seed=0), endless_loader(stream, 2, 0, seed=1), collate)
    humans = pseudos = 0
    for _ in range(60):
        b = next(batches)
        assert b["num_human"] == 4 and b["images"].shape == (6, 3, 128, 128)
        assert all(t.get("source") == "human" for t in b["targets"][:4])
        assert all("boxes_xyxy" in t for t in b["targets"][4:])
        humans += sum(t.get("source") == "human" for t in b["targets"])
        pseudos += sum("boxes_xyxy" in t for t in b["targets"])
    assert humans == 240 and pseudos == 120


def test_pseudo_stream_reads_only_kept_images_and_covers_them(tmp_path):
    pairs = pseudo_shards(tmp_path, n_shards=3, per_shard=6)
    stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, loop=False)
    samples = list(stream)
    assert len(samples) == 9  # 3 shards x 3 kept
    for image, target in samples:
        assert image.shape == (3, 128, 128)
        # letterboxed 40x30 -> scale 3.2: box [1,2,20,25] -> [3.2, 6.4, 64, 80]
        assert torch.allclose(target["boxes_xyxy"], torch.tensor([[3.2, 6.4, 64.0, 80.0]]), atol=0.05)


def test_workers_split_the_stream_without_duplicates(tmp_path):
    pairs = pseudo_shards(tmp_path, n_shards=1, per_shard=8)  # fewer shards than workers
    stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, loop=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, **loader_options(2))
    colors = sorted(int(img[0, 0, 0]) for img, _ in loader)
    assert len(colors) == 4  # every kept image exactly once


def test_infinite_sampler_covers_every_index_each_pass():
    it = iter(InfiniteSampler(7, seed=3))
    for _ in range(3):
        assert sorted(next(it) for _ in range(7)) == list(range(7))


def test_pseudo_stream_with_no_kept_image_raises_instead_of_spinning(tmp_path):
    images, sidecar = tmp_path / "pool-0.tar", tmp_path / "labels-0.tar"
    write_shard(images, [(f"k{i}", {"jpg": jpeg((i, 0, 0))}) for i in range(4)])
    write_shard(sidecar, [])  # the teacher kept none of them
    stream = PseudoLabeledShards([(str(images), str(sidecar))], pseudo.decode, "json", "none", 128)
    with pytest.raises(RuntimeError, match="no labeled record in any of the 1 pseudo-label sidecar") as err:
        next(iter(stream))
    assert str(sidecar) in str(err.value)


# ----------------------------------------------------------------------------- empty sidecars


def kept_pool(tmp_path, kept: list[int], per_shard: int = 4) -> list[tuple[str, str]]:
    """Shard s of `per_shard` images whose sidecar keeps its first kept[s]; label ids count the kept."""
    pairs, label = [], 0
    for s, n in enumerate(kept):
        keys = [f"s{s}_{i}" for i in range(per_shard)]
        images, sidecar = tmp_path / f"pool-{s}.tar", tmp_path / f"labels-{s}.tar"
        write_shard(images, [(k, {"jpg": jpeg((i * 20, 0, 0))}) for i, k in enumerate(keys)])
        records = []
        for k in keys[:n]:
            target = {"boxes_xyxy": torch.tensor([[1.0, 2, 20, 25]]), "labels": torch.tensor([label])}
            records.append((k, {"json": pseudo.encode({**target, "scores": torch.tensor([0.9])})}))
            label += 1
        write_shard(sidecar, records)
        pairs.append((str(images), str(sidecar)))
    return pairs


def reader_ids(pairs, readers: int, seed: int = 0) -> list[list[int]]:
    """The label ids of one pass of each reader (here: ranks of one loader worker each)."""
    out = []
    for rank in range(readers):
        stream = PseudoLabeledShards(
            pairs, pseudo.decode, "json", "none", 128, seed=seed, loop=False, rank=rank, world_size=readers
        )
        out.append([int(t["labels"][0]) for _, t in stream])
    return out


def test_an_empty_sidecar_leaves_no_rank_without_samples(tmp_path):
    pairs = kept_pool(tmp_path, [3, 0])  # the teacher kept nothing of shard 1
    for seed in range(3):
        rank0, rank1 = reader_ids(pairs, 2, seed)
        assert rank0 and rank1 and sorted(rank0 + rank1) == [0, 1, 2]
    for rank in range(2):  # the endless stream of each rank starts
        stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, rank=rank, world_size=2)
        assert next(iter(stream))[0].shape == (3, 128, 128)


@pytest.mark.parametrize(
    "kept",
    [
        [3, 0, 3],  # fewer labeled shards than readers: samples are split
        [1, 0, 1],  # fewer kept images than readers: every reader still gets one
        [3, 3, 0, 3],  # as many shards as readers, one of them empty
        [2, 0, 2, 2, 0, 2, 2, 2],  # 8 shards, 8 readers (num_workers=8), two empty
    ],
)
def test_every_reader_gets_samples_when_some_sidecars_are_empty(tmp_path, kept):
    readers = 8 if len(kept) == 8 else 4
    ids = reader_ids(kept_pool(tmp_path, kept), readers)
    assert all(ids), ids
    merged = sorted(i for r in ids for i in r)
    if sum(kept) >= readers:  # each kept image read exactly once
        assert merged == list(range(sum(kept)))
    else:  # the kept images, repeated until every reader has one
        assert set(merged) == set(range(sum(kept))) and len(merged) == readers
    assert reader_ids(kept_pool(tmp_path, kept), readers) == ids  # deterministic for a seed


def test_labeled_shards_are_found_once_and_travel_with_the_dataset(tmp_path, monkeypatch):
    pairs = kept_pool(tmp_path, [2, 0, 2])
    stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, loop=False)
    copy = pickle.loads(pickle.dumps(stream))  # what a loader worker receives
    assert copy.labeled_pairs() == [pairs[0], pairs[2]]

    def unread(sidecar):
        raise AssertionError(f"{sidecar} read again")

    monkeypatch.setattr(mixing, "_has_record", unread)
    assert sorted(int(t["labels"][0]) for _, t in copy) == [0, 1, 2, 3]


def test_pseudo_stream_with_only_empty_sidecars_names_them(tmp_path):
    pairs = kept_pool(tmp_path, [0] * 7)
    stream = PseudoLabeledShards(pairs, pseudo.decode, "json", "none", 128, rank=1, world_size=2)
    with pytest.raises(RuntimeError, match="no labeled record in any of the 7 pseudo-label sidecar") as err:
        next(iter(stream))
    assert all(side in str(err.value) for _, side in pairs[:5]) and "and 2 more" in str(err.value)
