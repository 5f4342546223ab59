"""The embedded default dataset: procedural shape images, a pure function of (seed, split, index).

Why this design: the ViT paper's question is whether a model without the CNN's locality and translation
equivariance can learn what it needs from data. So an image holds two objects, one in each half, each an outline
filled with a periodic texture at a random place, size and phase, and its class is the *ordered* pair of
textures (left, right); outlines are distractors. Classes come in swapped pairs, (a, b) and (b, a), so which
textures are present settles only half of the decision; the rest is which one is on the left, a relation
between parts ~16 px apart. Recognising a texture at any offset is local structure that a CNN's shared filters
fit from few examples (and a patch embedding must learn at every phase); the order is global structure that
attention with position embeddings can learn from more data, and a globally pooled CNN must build up through
depth and padding. Backgrounds are smooth gradients with coarse texture and pixel noise.
"""

from __future__ import annotations

import itertools

import numpy as np

GENERATOR_VERSION = 5  # bump when the images change, so caches are regenerated (5: two objects, ordered textures)
_SPLIT_IDS = {"train": 0, "test": 1}

OUTLINES = ("square", "disc", "diamond", "triangle", "cross", "ring", "hbar", "vbar")
_CARRIERS = ("square", "disc", "diamond", "ring")  # outlines broad enough to show a texture at 32 px
FILLS = ("solid", "hstripes", "vstripes", "checker", "diagonal", "antidiagonal", "dots", "grid")
_PAIRS = tuple(itertools.combinations(range(len(FILLS)), 2))
MAX_CLASSES = len(FILLS) ** 2  # the 56 swapped pairs first; beyond them, the 8 same-texture pairs (a, a)


def class_parts(label: int, num_classes: int, seed: int) -> tuple[str, str]:
    """(left fill, right fill) of a class. A source's classes are a seeded draw of unordered texture pairs, each
    in both orders (labels 2k and 2k + 1), so a downstream source (another seed) holds mostly new pairs."""
    if num_classes > MAX_CLASSES:
        raise ValueError(f"the shapes source has at most {MAX_CLASSES} classes, {num_classes} asked")
    if label >= 2 * len(_PAIRS):
        return FILLS[label - 2 * len(_PAIRS)], FILLS[label - 2 * len(_PAIRS)]
    order = np.random.default_rng([seed, 7919]).permutation(len(_PAIRS))
    first, second = _PAIRS[int(order[label // 2])]
    if label % 2:
        first, second = second, first
    return FILLS[first], FILLS[second]


def render(seed: int, split: str, index: int, num_classes: int, image_size: int) -> tuple[np.ndarray, int]:
    """Draw example `index` of `split`.

    Returns:
        (uint8 image [H, W, 3], integer label).
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    label = int(index % num_classes)
    size = image_size
    img = _background(rng, size)
    half = size // 2
    for fill, x0 in zip(class_parts(label, num_classes, seed), (0, half), strict=True):
        _draw_object(rng, img, _CARRIERS[int(rng.integers(len(_CARRIERS)))], fill, x0, half, size)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def _draw_object(rng: np.random.Generator, img: np.ndarray, outline: str, fill: str, x0: int, width: int,
                 size: int) -> None:
    """One object at a random size and place inside columns [x0, x0 + width), its texture at a random phase."""
    side = int(rng.integers(int(width * 0.8), width + 1))
    y = int(rng.integers(0, size - side + 1))
    x = x0 + int(rng.integers(0, width - side + 1))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    mask = _outline(outline, (yy + 0.5) / side * 2 - 1, (xx + 0.5) / side * 2 - 1)
    period = max(3, size // 8)
    tex = _fill(fill, yy + rng.integers(period * 2), xx + rng.integers(period * 2), period)
    patch = img[y:y + side, x:x + side]
    # Object colours contrast with the local background so shape and texture, not colour, carry the class.
    local = patch.reshape(-1, 3).mean(0)
    fg = np.clip(1.0 - local + rng.normal(0, 0.1, 3), 0, 1)
    shade = np.clip(fg * 0.3 + local * 0.7, 0, 1)
    patch[mask & tex] = fg
    patch[mask & ~tex] = shade


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
