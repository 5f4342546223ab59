"""The one image path (`augment.decode`): crops chosen in the original image, JPEGs decoded at the DCT scale that
still covers the crop, other formats exactly as PIL resizes the box."""

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from pipelines.data import augment
from pipelines.data.augment import Augment, draft_scale, inception_box, train_image


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _smooth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 64 * 4], -1).astype(np.uint8)


def test_draft_scale_is_the_largest_that_covers_the_crop_on_both_sides():
    assert draft_scale(256, 300, 32) == 8 and draft_scale(255, 300, 32) == 4
    assert draft_scale(300, 64, 32) == 2 and draft_scale(300, 63, 32) == 1
    assert draft_scale(440, 350, 224) == 1  # an ImageNet-sized crop at 224 px is decoded whole


def test_png_crops_are_exactly_pil_resizing_the_box_drawn_in_the_original_image():
    """PNG (the procedural sources) decodes whole: the crop is bit for bit what it was before draft decoding."""
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    data, aug = _encoded(image, "PNG"), Augment(crop="inception", flip=False)
    rng, draws = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(20):
        left, top, w, h = inception_box(56, 40, aug.min_area, draws)
        expected = Image.fromarray(image).resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h))
        assert np.array_equal(train_image(data, 16, aug, rng), np.asarray(expected))


def test_jpeg_crops_decoded_at_a_dct_scale_match_the_full_decode(monkeypatch):
    """Same box draws, same geometry: a crop of a 1/2..1/8-scale decode is the full decode's crop within JPEG noise."""
    data = _encoded(_smooth(353, 451), "JPEG")
    full = Image.open(io.BytesIO(data)).convert("RGB")
    real, recorded = JpegImagePlugin.JpegImageFile.draft, []

    def spy(im, mode, size):
        recorded.append(im.width // size[0])
        return real(im, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(100):
        left, top, w, h = box = inception_box(451, 353, 0.05, rng)
        crop = np.asarray(augment.decode(data, 24, lambda width, height, b=box: b), dtype=float)
        reference = full.resize((24, 24), Image.BILINEAR, box=(left, top, left + w, top + h))
        errors.append(np.abs(crop - np.asarray(reference, dtype=float)).mean())
    assert set(recorded) == {2, 4, 8}  # every scale used ...
    assert max(errors) < 2.5 and np.mean(errors) < 1.5  # ... and the crops land where the full decode's do


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_image_is_the_centre_square_resized(fmt):
    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 20:80] = 255  # white centre square, black either side
    out = augment.eval_image(_encoded(image, fmt), 30)
    assert out.shape == (30, 30, 3) and out.min() > 200
