"""Several studies in one report: two synthetic smoke-style studies (one without few-shot) and the published table."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis import compare, fits, intervals, plots
from pipelines.config import UserError
from tests.conftest import ROOT

PUBLISHED = ROOT / "configs" / "published" / "vit_bit_imagenet.csv"
SIZES = (1024, 4096, 16384, 65536)  # the curves cross near 21.5k


def _study(folder, evaluations, shift=0.0):
    """A study's output folder with a results.csv: a ViT and a BiT on power laws that cross, 2 seeds."""
    rng = np.random.default_rng(len(evaluations))
    rows = []
    for model, family, (a, b) in (("ViT-Pico/4", "ViT", (3000, 0.5)), ("BiT-R14-Pico", "BiT", (150, 0.2))):
        for seed in (0, 1):
            for n in SIZES:
                for evaluation, shots in evaluations:
                    rows.append({"model": model, "family": family, "subset_size": n, "examples_seen": 4 * n,
                                 "pretrain_flops": 1e6 * n, "eval": evaluation, "dataset": "imagenet",
                                 "shots": shots, "metric": "top1", "seed": seed,
                                 "value": 100 - fits.power_law(n, a, b, 5) + shift + rng.normal(0, 0.3)})
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    a = _study(tmp / "smoke-a", [("finetune", None), ("fewshot", 5)])
    b = _study(tmp / "smoke-b", [("finetune", None)], shift=2.0)
    assert compare.main([str(a), str(b), str(PUBLISHED), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def test_one_figure_per_evaluation_and_a_study_missing_one_is_named(compared):
    for protocol in ("finetune", "fewshot"):
        assert (compared / "figures" / f"compare_{protocol}.png").stat().st_size > 5000
    summary = json.loads((compared / "summary.json").read_text())
    assert [s["label"] for s in summary["studies"]] == ["smoke-a", "smoke-b", "vit_bit_imagenet"]
    missing = {(e["eval"], e["shots"]): e["missing"] for e in summary["evaluations"]}
    assert missing == {("finetune", None): [], ("fewshot", 5): ["smoke-b", "vit_bit_imagenet"]}
    assert (compared / "report.html").read_text().count("data:image/png;base64,") == 2


def test_crossovers_and_gaps_side_by_side(compared):
    md = (compared / "report.md").read_text()
    assert "| evaluation | smoke-a | smoke-b | vit_bit_imagenet |" in md
    (fewshot,) = [line for line in md.splitlines() if line.startswith("| fewshot / imagenet / 5-shot / top1 | ViT")]
    assert fewshot.endswith("| missing | missing |") and "ViT-Pico/4 × BiT-R14-Pico: observed" in fewshot
    (finetune,) = [line for line in md.splitlines() if line.startswith("| finetune / imagenet / top1 | ViT")]
    assert finetune.count("ViT-Pico/4 × BiT-R14-Pico") == 2 and "ViT-B/16 × BiT-R152x4" in finetune
    gap_1k = [line for line in md.splitlines() if line.startswith("| finetune / imagenet / top1 | 1,024 |")]
    assert len(gap_1k) == 1 and gap_1k[0].endswith("| – |")  # the published table has no 1,024-image subset
    assert gap_1k[0].count("BiT-R14-Pico − ViT-Pico/4 +") == 2
    summary = json.loads((compared / "summary.json").read_text())
    assert {r["status"] for r in summary["extrapolation"]["vit_bit_imagenet"]} == {"not enough sizes"}
    assert all(r["status"] == "measured" for r in summary["extrapolation"]["smoke-a"])


def test_each_study_is_drawn_in_the_figure_of_an_evaluation_it_measured(tmp_path, monkeypatch):
    a = compare.Study("a", "a.csv", pd.read_csv(_study(tmp_path / "a", [("finetune", None)]) / "results.csv"))
    b = compare.Study("b", "b.csv", pd.read_csv(_study(tmp_path / "b", [("fewshot", 5)]) / "results.csv"))
    points = pd.concat([intervals.point_table(s.table).assign(study=s.label) for s in (a, b)])
    drawn = {}

    def texts(fig, out_dir, name):  # instead of saving: the panel notes and the legend's entries
        legend = fig.axes[-1].get_legend()
        drawn[name] = [t.get_text() for t in [*fig.axes[-1].texts, *(legend.get_texts() if legend else [])]]

    monkeypatch.setattr(plots, "_save", texts)
    plots.fig_studies_vs_data(points, "finetune", ["a", "b"], tmp_path)
    assert drawn["compare_finetune"] == ["missing: b", "a: BiT-R14-Pico", "a: ViT-Pico/4"]


def test_inputs_that_cannot_be_compared_fail_with_one_line(tmp_path, capsys):
    a = _study(tmp_path / "smoke", [("finetune", None)])
    assert compare.main([str(a), str(a), "--out", str(tmp_path / "out")]) == 2
    assert "--label" in capsys.readouterr().err
    assert compare.main([str(a), "mlflow:smoke", "--out", str(tmp_path / "out")]) == 2
    assert "python -m study.compare" in capsys.readouterr().err
    read = []
    with pytest.raises(UserError, match="several inputs are labelled x"):  # before any input is read
        compare.load([str(a), "mlflow:smoke"], ["x", "x"], lambda spec: read.append(spec))
    assert read == []
    for labels, message in ((["x", "x "], "several inputs are labelled x"), (["a|b", "c"], "without '|'"),
                            ([" ", "c"], "not empty")):  # a '|' split every markdown table's row
        with pytest.raises(UserError, match=message):
            compare.load([str(a), "mlflow:smoke"], labels, lambda spec: read.append(spec))
    assert read == []
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"has none (the studies' folders below it: {a})" in capsys.readouterr().err  # `--out`, not its study
    (tmp_path / "empty.csv").touch()
    assert compare.main([str(a), str(tmp_path / "empty.csv"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'empty.csv'}: not a results CSV (empty file)\n"
    for given in (a, a / "results.csv"):  # the study's own folder: its report would be replaced
        assert compare.main([str(given), str(a), "--label", "x", "--label", "y", "--out", str(a)]) == 2
        assert capsys.readouterr().err == (f"error: --out {a} is the folder of the input {given}: the comparison "
                                           "would replace that study's own report; give another folder\n")
    assert compare.main([str(a), "--out", str(a / "results.csv")]) == 2
    assert capsys.readouterr().err == (f"error: --out {a / 'results.csv'} is a file; the report is written "
                                       "into a folder (new or existing)\n")
    assert not (tmp_path / "out").exists() and [p.name for p in a.iterdir()] == ["results.csv"]


def test_help_is_the_docstring_s_first_paragraph(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    shown = capsys.readouterr().out.split("\n\n")[1]
    assert " ".join(shown.split()) == " ".join(compare.__doc__.split("\n\n")[0].split())
    assert shown.endswith(".")


def test_the_report_command_takes_a_study_folder_as_compare_does(tmp_path, capsys):
    from analysis import report

    a = _study(tmp_path / "smoke", [("finetune", None)])
    assert report.main(["--results", str(a), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "report.md").read_text().startswith("# smoke")
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "out2")]) == 2  # no results.csv there
    assert capsys.readouterr().err == (f"error: {tmp_path} is a folder without results.csv; give a study's folder "
                                       f"or a results CSV (the studies' folders below it: {a})\n")
