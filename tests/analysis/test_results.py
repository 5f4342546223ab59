import pandas as pd
import pytest

from analysis import report, results
from analysis.report import leader_rows
from pipelines.config import UserError
from pipelines.downstream import Measurement
from tests.conftest import run_cli

TRIAL = {"model": "ViT-Pico/4", "family": "ViT", "subset_size": 1024, "seed": 0, "examples_seen": 4096,
         "pretrain_flops": 1e12}


def test_typed_measurements_become_tidy_rows_with_their_spread():
    measured = [Measurement("fewshot", "shapes", 5, "top1", 40.0, 1.5), Measurement("finetune", "shapes", None,
                                                                                     "top1", 70.0)]
    table = results.build_table(results.rows(TRIAL, measured))
    assert table[["eval", "dataset", "shots", "metric", "value", "seed"]].astype(object).values.tolist() == [
        ["fewshot", "shapes", 5, "top1", 40.0, 0], ["finetune", "shapes", pd.NA, "top1", 70.0, 0]]
    assert table["spread"].iloc[0] == 1.5 and pd.isna(table["spread"].iloc[1])
    assert list(table.columns) == results.COLUMNS


def _csv(tmp_path, rows):
    path = tmp_path / "r.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _row(**kw):
    row = {"model": "ViT-B/16", "family": "ViT", "subset_size": 9e6, "examples_seen": 6.3e7,
           "pretrain_flops": 6.6e18, "eval": "fewshot", "dataset": "imagenet", "shots": 5, "metric": "top1",
           "value": 50.0, "seed": 0}
    return {**row, **kw}


@pytest.mark.parametrize("rows, message", [
    ([{k: v for k, v in _row().items() if k != "value"}], "missing required column 'value'"),
    ([_row(), _row(value="high")], "column 'value' row 3 is not a number: 'high'"),
    ([_row(family="CNN")], "column 'family' row 2 is 'CNN'; valid: ViT, BiT, Hybrid"),
    ([_row(subset_size=None)], r"column 'subset_size' row 2 is empty: every row needs the size of the subset"),
    # values no study writes, each of which went into a verdict before
    ([_row(), _row(subset_size=-5)], r"column 'subset_size' row 3 is -5; it must be a number of images > 0"),
    ([_row(seed=1.5)], r"column 'seed' row 2 is 1.5; it must be a whole number >= 0"),
    ([_row(shots=2.5)], r"column 'shots' row 2 is 2.5; it must be a whole number >= 0"),
    ([_row(value=250.0)], r"column 'value' row 2 is 250, a top1 outside \[0, 100\]: accuracies are percentages"),
    ([_row(), _row(seed=None)], r"column 'seed' row 3 is empty while other rows have one \(a line cut short\?\)"),
    ([_row(), _row(model=None)], r"column 'model' row 3 is empty \(a line cut short\?\)"),
    ([_row(shots=1), _row(shots=5), _row(shots=1, value=40.0)],  # a column left out or a table pasted twice
     r"rows 2 and 4 are the same measurement \(ViT-B/16 at 9e\+06 images, seed 0, fewshot top1, 1 shots\)"),
])
def test_malformed_results_name_column_and_row(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        results.read(_csv(tmp_path, rows))


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"), (b"\n  \n", "empty file"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not text"),
    (b"model,family\nViT-B/16,ViT\nViT-B/16,ViT,9e6\n", "Expected 2 fields in line 3, saw 3"),
])
def test_a_file_that_is_not_a_csv_is_one_line_and_no_report(tmp_path, capsys, content, reason):
    """`results.read` is what the report, the comparison and `--suggest` read a table with."""
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    assert report.main(["--results", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {path}: not a results CSV ({reason})\n"
    assert not (tmp_path / "out").exists()


def test_a_table_without_rows_is_one_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(",".join(results.COLUMNS) + "\n")
    with pytest.raises(UserError, match="no result rows"):
        results.read(path)


def test_a_study_run_s_folder_is_not_an_out(tmp_path, capsys):
    """Its report holds what only the run knows (Fig 7 panels, failed trials): `analysis.report`, `study.compare` and
    `study.mlflow_source` all refuse to write there."""
    study = tmp_path / "smoke"
    study.mkdir()
    (study / report.STUDY_MARK).write_text("abc\n")
    (study / "report.md").write_text("the study's own")
    assert report.main(["--results", str(_csv(tmp_path, [_row()])), "--out", str(study)]) == 2
    assert capsys.readouterr().err == (f"error: --out {study} is a study run's folder (git_commit.txt beside its "
                                       "report): writing there would replace that study's own report; give another "
                                       "folder\n")
    assert (study / "report.md").read_text() == "the study's own"


def test_an_out_that_is_a_file_is_one_line_before_the_results_are_read(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for out, which in ((mine, "is a file"), (mine / "report", f"is below {mine}, a file")):
        assert report.main(["--results", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: --out {out} {which}; the report is written into a folder (new "
                                           "or existing)\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and mine.read_text() == "mine"


def test_report_help_is_the_docstring_s_first_paragraph(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    shown = capsys.readouterr().out.split("\n\n")[1]
    assert " ".join(shown.split()) == " ".join(report.__doc__.split("\n\n")[0].split())
    assert shown.endswith(".")


def test_rows_without_a_finite_value_are_left_out_and_said(tmp_path, capsys):
    """A hole in a CSV from elsewhere: left in, the intervals would drop it and still count its seed."""
    table = results.read(_csv(tmp_path, [_row(), _row(seed=1, value=None), _row(seed=2, value="inf"), _row(seed=3)]))
    assert table["seed"].tolist() == [0, 3]
    assert capsys.readouterr().err.strip().endswith(
        "2 row(s) without a finite value left out (the first: row 3, ViT-B/16 at 9e+06 images, seed 1, fewshot "
        "top1: empty)")


def test_leader_lines_report_the_gap_per_size():
    table = pd.DataFrame([_row(subset_size=1, value=40), _row(model="BiT-R50x1", family="BiT", subset_size=1,
                          value=50), _row(subset_size=10, value=70),
                          _row(model="BiT-R50x1", family="BiT", subset_size=10, value=60)])
    rows = leader_rows(table)
    assert rows[0][-2:] == ["-10.0", "BiT-R50x1"] and rows[1][-2:] == ["+10.0", "ViT-B/16"]


def test_report_cli_on_an_external_csv(tmp_path, cache_dir):
    rows = [_row(model=m, family=f, subset_size=n, value=v, eval=e, shots=s)
            for m, f, curve in (("ViT-B/16", "ViT", (30, 50, 70)), ("BiT-R50x1", "BiT", (45, 55, 60)))
            for n, v in zip((9e6, 3e7, 9e7), curve, strict=True)
            for e, s in (("fewshot", 5), ("finetune", None))]
    proc = run_cli(["-m", "analysis.report", "--results", str(_csv(tmp_path, rows)), "--out", str(tmp_path / "o")],
                   cache_dir)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| 90,000,000 | ViT-B/16 70.0 | BiT-R50x1 60.0 | +10.0 | ViT-B/16 |" in report
    assert (tmp_path / "o" / "figures" / "fig4_fewshot_vs_data.pdf").exists()
    bad = run_cli(["-m", "analysis.report", "--results", str(tmp_path / "nope.csv"), "--out", str(tmp_path)],
                  cache_dir)
    assert bad.returncode == 2 and bad.stderr.startswith("error: results file not found")
