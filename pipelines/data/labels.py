"""A sample's label: one class, or (JFT, ImageNet-21k winter release) several, as the shards spell them."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

# One class (int; -1 where a sample has none), or, multi-label, the sorted list of its two or more classes.
Label = int | list[int]


def parse_labels(cls: bytes | None, meta: bytes | None) -> Label | None:
    """A sample's label from its `.cls` (one or more integers, whitespace- or comma-separated) and its `.json`'s
    `labels` list, merged: an int for one class, a sorted list for several, -1 for none; None where either member
    holds something that is not a class (a non-integer or negative `.cls` entry or `labels` item)."""
    found: set[int] = set()
    if cls is not None:
        try:
            found.update(int(v) for v in cls.replace(b",", b" ").split())
        except ValueError:
            return None
    if meta is not None and b'"labels"' in meta:
        try:
            listed = json.loads(meta).get("labels")
        except (ValueError, AttributeError):
            listed = None
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in listed):
                return None
            found.update(listed)
    if any(v < 0 for v in found):
        return None
    return -1 if not found else found.pop() if len(found) == 1 else sorted(found)


def label_array(labels: list[Label], width: int = 1) -> np.ndarray:
    """Labels as int64: [n] where `width` is 1 (single-label sources, as always), else [n, width], each row a
    sample's classes padded with -1 (the loss builds the multi-hot target on the device)."""
    if width == 1:
        return np.asarray(labels, dtype=np.int64)
    out = np.full((len(labels), width), -1, dtype=np.int64)
    for row, label in zip(out, labels, strict=True):
        classes = label if isinstance(label, list) else [label]
        row[:len(classes)] = classes
    return out


def label_width(labels: Iterable[Label]) -> int:
    """The most classes any of `labels` carries (1 for a single-label source)."""
    return max((len(label) for label in labels if isinstance(label, list)), default=1)
