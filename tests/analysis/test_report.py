"""The report end to end from a CSV: summary.json schema, files, and a rendered check in headless Chromium."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import fits
from tests.conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _table(tmp_path):
    rows = []
    for model, family, (a, b) in (("ViT-B/16", "ViT", (3000, 0.5)), ("BiT-R50x1", "BiT", (150, 0.2))):
        for seed in (0, 1):
            for n in np.geomspace(1e4, 1e7, 6):
                for evaluation, shots in (("fewshot", 5), ("finetune", None)):
                    rows.append({"model": model, "family": family, "subset_size": n, "examples_seen": 7 * n,
                                 "pretrain_flops": 3e9 * 7 * n * (1.5 if family == "ViT" else 1.0),
                                 "eval": evaluation, "dataset": "imagenet", "shots": shots, "metric": "top1",
                                 "value": 100 - fits.power_law(n, a, b, 5) + 0.2 * seed, "seed": seed})
    path = tmp_path / "published.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("report")
    proc = run_cli(["-m", "analysis.report", "--results", str(_table(tmp)), "--out", str(tmp / "out")], cache_dir)
    assert proc.returncode == 0, proc.stderr
    return tmp / "out"


def test_summary_json_has_the_documented_schema(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    assert set(summary) == {"points", "gaps", "fits", "extrapolation", "crossovers", "pareto", "verdict"}
    assert summary["verdict"]["sentence"].startswith("The lead changes between BiT-R50x1 and ViT-B/16")
    (cross,) = [c for c in summary["crossovers"] if c["eval"] == "fewshot"]
    assert {"vit", "resnet", "eval", "dataset", "shots", "metric", "status", "estimate", "bracket", "ci"} <= set(cross)
    assert cross["status"] == "observed" and cross["shots"] == 5
    assert cross["estimate"] == pytest.approx((3000 / 150) ** (1 / 0.3), rel=0.25)
    fit = next(f for f in summary["fits"] if f["model"] == "ViT-B/16" and f["eval"] == "fewshot")
    assert fit["bootstrap"] == "seeds"
    held = next(r for r in summary["extrapolation"] if r["model"] == "ViT-B/16" and r["eval"] == "fewshot")
    assert held["family"] == "ViT" and held["size"] == pytest.approx(1e7) and abs(held["error"]) < 1.0
    assert all({"eval", "dataset", "metric", "points"} <= set(p) for p in summary["pareto"])


def test_report_files_and_figures(report_dir):
    for name in ("fig3_finetune_vs_data", "fig4_fewshot_vs_data", "fig5_accuracy_vs_compute", "fit_diagnostics"):
        assert (report_dir / "figures" / f"{name}.png").stat().st_size > 5000
        assert (report_dir / "figures" / f"{name}.pdf").exists()
    md = (report_dir / "report.md").read_text()
    assert "## Where does the ViT overtake the ResNet?" in md and "| ViT-B/16 | BiT-R50x1 |" in md
    assert "### Extrapolation error" in md
    assert "| ViT-B/16 | ViT | fewshot / imagenet / 5-shot / top1 | 10,000,000 |" in md
    page = (report_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page


class _Page(HTMLParser):
    """The report page's elements in document order: (tag, attributes, text)."""

    def __init__(self):
        super().__init__()
        self.elements: list[list] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append([tag, dict(attrs), ""])

    def handle_data(self, data):
        if self.elements:
            self.elements[-1][2] += data


def test_report_html_reads_as_a_figure_page(report_dir):
    """The verdict first, then Fig 4 and Fig 3 with their captions, then the crossover table; nothing wider than
    a 1,400 px window."""
    page = (report_dir / "report.html").read_text()
    parser = _Page()
    parser.feed(page)
    tags = [(tag, attrs.get("class"), attrs.get("alt"), text) for tag, attrs, text in parser.elements]
    first_figure = next(i for i, t in enumerate(tags) if t[0] == "figure")
    verdict_at = next(i for i, t in enumerate(tags) if t[1] == "verdict")
    assert verdict_at < first_figure and not any(t[0] in ("table", "h2") for t in tags[:first_figure])
    assert tags[verdict_at][3].startswith("The lead changes between BiT-R50x1 and ViT-B/16")
    order = [t[2] for t in tags if t[0] == "img"]
    assert order == ["fig4_fewshot_vs_data", "fig3_finetune_vs_data", "fig5_accuracy_vs_compute", "fit_diagnostics"]
    captions = [t[3] for t in tags if t[0] == "figcaption"]
    assert len(captions) == 4 and captions[0].startswith("Fig 4 analog") and captions[1].startswith("Fig 3 analog")
    assert all("What to see" in c for c in captions[:3])
    first_table = next(i for i, t in enumerate(tags) if t[0] == "table")
    assert tags[first_table - 3][3] == "Where does the ViT overtake the ResNet?"  # h2, its note, its box, the table
    assert tags.index(next(t for t in tags if t[2] == "fig3_finetune_vs_data")) < first_table
    widths = [int(w) for w in re.findall(r'width="(\d+)"', page) + re.findall(r"width:(\d+)px", page)]
    assert widths and max(widths) <= 1400
    assert page.count('<div class="scroll"><table>') == page.count("<table>")  # wide tables scroll in their box


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: "
                                             "apt-get install chromium)")
def test_report_html_renders_with_its_figures_in_headless_chromium(report_dir, tmp_path):
    url = (report_dir / "report.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--window-size=1400,900", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert 'data-figures="loaded"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-overflow="no"' in dom.stdout  # no horizontal scroll at 1,400 px
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,1800", url], capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1800, 1200) and pixels.std() > 10  # not a blank page


def test_a_size_on_a_figure_reads_as_a_size():
    """A crossover's estimate is a fractional number of images: its label on a figure rounds it as sizes are."""
    from analysis.plots import _short

    assert [_short(n) for n in (879.824, 999.6, 12.345, 8192, 2.5e6, 0.5)] == ["880", "1000", "12.3", "8.19k",
                                                                              "2.5M", "0.5"]
