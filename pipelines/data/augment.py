"""Image decoding and augmentation, per image in the streaming loader's workers: training crops, flips and shifts
(`train_image`) and the evaluation transform (`eval_image`), from the encoded bytes to uint8 pixels."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simplejpeg
import torch
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
    w, h = (round(height * 4 / 3), height) if aspect > 4 / 3 else (
        (width, round(width * 4 / 3)) if aspect < 3 / 4 else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square crop of the shorter side: resize + centre crop, the evaluation transform."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def draft_scale(w: int, h: int, size: int) -> int:
    """The largest JPEG DCT down-scaling (1, 2, 4 or 8) at which a `w` x `h` crop still has at least `size` pixels
    on both sides, so that resizing it to `size` x `size` never upsamples what a full decode would have
    downsampled. libjpeg-turbo also decodes at 7/8 .. 3/8, but without SIMD: 5/8 to 7/8 cost more than a full
    decode and 3/8 as much as 1/2 (measured with simplejpeg on 400-500 px JPEGs), so only powers of two pay."""
    return next((s for s in (8, 4, 2) if min(w, h) >= s * size), 1)


@dataclass(frozen=True)
class JpegFrame:
    """What `decode` needs from a JPEG's frame header (SOF)."""

    width: int
    height: int
    height_at: int  # byte offset of the header's 2-byte height
    sequential: bool  # one scan, MCU rows top to bottom: decoding can stop below the crop


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG that libjpeg-turbo decodes here as PIL would, else None (PIL decodes it).

    None for anything but a complete 1- or 3-component Huffman JPEG within PIL's decompression-bomb limit: PNG and
    other formats, no end-of-image marker at the end (a cut file, which PIL rejects, or trailing bytes), CMYK and
    YCCK (PIL converts those its own way), arithmetic, lossless or hierarchical coding, a height given later (DNL).
    """
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended sequential, progressive (Huffman)
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            parts = data[i + 9]
            if parts not in (1, 3) or not 0 < width * height <= Image.MAX_IMAGE_PIXELS:
                return None
            return JpegFrame(width, height, i + 5, sequential=marker != 0xC2)
        if marker in (0xD9, 0xDA) or 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # another frame type, or a scan before any frame
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode(data: bytes, size: int, box_fn) -> np.ndarray:
    """Decode `data` and resize the crop `box_fn(width, height)` to uint8 [size, size, 3] (bilinear, antialiased).

    The box is chosen in the original image's coordinates, so the sampled crops do not depend on the decoding.
    A JPEG (`jpeg_frame`) is decoded by libjpeg-turbo (simplejpeg) at the largest DCT scale that still covers
    `size` on both sides of the crop (`draft_scale`), and a sequential one only down to the crop's bottom edge:
    rows above the crop must still be entropy-decoded, those below are never read. The crop, snapped to the
    decoded pixel grid (exact at full scale; under half a decoded pixel, so under half an output pixel, at 1/2 to
    1/8), is resized by torch's vectorised uint8 kernel: twice as fast as PIL's, within +-1 of it on almost all
    pixels. Everything else (PNG: the procedural sources) is decoded and resized by PIL exactly as before.

    Raises:
        OSError: the bytes are not a complete image (a truncated image is never accepted: PIL's
            LOAD_TRUNCATED_IMAGES stays off, and a JPEG libjpeg-turbo fails on is handed to PIL).
    """
    frame = jpeg_frame(data)
    if frame is None:
        return _pil_decode(data, size, box_fn)
    box = box_fn(frame.width, frame.height)
    try:
        pixels, scale = decode_jpeg_region(data, frame, box, size)
    except ValueError:  # libjpeg-turbo's fatal errors: PIL decides, as before
        return _pil_decode(data, size, lambda width, height: box)
    left, top, w, h = box
    x0, y0 = round(left / scale), round(top / scale)
    x1, y1 = max(round((left + w) / scale), x0 + 1), max(round((top + h) / scale), y0 + 1)
    return resize_uint8(pixels[y0:y1, x0:x1], size)


def decode_jpeg_region(data: bytes, frame: JpegFrame, box: tuple[int, int, int, int],
                       size: int) -> tuple[np.ndarray, int]:
    """What `decode` decodes of a JPEG for crop `box` at `size`: uint8 [rows, width, 3] at 1/scale, and scale."""
    left, top, w, h = box
    scale, rows = draft_scale(w, h, size), frame.height
    if frame.sequential:  # two decoded rows of margin: the crop's rows are then those of a full decode, bit for bit
        rows = min(rows, top + h + 2 * scale)  # (one is enough for libjpeg's chroma upsampling: tests/pipelines)
    if rows < frame.height:  # a shorter frame: libjpeg stops there (and skips the rest, with a warning)
        data = data[:frame.height_at] + rows.to_bytes(2, "big") + data[frame.height_at + 2:]
    out_h, out_w = -(-rows // scale), -(-frame.width // scale)  # libjpeg rounds scaled sizes up
    # simplejpeg takes the smallest of libjpeg-turbo's M/8 scales that gives at least these sizes: 1/scale.
    pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=out_h, min_width=out_w, strict=False)
    if pixels.shape[:2] != (out_h, out_w):
        raise ValueError(f"decoded {pixels.shape[:2]}, expected {(out_h, out_w)}")
    return pixels, scale


def resize_uint8(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3], bilinear and antialiased: torch's vectorised uint8 kernel (F.interpolate's,
    `antialias=True`), reading the HWC array and writing the HWC result as channels-last NCHW views. Its `out=` form
    writes channels-last directly, where F.interpolate returns NCHW: 40% less time, and no transpose after."""
    out = np.empty((size, size, pixels.shape[2]), np.uint8)
    torch.ops.aten._upsample_bilinear2d_aa.out(torch.from_numpy(pixels).permute(2, 0, 1)[None], [size, size], False,
                                               None, None, out=torch.from_numpy(out).permute(2, 0, 1)[None])
    return out


def _pil_decode(data: bytes, size: int, box_fn) -> np.ndarray:
    """PIL's decode (a JPEG at the `draft_scale` PIL offers) and PIL's resize of the box."""
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
    return np.array(im.resize((size, size), Image.BILINEAR, box=box))  # writable: `train_image` flips in torch


def train_image(data: bytes, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Encoded image -> augmented uint8 [size, size, 3] for training."""
    return augment_decoded(train_decode(data, size, aug, rng), aug, rng)


def train_decode(data: bytes, size: int, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """`train_image`'s decode: the random inception crop, else the centre square, resized to `size`."""
    if aug.crop == "inception":
        return decode(data, size, lambda w, h: inception_box(w, h, aug.min_area, rng))
    return decode(data, size, center_box)


def decode_is_fixed(aug: Augment) -> bool:
    """Whether `train_decode` gives the same image every time (no random crop): then the decoded image can be kept
    and `augment_decoded` applied to it, with the same result as decoding again."""
    return aug.crop != "inception"


def augment_decoded(out: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """What `train_image` does after the decode: the random flip, then the translate (pad with black by
    `crop_padding`, crop back at a random offset), drawing from `rng` in that order. Never writes to `out`."""
    if aug.flip and rng.random() < 0.5:
        out = torch.from_numpy(out).flip(1).numpy()  # a numpy flip of 3-byte pixels is 30x slower
    if aug.crop == "translate" and aug.crop_padding:
        p = aug.crop_padding
        dy, dx = (int(d) - p for d in rng.integers(0, 2 * p + 1, 2))  # the shift, as a crop of the padded image
        size = out.shape[0]
        shifted = np.zeros_like(out)  # = np.pad(out, p)[p + dy:p + dy + size, p + dx:p + dx + size], 6x faster
        if max(abs(dy), abs(dx)) < size:  # else shifted out entirely: all black
            shifted[max(-dy, 0):size - max(dy, 0), max(-dx, 0):size - max(dx, 0)] = \
                out[max(dy, 0):size - max(-dy, 0), max(dx, 0):size - max(-dx, 0)]
        out = shifted
    return np.ascontiguousarray(out)


def eval_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: resize the shorter side and centre-crop."""
    return decode(data, size, center_box)
