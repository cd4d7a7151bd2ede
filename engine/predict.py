"""Apply a trained model to a user's images: `noisy-student predict CHECKPOINT INPUT OUT`.

INPUT is a folder of images (searched recursively; the formats `shards build` takes) or
a webdataset shard pattern (`pool-{000000..000009}.tar`). The model keeps, per image,
what its family's pseudo-label rule keeps at `threshold` (`scored_labels`, then
`at_threshold`: boxes after NMS and the caps, or the pixels whose class probability
reaches it), and OUT receives:

    predictions.json   one record per kept box (detection: COCO's results format with
                       the file name and class name beside it) or per image
                       (segmentation: the mask's path and the classes present)
    masks/<name>.png   segmentation: the class map, VOC palette, 255 = below threshold
    pictures/<name>.jpg  the prediction drawn over the image
    predict.json       what was read, kept and skipped, with the settings used

Images that cannot be decoded, or whose header declares more than `max_pixels` pixels
(never decoded), are skipped and counted. The class names and input size come from the
checkpoint (`engine/training.py` `save_model`); `classes` and `image_size` override them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from configs import MAX_IMAGE_PIXELS, PseudoLabelConfig
from data.files import atomic_write
from data.shards import (
    IMAGE_EXTS,
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    expand_urls,
    image_bytes,
    iter_shard,
)
from engine.families import get_family
from engine.loop import device_settings
from engine.training import load_model, model_info


class PredictError(ValueError):
    """A checkpoint, input or setting `predict` cannot use; the message says which and why."""


def _sources(source: str | Path) -> Iterator[tuple[str, Callable[[], bytes | None]]]:
    """(name, read) per image of a folder (sorted relative paths) or of shards (their keys)."""
    folder = Path(source)
    if folder.is_dir():
        names = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTS
        )
        if not names:
            raise PredictError(f"{source}: no {'/'.join(IMAGE_EXTS)} file in this folder")
        for name in names:
            yield name, (folder / name).read_bytes
        return
    shards = expand_urls(str(source))
    if not shards or not all(s.startswith("pipe:") or "://" in s or Path(s).is_file() for s in shards):
        raise PredictError(f"{source}: neither a folder of images nor a pattern of existing shards")
    for shard in shards:
        for key, record in iter_shard(shard):
            found = image_bytes(record)
            yield f"{key}.{found[0] if found else 'jpg'}", (lambda f=found: f[1] if f else None)


def predict_images(
    checkpoint: str | Path,
    source: str | Path,
    out: str | Path,
    device: str = "cpu",
    batch_size: int = 16,
    threshold: float = 0.5,
    classes: list[str] | None = None,
    image_size: int | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run the checkpoint's model over `source` and write OUT (see the module's doc); returns predict.json."""
    if not 0.0 <= threshold <= 1.0:
        raise PredictError(f"threshold={threshold}: a score between 0 and 1")
    if not Path(checkpoint).is_file() and "://" not in str(checkpoint):
        raise PredictError(f"{checkpoint}: no such file")
    try:
        info = model_info(checkpoint)
        get_family(info["family"])
    except (ValueError, RuntimeError) as err:  # not a model.pt, or a family this version does not know
        raise PredictError(f"{checkpoint}: {err}") from None
    num = int(info["model_cfg"]["num_classes"])
    names = list(classes or info.get("class_names") or [f"class {i}" for i in range(num)])
    if len(names) != num:
        given = ", ".join(names)
        raise PredictError(f"{len(names)} class names given ({given}) but {checkpoint} predicts {num} classes")
    size = image_size or info.get("image_size")
    if size is None:
        raise PredictError(f"{checkpoint} does not record its input size; give --image-size")
    device_settings(device, True, "tuned")
    family, model = load_model(checkpoint, device)
    rule = PseudoLabelConfig(score_threshold=threshold, batch_size=batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    counts = {"images": 0, "kept": 0, "corrupt": 0, "too_large": 0}
    skipped: list[str] = []

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        scored = family.scored_labels(model, [im for _, im in batch], size, rule)
        for (name, image), s in zip(batch, scored):
            label = family.at_threshold(s, threshold)
            counts["kept"] += label is not None
            recs, files = family.prediction_output(counts["images"], name, label, names)
            counts["images"] += 1
            records.extend(recs)
            for rel, data in files.items():
                atomic_write(out / rel, lambda f, b=data: f.write(b))
            picture = Image.fromarray(family.draw_prediction(image, label, names))
            stem = name.rsplit(".", 1)[0]
            atomic_write(out / "pictures" / f"{stem}.jpg", lambda f, p=picture: p.save(f, "JPEG", quality=90))
        if progress is not None:
            progress(len(batch))

    batch: list[tuple[str, torch.Tensor]] = []
    for name, read in _sources(source):
        try:
            data = read()
            if data is None:
                raise CorruptImageError("no image member")
            batch.append((name, decode_image(data, max_pixels)))
        except ImageTooLargeError:
            counts["too_large"] += 1
            skipped.append(name)
        except CorruptImageError:
            counts["corrupt"] += 1
            skipped.append(name)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    atomic_write(out / "predictions.json", lambda f: f.write(json.dumps(records).encode()))
    report = {
        "checkpoint": os.fspath(checkpoint),
        "source": os.fspath(source),
        "family": family.name,
        "classes": names,
        "image_size": size,
        "threshold": threshold,
        "max_pixels": max_pixels,
        **counts,
        "skipped": skipped,
        "records": len(records),
    }
    atomic_write(out / "predict.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    return report
