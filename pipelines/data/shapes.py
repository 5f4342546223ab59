"""The embedded default dataset: procedural shape images, a pure function of (seed, split, index).

Why this design: the ViT paper's question is whether a model without the CNN's locality and translation
equivariance can learn them from data. So a class here is local structure at a random position: an
outline filled with a periodic texture, drawn at a random place, size, texture phase and colour, on a
textured, gradient, cluttered and noisy background. A CNN's shared local filters and pooling fit this from
few examples; a ViT must learn from data that the same few pixels of structure, straddling patch
boundaries differently at every offset, are one class.
"""

from __future__ import annotations

import numpy as np

GENERATOR_VERSION = 2  # bump when the images change, so caches are regenerated
_SPLIT_IDS = {"train": 0, "test": 1}

# A class is (outline, fill texture). The outline is global structure at a random position and scale; the
# fill is a local periodic pattern at a random phase, so recognising it means recognising the same few
# pixels of structure at every offset - what a convolution has built in and a patch embedding must learn.
OUTLINES = ("square", "disc", "diamond", "triangle", "cross", "ring", "hbar", "vbar")
FILLS = ("solid", "hstripes", "vstripes", "checker", "diagonal", "antidiagonal", "dots", "grid")
MAX_CLASSES = len(OUTLINES) * len(FILLS)


def class_parts(label: int, num_classes: int, seed: int) -> tuple[str, str]:
    """(outline, fill) of a class. A source's classes are a seeded draw from the 64 combinations, so two
    sources with different seeds (pretraining vs a downstream task) mostly hold different classes."""
    if num_classes > MAX_CLASSES:
        raise ValueError(f"the shapes source has at most {MAX_CLASSES} classes, {num_classes} asked")
    combos = np.random.default_rng([seed, 7919]).permutation(MAX_CLASSES)[:num_classes]
    combo = int(combos[label])
    return OUTLINES[combo % len(OUTLINES)], FILLS[combo // len(OUTLINES)]


def render(seed: int, split: str, index: int, num_classes: int, image_size: int) -> tuple[np.ndarray, int]:
    """Draw example `index` of `split`.

    Returns:
        (uint8 image [H, W, 3], integer label).
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    label = int(index % num_classes)
    outline, fill = class_parts(label, num_classes, seed)
    size = image_size
    img = _background(rng, size)
    _draw_clutter(rng, img, size)
    side = int(rng.integers(int(size * 0.4), int(size * 0.65) + 1))
    y, x = rng.integers(0, size - side + 1, size=2)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    mask = _outline(outline, (yy + 0.5) / side * 2 - 1, (xx + 0.5) / side * 2 - 1)
    period = max(2, size // 10)
    tex = _fill(fill, yy + rng.integers(period * 2), xx + rng.integers(period * 2), period)
    patch = img[y:y + side, x:x + side]
    # Object colours contrast with the local background so shape and texture, not colour, carry the class.
    local = patch.reshape(-1, 3).mean(0)
    fg = np.clip(1.0 - local + rng.normal(0, 0.15, 3), 0, 1)
    shade = np.clip(fg * 0.35 + local * 0.65, 0, 1)
    patch[mask & tex] = fg
    patch[mask & ~tex] = shade
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def _outline(kind: str, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Boolean mask of an outline in the unit box (v down, u right, both in [-1, 1])."""
    r = np.hypot(u, v)
    return {
        "square": np.maximum(abs(u), abs(v)) <= 0.8,
        "disc": r <= 0.9,
        "diamond": abs(u) + abs(v) <= 1.0,
        "triangle": (v >= -0.85) & (v <= 0.85) & (abs(u) <= (v + 0.85) / 1.7 * 0.95),
        "cross": ((abs(u) <= 0.3) | (abs(v) <= 0.3)) & (np.maximum(abs(u), abs(v)) <= 0.95),
        "ring": (r <= 0.95) & (r >= 0.5),
        "hbar": (abs(v) <= 0.4) & (abs(u) <= 0.95),
        "vbar": (abs(u) <= 0.4) & (abs(v) <= 0.95),
    }[kind]


def _fill(kind: str, y: np.ndarray, x: np.ndarray, period: int) -> np.ndarray:
    """Boolean texture: True where the foreground colour goes."""
    half = period / 2
    return {
        "solid": np.ones_like(y, dtype=bool),
        "hstripes": (y % period) < half,
        "vstripes": (x % period) < half,
        "checker": ((y // half + x // half) % 2) == 0,
        "diagonal": ((y + x) % period) < half,
        "antidiagonal": ((y - x) % period) < half,
        "dots": ((y % period) < half) & ((x % period) < half),
        "grid": ((y % period) < 1) | ((x % period) < 1),
    }[kind]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.arange(size)[None, :] + np.sin(angle) * np.arange(size)[:, None]) / size
    grad = ramp[..., None] * rng.uniform(-0.3, 0.3, 3)
    cells = max(2, size // 8)
    coarse = rng.normal(0, 0.08, (cells, cells, 3))
    texture = np.kron(coarse, np.ones((size // cells + 1, size // cells + 1, 1)))[:size, :size]
    return (base + grad + texture).astype(np.float32)


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, size: int) -> None:
    """Random bars: local structure that is *not* a class, so the model must look at the glyph's shape."""
    for _ in range(int(rng.integers(2, 5))):
        long, short = int(rng.integers(size // 8, size // 3)), max(1, size // 32)
        h, w = (long, short) if rng.random() < 0.5 else (short, long)
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        img[y:y + h, x:x + w] = rng.uniform(0, 1, 3)
