"""The closed set of families, by name (docs/design.md, Families)."""

from __future__ import annotations

from detection.family import DetectionFamily
from engine.contract import Family
from segmentation.family import SegmentationFamily

FAMILIES: dict[str, Family] = {
    "detection": DetectionFamily(),
    "segmentation": SegmentationFamily(),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; valid: {', '.join(sorted(FAMILIES))}") from None
