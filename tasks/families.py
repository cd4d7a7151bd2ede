"""The closed set of families, by name (DESIGN.md section 3)."""

from __future__ import annotations

from detection.family import DetectionFamily
from tasks.contract import Family

FAMILIES: dict[str, Family] = {
    "detection": DetectionFamily(),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; valid: {', '.join(sorted(FAMILIES))}") from None
