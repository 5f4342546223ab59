"""Image augmentation, one definition for both places it runs: per decoded image in the streaming loader's
workers (PIL, `train_image`), and per batch on tensors for data held in memory (`augment_batch`)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Augment:
    """Training augmentation.

    `crop`: `inception` takes a random crop of `min_area`..100% of the image area with aspect ratio 3/4..4/3 and
    resizes it to the training resolution (the ViT and BiT pretraining crop); `translate` pads with black by
    `crop_padding` pixels and crops back (a small-image variant that keeps the whole object); `none` resizes.
    `flip`: random horizontal flip.
    """

    crop: Literal["inception", "translate", "none"] = "inception"
    min_area: float = 0.05  # big_vision's inception_crop default (area_min=5)
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self):
        if not 0 < self.min_area <= 1 or self.crop_padding < 0:
            raise ValueError("need 0 < min_area <= 1 and crop_padding >= 0")


def inception_box(width: int, height: int, min_area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random (left, top, width, height) crop: area fraction in [min_area, 1], log-uniform aspect in [3/4, 4/3].

    Ten tries, then the largest centred crop of aspect within range (as torchvision's RandomResizedCrop).
    """
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    w, h = (width, round(width / (4 / 3))) if aspect > 4 / 3 else (
        (round(height * 3 / 4), height) if aspect < 3 / 4 else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square crop of the shorter side: resize + centre crop, the evaluation transform."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def draft_scale(w: int, h: int, size: int) -> int:
    """The largest JPEG DCT down-scaling (1, 2, 4 or 8: libjpeg's) at which a `w` x `h` crop still has at least
    `size` pixels on both sides, so that resizing it to `size` x `size` never upsamples what a full decode would
    have downsampled."""
    return next((s for s in (8, 4, 2) if min(w, h) >= s * size), 1)


def decode(data: bytes, size: int, box_fn) -> Image.Image:
    """Decode `data` and resize the crop `box_fn(width, height)` to `size` x `size` (bilinear, antialiased).

    The box is chosen in the original image's coordinates (so the sampled crops do not depend on the decoding),
    then a JPEG is decoded at the largest DCT scale (`draft_scale`) that still covers `size` on both sides of the
    crop: 1/2 to 1/8 of the work of the inverse DCT and colour conversion, and a smaller image to resize. Other
    formats (PNG: the procedural sources) are decoded whole, as before. libjpeg-turbo's region decoding is not
    used: Pillow does not expose it, and entropy decoding, which a region decode cannot skip above the crop's
    bottom edge, is most of the cost at the quality of ImageNet-like JPEGs (see bench/data_throughput.py).

    Raises:
        OSError: the bytes are not a complete image (a truncated image is never accepted: PIL's
            LOAD_TRUNCATED_IMAGES stays off).
    """
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    left, top, w, h = box_fn(width, height)
    scale = draft_scale(w, h, size) if im.format == "JPEG" else 1
    if scale > 1:
        # Pillow picks the largest scale s with size >= requested * s: ask for exactly 1/scale. Decoded pixel i
        # covers original pixels [s*i, s*i + s), so the box scales by 1/s (not by the rounded-up size ratio).
        drafted = im.draft("RGB", (width // scale, height // scale))
        scale = width / drafted[1][2] if drafted else 1
    if im.mode != "RGB":
        im = im.convert("RGB")
    box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
    return im.resize((size, size), Image.BILINEAR, box=box)


def train_image(data: bytes, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Encoded image -> augmented uint8 [size, size, 3] for training."""
    if aug.crop == "inception":
        im = decode(data, size, lambda w, h: inception_box(w, h, aug.min_area, rng))
    else:
        im = decode(data, size, center_box)
    if aug.flip and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = np.asarray(im)
    if aug.crop == "translate" and aug.crop_padding:
        p = aug.crop_padding
        padded = np.pad(out, ((p, p), (p, p), (0, 0)))
        dy, dx = rng.integers(0, 2 * p + 1, 2)
        out = padded[dy:dy + size, dx:dx + size]
    return np.ascontiguousarray(out)


def eval_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: resize the shorter side and centre-crop."""
    return np.asarray(decode(data, size, center_box))


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """The same augmentation on a float batch [B, 3, S, S] already at the training resolution (data in memory)."""
    size = x.shape[-1]
    if aug.crop == "inception":
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        crops = []
        for i in range(x.shape[0]):
            left, top, w, h = inception_box(size, size, aug.min_area, rng)
            crops.append(F.interpolate(x[i:i + 1, :, top:top + h, left:left + w], size=(size, size),
                                       mode="bilinear", antialias=True, align_corners=False))
        x = torch.cat(crops)
    elif aug.crop == "translate" and aug.crop_padding:
        p = aug.crop_padding
        padded = F.pad(x, (p, p, p, p), value=-1.0)  # black, as `train_image` pads uint8 zeros ([-1, 1] input)
        offsets = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])
    if aug.flip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x
