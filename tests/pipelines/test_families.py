"""The model-family table: torch-free, complete, and a new family reaches every stage through its rows alone."""

import dataclasses
import operator
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
import torch
from timm.models.convnext import ConvNeXt

from analysis import intervals, report, results
from pipelines import diagnostics, families, models
from pipelines.config import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[2]


def test_analysis_and_the_family_table_import_without_torch():
    code = ("import sys, pipelines.families, analysis.results, analysis.intervals, analysis.plots, analysis.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_unknown_family_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model family 'CNN'; valid families: ViT, BiT, Hybrid"):
        families.get("CNN")


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_family_resolves_its_builder_and_its_diagnostic_parts(family):
    row = families.get(family)
    assert callable(pkgutil.resolve_name(row.builder))
    (name, spec) = min(((n, s) for n, s in models.MODELS.items() if s.family == family),
                       key=lambda item: not item[1].cpu_sized)  # a CPU-sized row where there is one
    with torch.device("meta"):
        model = models.build(name, 10, 32 if spec.cpu_sized else 224)
    paths = [] if row.diagnostic is None else [getattr(row.diagnostic, f.name) for f in
                                               dataclasses.fields(row.diagnostic)]
    for path in filter(None, paths):
        assert operator.attrgetter(path)(model) is not None, f"{family}: no '{path}' on {name}"
    assert families.with_bias(row.bias).count(family) == 1


# --- a toy family added through the tables alone: a ConvNeXt, strong bias, no Fig 7 numbers -------------------

def build_convnext(kw: dict, num_classes: int, image_size: int, options: models.ModelOptions) -> torch.nn.Module:
    """The toy family's builder, found through its family row's `builder` path (its row takes no knobs)."""
    return ConvNeXt(num_classes=num_classes, **kw)


@pytest.fixture
def toy_family(monkeypatch):
    row = families.Family("ConvNeXt", "ConvNeXt", "strong", f"{__name__}:build_convnext", None, True, "D",
                          "#6a4c93")
    spec = models.ModelSpec("ConvNeXt-Pico", "ConvNeXt", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                                               patch_size=2), cpu_sized=True)
    monkeypatch.setitem(families.FAMILIES, row.name, row)
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    return row


def test_a_new_family_is_built_and_fine_tuned_through_its_rows(toy_family):
    model = models.build("ConvNeXt-Pico", 10, 32)
    assert isinstance(model, ConvNeXt) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    tuned = models.pretrained_for_task("ConvNeXt-Pico", model.state_dict(), 4, 48)  # finds its head by itself
    assert torch.equal(tuned(torch.randn(2, 3, 48, 48)), torch.zeros(2, 4))
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    diag = diagnostics.run(model, "ConvNeXt", images, 32, torch.device("cpu"))  # no diagnostic: no numbers
    assert diag.family == "ConvNeXt" and diag.metrics == {} and not diag.has_panel


def _rows(model: str, offset: float) -> list[dict]:
    out = []
    for seed in (0, 1):
        for n in (1e3, 1e4, 1e5, 1e6):
            fields = {"model": model, "family": models.get_spec(model).family, "subset_size": n,
                      "examples_seen": 3 * n, "pretrain_flops": 1e6 * n, "seed": seed}
            value = offset + 10 * np.log10(n) * (1.5 if offset < 0 else 1.0) + seed * 0.3
            out += results.rows(fields, [SimpleNamespace(eval="fewshot", dataset="d", shots=5, metric="top1",
                                                         value=value, spread=None)])
    return out


def test_a_new_family_reaches_the_results_table_the_figures_and_the_report(toy_family, tmp_path, monkeypatch):
    table = results.build_table(_rows("ViT-Pico/4", -20.0) + _rows("ConvNeXt-Pico", 10.0))
    results.write(table, tmp_path / "results.csv")
    table = results.read(tmp_path / "results.csv")  # the family column is checked against the table
    assert set(table["family"]) == {"ViT", "ConvNeXt"}
    drawn = []
    save = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    md = report.write_report(table, tmp_path / "out").read_text()
    assert md.startswith("# scaling study: ViT vs ConvNeXt across")  # its label, on the strong-bias side
    assert "| ViT-Pico/4 | ConvNeXt-Pico |" in md  # paired with the ViT in the crossover table
    legends = [t.get_text() for fig in drawn for ax in fig.axes if ax.get_legend()
               for t in ax.get_legend().get_texts()]
    markers = {line.get_marker() for fig in drawn for ax in fig.axes for line in ax.get_lines()}
    assert "ConvNeXt" in legends and toy_family.marker in markers
    monkeypatch.delitem(families.FAMILIES, "ConvNeXt")
    with pytest.raises(UserError, match="column 'family' row .* is 'ConvNeXt'"):
        results.read(tmp_path / "results.csv")


def test_the_crossover_pairs_weak_with_strong_bias_families(toy_family):
    table = pd.DataFrame({"model": ["ViT-Pico/4", "R50x1+ViT-B/16", "BiT-R14-Pico", "ConvNeXt-Pico"],
                          "family": ["ViT", "Hybrid", "BiT", "ConvNeXt"]})
    assert sorted(intervals.model_pairs(table)) == sorted(
        [(v, r) for v in ("ViT-Pico/4", "R50x1+ViT-B/16") for r in ("BiT-R14-Pico", "ConvNeXt-Pico")])
