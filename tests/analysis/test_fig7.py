"""Fig 7 at two sizes: a model's panels at its smallest and largest subset, composited into one PNG."""

import numpy as np
from PIL import Image

from analysis.plots import fig7_side_by_side


def _png(path, height: int, width: int, grey: int):
    Image.fromarray(np.full((height, width, 3), grey, np.uint8)).save(path)
    return path


def test_the_smallest_subset_sits_above_the_largest_padded_white_at_the_panels_dpi(tmp_path):
    """One above the other, so each keeps the width it was drawn at (side by side, two 12-inch panels shrank to half
    on the report's page, their text ~5 px); the panels' dpi travels, so the report sizes the PNG at print size."""
    from analysis.report import css_width

    small, mid, large = (_png(tmp_path / f"{n}.png", h, w, g) for n, h, w, g in
                         ((10, 40, 30, 0), (20, 45, 30, 90), (30, 50, 36, 60)))
    for path in (small, large):
        Image.open(path).save(path, dpi=(120, 120))
    panels = {"ViT-B/16": [(30, large), (10, small), (20, mid)], "ViT-Pico/4": [(10, small)]}
    written = fig7_side_by_side(panels, tmp_path)
    assert [p.name for p in written] == ["fig7_ViT-B-16_n10_vs_n30.png", "fig7_ViT-Pico-4_n10_vs_n10.png"]
    both = np.asarray(Image.open(written[0]))
    assert both.shape == (40 + 20 + 50, 36, 3)  # the smallest, a 20-pixel white gap, the largest; the wider width
    assert (both[:40, :30] == 0).all() and (both[:40, 30:] == 255).all() and (both[40:60] == 255).all()
    assert (both[60:] == 60).all()
    assert np.asarray(Image.open(written[1])).shape == (40, 30, 3)  # one subset: its panel once
    assert css_width(written[0]) == round(36 * 96 / 120)


def test_a_panel_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A driver killed while it draws a Fig 7 panel leaves no half-written PNG: the panel is drawn once by name, so
    a rerun would take a partial file for a finished one (and fail reading it)."""
    import os

    from analysis.plots import fig7_panels
    from pipelines import atomic
    from pipelines.diagnostics import Diagnostics

    rng = np.random.default_rng(0)
    diag = Diagnostics("ViT", {"posemb_locality": 0.5, "attn_dist_uniform": 16.5},
                       filters=rng.normal(size=(4, 4, 4, 3)), posemb_sim=rng.uniform(-1, 1, (3, 3, 3, 3)),
                       attn_distance=rng.uniform(5, 20, (2, 4)))
    path = tmp_path / "points" / "fig7_ViT-Pico-4_n256_s0_619b45c0.png"
    replace = os.replace

    def killed(*args):  # the process dies after the bytes are written, before they are renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    try:
        fig7_panels(diag, path, "ViT-Pico/4, 256 pretraining examples")
    except KeyboardInterrupt:
        pass
    assert not path.exists() and list(path.parent.iterdir()) == []  # nor its temporary file
    monkeypatch.setattr(atomic.os, "replace", replace)
    assert fig7_panels(diag, path, "ViT-Pico/4, 256 pretraining examples") == path
    assert Image.open(path).format == "PNG" and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_partial_panel_left_by_an_older_release_is_not_taken_for_a_drawn_one(tmp_path):
    from study.run import _whole_png

    whole = _png(tmp_path / "whole.png", 40, 30, 90)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:60])
    (tmp_path / "empty.png").write_bytes(b"")
    assert _whole_png(whole) and not _whole_png(cut) and not _whole_png(tmp_path / "empty.png")


def test_a_point_remeasured_with_other_arrays_gets_its_panel_drawn_anew(tmp_path):
    """Diagnostics re-run with other settings rewrite the point's arrays: its panel is named by them, so it is drawn
    again (the old PNG, named by the point alone, reached MLflow and the report), and the old one goes."""
    from types import SimpleNamespace

    from pipelines import diagnostics
    from pipelines.diagnostics import Diagnostics
    from study.config import expand, load_study
    from study.run import fig7_panel
    from study.storage import PointFiles, Storage
    from tests.conftest import ROOT

    point = expand(load_study(ROOT / "configs" / "smoke.yaml", ["models=[ViT-Pico/4]"]))[0]
    where = SimpleNamespace(storage=Storage(str(tmp_path / "storage")))
    drawn = []
    for seed in (0, 1, 1):
        rng = np.random.default_rng(seed)
        diag = Diagnostics("ViT", {"posemb_locality": 0.5, "attn_dist_uniform": 16.5},
                           filters=rng.normal(size=(4, 4, 4, 3)), posemb_sim=rng.uniform(-1, 1, (3, 3, 3, 3)),
                           attn_distance=rng.uniform(5, 20, (2, 4)))
        where.storage.write_bytes(PointFiles(point.id).fig7, diagnostics.to_bytes(diag))
        drawn.append(fig7_panel(point, where, tmp_path / "points"))
    assert drawn[0] != drawn[1] == drawn[2]  # new arrays, a new panel; the same arrays, the same one
    assert sorted(p.name for p in (tmp_path / "points").iterdir()) == [drawn[1].name]
