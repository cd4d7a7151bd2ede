"""Mixed batches hold human and pseudo samples at the configured ratio."""

import io

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

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
    with pytest.raises(RuntimeError, match="no labeled record in its 1 shard pair"):
        next(iter(stream))
