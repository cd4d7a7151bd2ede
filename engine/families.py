"""The closed set of families, by name, and the checks of a config against its family
(docs/design.md, Families)."""

from __future__ import annotations

from configs import ConfigError, RunConfig
from detection.family import DetectionFamily
from engine.contract import DataLayout, Family
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


def data_layout(cfg: RunConfig) -> DataLayout:
    """The layout `data.format` selects among those the run's family reads."""
    formats = get_family(cfg.family).data_formats
    if cfg.data.format not in formats:
        valid = " or ".join(repr(f) for f in formats)
        raise ConfigError(f"family={cfg.family!r} reads data.format={valid}, but data.format={cfg.data.format!r}")
    return formats[cfg.data.format]


def has_holdout(cfg: RunConfig) -> bool:
    """Whether the config names a held-out labeled split (the audit's, soup's and `rounds: auto`'s)."""
    return not data_layout(cfg).missing_keys(cfg.data, "holdout")


def check_config(cfg: RunConfig) -> Family:
    """The run's family, after checking what only the family knows: that it reads the
    data's format, that the train and val splits are named, and that a held-out split
    is named where a setting chooses on one. Each error names the keys."""
    layout, data = data_layout(cfg), cfg.data
    if problems := layout.problems(data):
        raise ConfigError("; ".join(problems))
    missing = list(dict.fromkeys(layout.missing_keys(data, "train") + layout.missing_keys(data, "val")))
    if missing:
        raise ConfigError(f"data.format={data.format!r} needs {', '.join(missing)}")
    who = (
        "audit.split='holdout'"
        if cfg.audit.split == "holdout"
        else "soup (its greedy choice)"
        if cfg.soup.ingredients
        else "rounds='auto' (its stopping rule)"
        if cfg.rounds == "auto"
        else None
    )
    if who and (missing := layout.missing_keys(data, "holdout")):
        raise ConfigError(f"{who} needs {', '.join(missing)} (a labeled split no stage trains on)")
    return get_family(cfg.family)
