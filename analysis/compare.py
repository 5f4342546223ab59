"""Several studies side by side: each study's curves overlaid per evaluation, the crossover table and the
BiT - ViT gaps at matching subset sizes per study, and each fit's extrapolation error, in one report
(`summary.json`, figures, `report.md`, `report.html`).

    python -m analysis.compare runs/smoke/ configs/published/vit_bit_imagenet.csv --out DIR

An input is a results table (a CSV in the `analysis.results` schema) or a study's output folder (holding
`results.csv`); it is labelled by its folder or file stem unless `--label` names every input. MLflow experiments
are read by `python -m study.compare`, which takes the same arguments (this package never reads MLflow).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import fits, intervals, plots, report, results
from pipelines import atomic
from pipelines.config import UserError

MLFLOW_PREFIX = "mlflow:"  # an input read from an MLflow experiment (`study.compare`)
GAP_COLUMNS = ["eval", "dataset", "shots", "metric", "subset_size"]


@dataclass(frozen=True)
class Study:
    """One input: its name in the report, where it was read from (as given), its results table."""

    label: str
    source: str
    table: pd.DataFrame


Resolve = Callable[[str], tuple[str, pd.DataFrame]]  # input -> (default label, results table)


def read_input(spec: str) -> tuple[str, pd.DataFrame]:
    """A results CSV, or a study's output folder holding `results.csv`: (its stem or folder name, its table)."""
    if spec.startswith(MLFLOW_PREFIX):
        raise UserError(f"{spec}: MLflow experiments are read by `python -m study.compare` (same arguments)")
    path = Path(spec)
    if path.is_dir():
        if not (path / "results.csv").is_file():
            raise UserError(f"{path}: a study's output folder holds results.csv, and this one has none"
                            + results.studies_below(path))
        return path.resolve().name, results.read(path / "results.csv")
    return path.stem, results.read(path)


def load(specs: list[str], labels: list[str] | None, resolve: Resolve = read_input) -> list[Study]:
    """Every input read and labelled; labels must be one per input and distinct."""
    if labels and len(labels) != len(specs):
        raise UserError(f"{len(labels)} --label for {len(specs)} inputs: give one per input, in order")
    if labels:
        _distinct(labels)  # before any input is read (an MLflow input is downloaded)
    studies = []
    for i, spec in enumerate(specs):
        default, table = resolve(spec)
        studies.append(Study(labels[i] if labels else default, spec, table))
    _distinct([s.label for s in studies])
    return studies


def _distinct(labels: list[str]) -> None:
    """Labels name columns of the report's tables and legend entries of its figures: each one non-empty, distinct
    from the others once spaces around it are dropped, and without '|' (a markdown table's cell border)."""
    for label in labels:
        if not label.strip() or "|" in label:
            raise UserError(f"--label {label!r}: a study's name in the report's tables and figures, not empty and "
                            "without '|'")
    stripped = [label.strip() for label in labels]
    twice = sorted({label for label in stripped if stripped.count(label) > 1})
    if twice:
        raise UserError(f"several inputs are labelled {', '.join(twice)}: name each with --label, one per input")


def _key(row: dict) -> tuple:
    return row["eval"], row["dataset"], row["shots"], row["metric"]


def evaluations(studies: list[Study]) -> list[tuple]:
    """Every accuracy evaluation (eval, dataset, shots, metric) any study measured, sorted."""
    keys = set()
    for study in studies:
        for key, _ in fits.accuracy_rows(study.table).groupby(intervals.GROUP, dropna=False):
            keys.add((key[0], key[1], None if pd.isna(key[2]) else int(key[2]), key[3]))
    return sorted(keys, key=lambda k: (k[0], k[1], -1 if k[2] is None else k[2], k[3]))


def _crossover_cell(rows: list[dict]) -> str:
    cells = []
    for c in rows:
        at = "" if c["estimate"] is None else f" {report.fmt(c['estimate'])}"
        ci = "" if c.get("ci") is None else f" {fits.interval_text(c['ci'], c.get('window'), report.fmt)}"
        cells.append(f"{c['vit']} × {c['resnet']}: {c['status']}{at}{ci}")
    return "; ".join(cells) or "no ViT–BiT pair"


def _gap_cell(rows: list[dict]) -> str:
    return "; ".join(f"{g['resnet']} − {g['vit']} {g['bit_minus_vit']:+.1f}"
                     + ("" if g["ci"] is None else f" [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}]") for g in rows) or "–"


def side_by_side(summary: dict, keys: list[tuple]) -> tuple[list[list[str]], list[list[str]]]:
    """(crossover rows: one per evaluation; gap rows: one per evaluation and subset size), a column per study;
    an evaluation a study did not measure is 'missing'."""
    labels = [s["label"] for s in summary["studies"]]
    present = {label: {tuple(k) for k in s["evaluations"]} for label, s in zip(labels, summary["studies"],
                                                                                strict=True)}
    crossovers, gaps = [], []
    for key in keys:
        crossovers.append([report.eval_name(*key), *(
            _crossover_cell([c for c in summary["crossovers"][label] if _key(c) == key])
            if key in present[label] else "missing" for label in labels)])
        sizes = sorted({g["subset_size"] for label in labels for g in summary["gaps"][label] if _key(g) == key})
        for n in sizes:
            gaps.append([report.eval_name(*key), report.fmt(n), *(
                _gap_cell([g for g in summary["gaps"][label] if _key(g) == key and g["subset_size"] == n])
                if key in present[label] else "missing" for label in labels)])
    return crossovers, gaps


def summarize(studies: list[Study]) -> dict:
    """The comparison's `summary.json`: per study its evaluations, crossovers, gaps and extrapolation errors (the
    single-study report's estimators, study by study)."""
    out = {"studies": [], "crossovers": {}, "gaps": {}, "extrapolation": {}}
    for study in studies:
        table = study.table
        _, fitted = fits.fit_table(table)
        out["studies"].append({"label": study.label, "source": study.source, "rows": len(table),
                               "models": sorted(table["model"].unique()),
                               "subset_sizes": sorted(float(n) for n in table["subset_size"].unique()),
                               "evaluations": evaluations([study])})
        out["crossovers"][study.label] = fits.crossover_table(table, fitted)
        out["gaps"][study.label] = intervals.gap_table(fits.accuracy_rows(table))
        out["extrapolation"][study.label] = fits.extrapolation_table(table)
    keys = evaluations(studies)
    out["evaluations"] = [{"eval": k[0], "dataset": k[1], "shots": k[2], "metric": k[3],
                           "missing": [s["label"] for s in out["studies"] if k not in s["evaluations"]]}
                          for k in keys]
    return out


def build_blocks(summary: dict, figures: list[Path], title: str) -> list[report.Block]:
    labels = [s["label"] for s in summary["studies"]]
    keys = [_key(e) for e in summary["evaluations"]]
    crossovers, gaps = side_by_side(summary, keys)
    missing = [f"{report.eval_name(*_key(e))}: {', '.join(e['missing'])}" for e in summary["evaluations"]
               if e["missing"]]
    return [
        ("h1", title),
        ("table", ["study", "source", "models", "subset sizes", "result rows"],
         [[s["label"], s["source"], ", ".join(s["models"]), ", ".join(f"{int(n):,}" for n in s["subset_sizes"]),
           str(s["rows"])] for s in summary["studies"]]),
        ("p", "Missing evaluations (a study that did not measure one): " + ("; ".join(missing) or "none") + "."),
        ("h2", "Curves by study"),
        ("p", "Mean over seeds [95% t interval]; one colour per study, one marker per family."),
        *(("figure", p, report.caption(p)) for p in figures if p.suffix == ".png"),
        ("h2", "Where does the ViT overtake the ResNet?"),
        ("p", "Each study's crossover table (as its own report gives it: status, estimate, 95% CI), side by side."),
        ("table", ["evaluation", *labels], crossovers),
        ("h2", "BiT − ViT at matching subset sizes"),
        ("p", "Percentage points, mean over seeds [95% t interval]; – where a study did not measure that size."),
        ("table", ["evaluation", "subset", *labels], gaps),
        ("h2", "Extrapolation error"),
        ("p", "Each study's largest size held out, the law fitted to the rest: predicted − measured mean, accuracy "
              "points [95% bootstrap interval over seeds]."),
        ("table", ["study", "model", "family", "evaluation", "held-out size", "predicted", "measured", "error"],
         [[label, *row] for label in labels for row in report.extrapolation_rows(summary["extrapolation"][label])])]


def write_comparison(studies: list[Study], out: Path) -> Path:
    """summary.json, figures/ (one figure per evaluation protocol), report.md and report.html in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(studies)
    atomic.write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    labels = [s.label for s in studies]
    (out / "figures").mkdir(exist_ok=True)
    points = pd.concat([intervals.point_table(fits.accuracy_rows(s.table)).assign(study=s.label) for s in studies])
    figures = [p for protocol in sorted(points["eval"].unique())
               for p in plots.fig_studies_vs_data(points, protocol, labels, out / "figures")]
    title = "Comparison: " + " vs ".join(labels)
    blocks = build_blocks(summary, figures, title)
    atomic.write_bytes(out / "report.html", report.to_html(blocks, title).encode())
    path = out / "report.md"
    atomic.write_bytes(path, report.to_markdown(blocks).encode())
    return path


def parser(prog: str, more: str = "") -> argparse.ArgumentParser:
    """The command's arguments; `more`: what a command built on this one adds to its description."""
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(filter(None, (__doc__.split("\n\n")[0], more))))
    parser.add_argument("inputs", nargs="+", help="results CSVs and studies' output folders"
                        + (f" (and {MLFLOW_PREFIX}[TRACKING_URI#]EXPERIMENT)" if prog.startswith("python -m study")
                           else ""))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--label", action="append", help="a study's name in the report; once per input, in order")
    return parser


def command(args: argparse.Namespace, resolve: Resolve = read_input,
            then: Callable[[list[Study], Path], None] | None = None) -> int:
    """The comparison of `args.inputs` written to `args.out` (then `then(studies, out)`), or one line and exit 2."""
    out = Path(args.out)

    def write() -> Path:
        for spec in args.inputs:  # a study's own folder: its report.md, summary.json and figures would be replaced
            here = Path(spec)
            if not spec.startswith(MLFLOW_PREFIX) and here.exists() and \
                    (here if here.is_dir() else here.parent).resolve() == out.resolve():
                raise UserError(f"--out {out} is the folder of the input {spec}: the comparison would replace that "
                                f"study's own report; give another folder")
        studies = load(args.inputs, args.label, resolve)
        path = write_comparison(studies, out)
        if then is not None:
            then(studies, out)
        return path

    return report.report_command(write, out)


def main(argv: list[str] | None = None) -> int:
    return command(parser("python -m analysis.compare").parse_intermixed_args(argv))  # options between the inputs


if __name__ == "__main__":
    sys.exit(main())
