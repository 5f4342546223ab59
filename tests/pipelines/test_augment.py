"""The one image path (`augment.decode`): crops chosen in the original image; JPEGs decoded by libjpeg-turbo at the
DCT scale that still covers the crop, down to its bottom edge, and resized by torch; other formats exactly as PIL
resizes the box."""

import io

import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.data import augment
from pipelines.data.augment import Augment, draft_scale, inception_box, jpeg_frame, train_image


def _encoded(image: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}), **options)
    return buf.getvalue()


def _smooth(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 64 * 4], -1).astype(np.uint8)


def test_draft_scale_is_the_largest_that_covers_the_crop_on_both_sides():
    assert draft_scale(256, 300, 32) == 8 and draft_scale(255, 300, 32) == 4
    assert draft_scale(300, 64, 32) == 2 and draft_scale(300, 63, 32) == 1
    assert draft_scale(440, 350, 224) == 1  # an ImageNet-sized crop at 224 px is decoded whole


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("crop", ["inception", "translate", "none"])
def test_png_is_pil_resizing_the_box_bit_for_bit(crop, mode):
    """PNG (the procedural sources: the default study's numbers) stays PIL's decode and resize, flip and padding."""
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    pil = Image.fromarray(image).convert(mode)
    data, aug = _encoded(np.asarray(pil), "PNG"), Augment(crop=crop, flip=True)
    rng, draws = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(20):
        left, top, w, h = inception_box(56, 40, aug.min_area, draws) if crop == "inception" else (8, 0, 40, 40)
        expected = np.asarray(pil.convert("RGB").resize((16, 16), Image.BILINEAR, box=(left, top, left + w, top + h)))
        if draws.random() < 0.5:
            expected = expected[:, ::-1]
        if crop == "translate":
            dy, dx = draws.integers(0, 9, 2)
            expected = np.pad(expected, ((4, 4), (4, 4), (0, 0)))[dy:dy + 16, dx:dx + 16]
        assert np.array_equal(train_image(data, 16, aug, rng), expected)


def _snapped_reference(full: Image.Image, box, size: int) -> np.ndarray:
    """PIL's full decode, the box as `decode` snaps it to the grid of its DCT scale, PIL's resize."""
    left, top, w, h = box
    scale = draft_scale(w, h, size)
    x0, y0, x1, y1 = (round(v / scale) * scale for v in (left, top, left + w, top + h))
    return np.asarray(full.resize((size, size), Image.BILINEAR,
                                  box=(x0, y0, min(x1, full.width), min(y1, full.height))), dtype=float)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}], ids=["420", "progressive", "444"])
def test_jpeg_crops_decoded_at_a_dct_scale_match_the_full_decode(monkeypatch, options):
    """Same box draws, same geometry: a crop of a 1/2..1/8-scale decode, stopped below the crop, is the full
    decode's crop within JPEG noise (within rounding at full scale)."""
    data = _encoded(_smooth(353, 451), "JPEG", **options)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    real, shapes = simplejpeg.decode_jpeg, []

    def spy(*args, **kwargs):
        shapes.append(real(*args, **kwargs).shape[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(augment.simplejpeg, "decode_jpeg", spy)
    rng = np.random.default_rng(0)
    for size, worst, mean in [(24, 2.5, 1.5), (224, 0.1, 0.02)]:
        errors = []
        for _ in range(60):
            box = inception_box(451, 353, 0.05, rng)
            crop = augment.decode(data, size, lambda width, height, b=box: b)
            errors.append(np.abs(crop - _snapped_reference(full, box, size)).mean())
        assert max(errors) < worst and np.mean(errors) < mean, size
    scales = {-(-451 // width) for _, width in shapes}
    assert scales == {1, 2, 4, 8}  # every scale used ...
    rows = [height * scale for (height, width), scale in zip(shapes, (-(-451 // w) for _, w in shapes), strict=True)]
    assert (min(rows) < 200) != bool(options.get("progressive"))  # ... rows below the crop skipped when sequential


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_decoding_stops_below_the_crop_with_its_rows_bit_for_bit_a_full_decodes(subsampling):
    """The shortened frame changes no pixel of the crop (libjpeg upsamples chroma from the row below: a margin)."""
    data = _encoded(np.random.default_rng(0).integers(0, 255, (301, 203, 3), dtype=np.uint8), "JPEG",
                    subsampling=subsampling)
    frame, rng = jpeg_frame(data), np.random.default_rng(1)
    for size in (8, 16, 32, 64, 200):
        for _ in range(20):
            left, top, w, h = box = inception_box(203, 301, 0.05, rng)
            pixels, scale = augment.decode_jpeg_region(data, frame, box, size)
            full = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-301 // scale), min_width=-(-203 // scale))
            bottom = -(-(top + h) // scale)
            assert len(pixels) == min(len(full), -(-(top + h) // scale) + 2)  # two rows below the crop
            assert np.array_equal(pixels[:bottom], full[:bottom])


def test_the_decoded_crop_never_falls_below_the_target_size(monkeypatch):
    """Whatever the box, the DCT scale leaves the crop at least `size` on both sides where it had that much."""
    data = _encoded(_smooth(300, 400), "JPEG")
    real, seen = augment.resize_uint8, []
    monkeypatch.setattr(augment, "resize_uint8",
                        lambda pixels, size: seen.append(pixels.shape[:2]) or real(pixels, size))
    rng = np.random.default_rng(0)
    for size in (8, 16, 32, 48, 100):
        for _ in range(100):
            box = inception_box(400, 300, 0.05, rng)
            augment.decode(data, size, lambda width, height, b=box: b)
            assert min(box[2:]) < size or min(seen[-1]) >= size, (box, size, seen[-1])


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_decode_as_pil_converts_them(mode):
    """Grayscale goes through libjpeg-turbo; CMYK (PIL converts it its own way) through PIL, as before."""
    image = Image.fromarray(_smooth(120, 160)).convert(mode)
    data = _encoded(np.asarray(image), "JPEG") if mode == "L" else _jpeg_of(image)
    assert (jpeg_frame(data) is None) == (mode == "CMYK")
    box = (10, 20, 100, 90)
    out = augment.decode(data, 48, lambda width, height: box)
    expected = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 48), Image.BILINEAR, box=(10, 20, 110, 110))
    assert out.shape == (48, 48, 3) and np.abs(out - np.asarray(expected, dtype=float)).mean() < 0.1


def _jpeg_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_cut_or_corrupt_jpegs_are_rejected_as_pil_rejects_them():
    data = _encoded(_smooth(200, 300), "JPEG")
    box_fn = lambda width, height: (0, 0, 40, 40)  # noqa: E731 (the crop ends far above any cut)
    for cut in (data[:len(data) // 2], data[:len(data) - 100]):
        assert jpeg_frame(cut) is None  # no end-of-image marker: PIL decides ...
        with pytest.raises(OSError, match="truncated"):  # ... and never accepts a truncated image
            augment.decode(cut, 16, box_fn)
    broken = bytearray(data)
    broken[2:40] = bytes(38)  # the markers gone
    with pytest.raises(OSError):
        augment.decode(bytes(broken), 16, box_fn)
    with_trailer = data + b"\0" * 8  # trailing bytes: PIL decodes it, as before
    assert jpeg_frame(with_trailer) is None and augment.decode(with_trailer, 16, box_fn).shape == (16, 16, 3)


def test_resize_uint8_is_torchs_antialiased_bilinear_interpolate():
    """The out= form of the kernel F.interpolate calls: the same pixels, written channels-last."""
    pixels = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)[5:80, 3:60]
    for size in (16, 64, 100):
        nchw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        expected = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].permute(1, 2, 0).numpy()
        out = augment.resize_uint8(pixels, size)
        assert out.flags.c_contiguous and np.array_equal(out, expected)
        reference = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.BILINEAR))
        assert np.abs(out.astype(int) - reference).max() <= 1  # and PIL's within +-1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_eval_image_is_the_centre_square_resized(fmt):
    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 20:80] = 255  # white centre square, black either side
    out = augment.eval_image(_encoded(image, fmt), 30)
    assert out.shape == (30, 30, 3) and out.min() > 200
