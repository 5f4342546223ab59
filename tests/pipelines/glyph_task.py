"""A small real image task for evaluation tests: characters drawn with Pillow's built-in font at a random size,
position, rotation and contrast polarity, with pixel noise, stored as JPEG (q90) in webdataset tar shards.

Letters make a pretraining source, digits a downstream task: the strokes a model learns on one transfer to the
other, so a frozen probe of a briefly pretrained small model is far above chance and fine-tuning has a
meaningful target to reach.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

LETTERS = "ABCDEFGHJKLMNPQR"
DIGITS = "0123456789"


def render(chars: str, index: int, seed: int, size: int = 32) -> tuple[np.ndarray, int]:
    """Example `index`: (uint8 image [size, size, 3], label); label = index mod the number of characters."""
    rng = np.random.default_rng([seed, index])
    label = index % len(chars)
    dark = rng.random() < 0.5  # light glyph on a dark ground, or the reverse
    bg = np.clip(rng.integers(170, 256) - (0 if dark else 150) + rng.integers(-25, 26, 3), 0, 255)
    fg = np.clip(255 - bg + rng.integers(-25, 26, 3), 0, 255)
    big = 2 * size  # drawn at twice the size, then rotated and downsampled
    im = Image.new("RGB", (big, big), tuple(int(v) for v in bg))
    font = ImageFont.load_default(size=int(rng.integers(int(big * 0.6), int(big * 0.85))))
    centre = big / 2 + rng.normal(0, big * 0.08, 2)
    ImageDraw.Draw(im).text(tuple(centre), chars[label], fill=tuple(int(v) for v in fg), font=font, anchor="mm")
    im = im.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in bg))
    pixels = np.asarray(im.resize((size, size), Image.BILINEAR)).astype(np.float32)
    return np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8), label


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def images(chars: str, n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n examples through a JPEG round trip, as a model reading the shards sees them: (images, labels)."""
    drawn = [render(chars, i, seed, size) for i in range(n)]
    decoded = [np.asarray(Image.open(io.BytesIO(jpeg(im))).convert("RGB")) for im, _ in drawn]
    return np.stack(decoded), np.asarray([label for _, label in drawn], dtype=np.int64)


def write_shards(out: Path, split: str, chars: str, n: int, seed: int, size: int = 32,
                 per_shard: int = 500) -> list[str]:
    """`out/<split>-NNNNNN.tar` with `.jpg` + `.cls` samples; returns the shard paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, per_shard):
        path = out / f"{split}-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + per_shard, n)):
                image, label = render(chars, i, seed, size)
                sink.write({"__key__": f"{split}{i:06d}", "jpg": jpeg(image), "cls": str(label).encode()})
        paths.append(str(path))
    return paths


def digit_task(root: Path, train: int, test: int):
    """The digit task as JPEG shards under `root` (`train` / `test` images), and its `SourceConfig`."""
    from pipelines import data

    train_shards = write_shards(root, "train", DIGITS, train, seed=1)
    test_shards = write_shards(root, "test", DIGITS, test, seed=2)
    return data.SourceConfig(source="webdataset", name="digits", size=train, test_size=test, image_size=32,
                             num_classes=10, urls=";".join(train_shards), test_urls=";".join(test_shards))


ASSET = Path(__file__).parent / "assets" / "bit-r14-pico-letters.safetensors"


def pretrain_letters(out: Path = ASSET, steps: int = 1200) -> None:
    """How the test asset was made: BiT-R14-Pico pretrained on 2,048 letter images at 32 px (AdamW lr 3e-3,
    batch 32, 1,200 steps, translate pad 2; ~3 min on one core; train top-1 99.8%), stored as float16.
    Its frozen features probe the digit task at 95.9% (1,400 train / 1,000 test images).

    The asset was made by the in-memory training path since removed (batches and augmentation drawn in another
    order): this, which streams the same images from tiny shards, makes a model of the same recipe, not the
    asset's bytes."""
    import torch
    from safetensors.torch import save_file

    from pipelines import pretrain
    from pipelines.data.augment import Augment
    from pipelines.runtime import Runtime
    from tests.pipelines.tiny import as_shards

    x, y = images(LETTERS, 2048, seed=0)
    cfg = pretrain.PretrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=50,
                                  augment=Augment(crop="translate", crop_padding=2, flip=False))
    result = pretrain.run(cfg, "BiT-R14-Pico", as_shards(x, y), len(LETTERS), 32, Runtime(torch.device("cpu")))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in result.state_dict.items()}, str(out))


def pretrained_state() -> dict:
    """The asset's weights, as float32."""
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(ASSET)).items()}


if __name__ == "__main__":
    pretrain_letters()
