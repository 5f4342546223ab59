"""Fig 7 side by side: a model's panels at its smallest and largest subset, composited into one PNG."""

import numpy as np
from PIL import Image

from analysis.plots import fig7_side_by_side


def _png(path, height: int, width: int, grey: int):
    Image.fromarray(np.full((height, width, 3), grey, np.uint8)).save(path)
    return path


def test_the_smallest_and_largest_subsets_sit_side_by_side_padded_white(tmp_path):
    small, mid, large = (_png(tmp_path / f"{n}.png", h, 30, g) for n, h, g in ((10, 40, 0), (20, 45, 90), (30, 50, 60)))
    panels = {"ViT-B/16": [(30, large), (10, small), (20, mid)], "ViT-Pico/4": [(10, small)]}
    written = fig7_side_by_side(panels, tmp_path)
    assert [p.name for p in written] == ["fig7_ViT-B-16_n10_vs_n30.png", "fig7_ViT-Pico-4_n10_vs_n10.png"]
    both = np.asarray(Image.open(written[0]))
    assert both.shape == (50, 2 * (30 + 20), 3)  # the taller height; each panel and a 20-pixel white gap
    assert (both[:40, :30] == 0).all() and (both[40:, :30] == 255).all() and (both[:, 50:80] == 60).all()
    assert np.asarray(Image.open(written[1])).shape == (40, 50, 3)  # one subset: its panel once
