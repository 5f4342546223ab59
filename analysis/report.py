"""The study report: fits, crossovers, frontier and the verdict (`summary.json`), figures, `report.md` and a
self-contained `report.html`, from one tidy results table. The page reads as a paper's figure page: the verdict
(`analysis.verdict`) and its caveats, Fig 4 and Fig 3 with captions, the crossover table, then the rest.

    python -m analysis.report --results results.csv --out DIR

(A study's MLflow store holds the same table: `python -m study.mlflow_source` rebuilds the report from it.)
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from analysis import fits, intervals, plots, results, verdict
from pipelines import atomic, families
from pipelines.config import UserError

Block = tuple  # ("h1"|"h2"|"h3"|"p"|"verdict"|"caveat", text) | ("table", header, rows) | ("figure", path, caption)


def fmt(v) -> str:
    """A number, list or missing value as a table cell (missing: an en dash)."""
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, int | float) and not isinstance(v, bool):  # sizes (subset sizes, a crossover's estimate)
        v = float(v)  # written alike, whole or not: `[512, 1,024]`, not `[512.00, 1,024]`
        if abs(v) >= 1e7 or (v and abs(v) < 0.01):
            return f"{v:.3g}"
        if abs(v) < 1 and not v.is_integer():  # two significant digits: b = 0.030 [0.027, 0.033], not 0.03 [0.03, 0.03]
            return f"{v:#.2g}"
        return f"{v:,.0f}" if abs(v) >= 100 or v.is_integer() else f"{v:.2f}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def _cell(mean: float, lo: float | None, hi: float | None) -> str:
    return f"{mean:.1f}" if lo is None else f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"


def _mean_table(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """model x subset_size: mean over seeds [95% t interval] (`intervals.point_table`, as the figures draw it)."""
    points = intervals.point_table(frame)
    points["cell"] = [_cell(m, lo, hi) for m, lo, hi in zip(points["mean"], points["ci_low"], points["ci_high"],
                                                             strict=True)]
    wide = points.set_index(["model", "subset_size"])["cell"].unstack("subset_size").fillna("–")
    header = ["model", *(f"{int(c):,}" for c in wide.columns)]
    return header, [[m, *(str(v) for v in row)] for m, row in wide.iterrows()]


def _gap_at(g: dict) -> str:
    ci = "" if g["ci"] is None else f" [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}]"
    return f"{g['bit_minus_vit']:+.1f}{ci} at {int(g['subset_size']):,}"


def gap_lines(gaps: list[dict]) -> list[str]:
    """One line per (pair, evaluation): BiT - ViT at the smallest and at the largest subset, with intervals."""
    lines = []
    for small, large in intervals.ends(gaps):
        name = eval_name(small["eval"], small["dataset"], small["shots"], small["metric"])
        both = _gap_at(small) if small is large else f"{_gap_at(small)}; {_gap_at(large)}"
        methods = sorted({small["method"], large["method"]})
        lines.append(f"{name}: {small['resnet']} − {small['vit']} = {both} ({'; '.join(methods)})")
    return lines


def _mean_table_by_metric(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(model, subset) x diagnostic metric, mean over seeds."""
    wide = frame.groupby(["model", "subset_size", "metric"])["value"].mean().unstack("metric")
    return (["model", "subset", *wide.columns],
            [[m, f"{int(n):,}", *(fmt(float(v)) for v in row)] for (m, n), row in wide.iterrows()])


def versus(table: pd.DataFrame) -> str:
    """The families the study compares, by label: weak-bias ones vs strong-bias ones (e.g. "ViT vs BiT-ResNet")."""
    present = set(table["family"])
    side = [", ".join(families.get(f).label for f in families.with_bias(bias) if f in present)
            for bias in ("weak", "strong")]
    return " vs ".join(s for s in side if s)


def leader_rows(frame: pd.DataFrame) -> list[list[str]]:
    """Per subset size: the best weak-bias model (a ViT or a hybrid) vs the best strong-bias one (a BiT), and the
    gap (weak minus strong)."""
    means = frame.groupby(["family", "model", "subset_size"])["value"].mean().reset_index()
    rows = []
    for n, group in means.groupby("subset_size"):
        vit = group[group["family"].isin(families.with_bias("weak"))].nlargest(1, "value")
        bit = group[group["family"].isin(families.with_bias("strong"))].nlargest(1, "value")
        if vit.empty or bit.empty:
            continue
        gap = float(vit["value"].iloc[0] - bit["value"].iloc[0])
        leader = vit["model"].iloc[0] if gap > 0 else bit["model"].iloc[0] if gap < 0 else "tie"
        rows.append([f"{int(n):,}", f"{vit['model'].iloc[0]} {vit['value'].iloc[0]:.1f}",
                     f"{bit['model'].iloc[0]} {bit['value'].iloc[0]:.1f}", f"{gap:+.1f}", leader])
    return rows


def extrapolation_rows(rows: list[dict]) -> list[list[str]]:
    """Table rows of `fits.extrapolation_table`: the signed error with its interval, or why there is none."""
    out = []
    for r in rows:
        error = r["status"] if r["error"] is None else \
            f"{r['error']:+.2f}" + ("" if r["ci"] is None else f" [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]")
        out.append([r["model"], r["family"], eval_name(r["eval"], r["dataset"], r["shots"], r["metric"]),
                    "–" if r["size"] is None else f"{int(r['size']):,}", fmt(r["predicted"]), fmt(r["measured"]),
                    error])
    return out


def eval_name(evaluation, dataset, shots, metric) -> str:
    """An evaluation as the report names it: 'fewshot / imagenet / 5-shot / top1'."""
    return f"{evaluation} / {dataset}" + ("" if shots is None or pd.isna(shots) else f" / {int(shots)}-shot") + \
        f" / {metric}"


CAPTIONS = {  # what to see in each figure, by its file stem's prefix
    "fig4": "Fig 4 analog: linear few-shot top-1 on frozen features vs pretraining examples (log x). Points: mean "
            "over seeds with 95% t intervals (cut to 0-100%); dashed curves: the fitted laws; dotted vertical line: "
            "a crossover; grey dashed horizontal line: chance (1 / classes). What to see: whether the ViT's curve "
            "rises faster than the BiT's and meets it within the measured sizes.",
    "fig3": "Fig 3 analog: top-1 after fine-tuning every weight vs pretraining examples, drawn as Fig 4. What to "
            "see: whether fine-tuning changes the ordering the frozen features give, and whether the curves clear "
            "chance.",
    "fig5": "Fig 5 analog: top-1 vs pretraining compute (FLOPs, log x), the black step line the Pareto frontier. "
            "What to see: which model buys more accuracy per FLOP.",
    "fit_diagnostics": "Fit diagnostics: each fitted law's value vs the measured mean at every size (on the dotted "
                       "diagonal when the law fits), and the largest size predicted from the smaller ones (stars).",
    "fig7_vit": "Fig 7 analog across the grid: mean attention distance per layer, layer 1's mean and minimum over "
                "heads, and the position-embedding locality vs pretraining examples. Black dotted lines: uniform "
                "attention on the model's patch grid (heads well below it attend locally, as a convolution does); "
                "grey dashed: the ResNets' receptive field per stage.",
    "compare_": "One evaluation across studies: mean over seeds [95% t interval], one colour per study, one marker "
                "per family, one line style per model within a study. What to see: whether the studies agree.",
    "fig7_": "One model's Fig 7 panels at its smallest (top) and largest (bottom) subset: patch-filter principal "
             "components, position-embedding similarity, attention distance per head (black dotted: uniform "
             "attention).",
}


def caption(path: Path) -> str:
    return next((text for prefix, text in CAPTIONS.items() if path.stem.startswith(prefix)), path.stem)


def _figures(figures: list[Path], prefix: str) -> list[Block]:
    return [("figure", p, caption(p)) for p in figures if p.suffix == ".png" and p.stem.startswith(prefix)]


def more_figures(figures: list[Path]) -> list[Block]:
    """Fig 5 and the fit diagnostics under their heading, where there are any."""
    found = _figures(figures, "fig5") + _figures(figures, "fit_diagnostics")
    return [("h2", "More figures"), *found] if found else []


def build_blocks(table: pd.DataFrame, title: str, summary: dict, figures: list[Path],
                 failures: dict[str, str] | None, answer: verdict.Verdict) -> list[Block]:
    """The page: the verdict and its caveats, Fig 4 and Fig 3 with captions, the crossover table, then the rest."""
    blocks: list[Block] = [
        ("h1", f"{title}: {versus(table)} across pretraining-data scale"),
        ("verdict", answer.sentence), *(("caveat", c) for c in answer.caveats),
        ("p", f"{table['model'].nunique()} models, subsets {sorted(int(x) for x in table['subset_size'].unique())}, "
              f"seeds {sorted(int(s) for s in table['seed'].dropna().unique())}; {len(table)} result rows."),
        *_figures(figures, "fig4"), *_figures(figures, "fig3"),
        ("h2", "Where does the ViT overtake the ResNet?"),
        ("p", "observed: the sign of (ViT − BiT) flips between two measured sizes (log-linear interpolation "
              "inside the bracket; fit_estimate is the fitted curves' crossing there; 95% CI: the same estimate on "
              "means with seeds resampled within each size, paired across models); extrapolated: the fitted laws "
              "cross outside the measured range, the ViT ahead from there on (95% CI over pairs of seed-bootstrap "
              "fits); fitted: they cross so inside it, where the measured means show no ViT overtaking; none: "
              "neither, in the sizes the reason names. "
              "support: the fraction of bootstrap replicates that cross; a CI is given where at least half do, over "
              "every replicate (one that does not cross lies below or beyond the sizes searched, and where more "
              "than 2.5% do, that end of the CI is open)."),
        ("table", ["ViT", "BiT", "evaluation", "status", "estimate", "bracket", "fit estimate", "95% CI",
                   "support", "no CI because"],
         [[c["vit"], c["resnet"], eval_name(c["eval"], c["dataset"], c["shots"], c["metric"]), c["status"],
           fmt(c["estimate"]), fmt(c["bracket"]), fmt(c["fit_estimate"]),
           fits.interval_text(c["ci"], c.get("window"), fmt) or "–",
           "–" if c.get("support") is None else f"{c['support']:.0%}", c.get("reason") or "–"]
          for c in summary["crossovers"]]),
        ("h2", "BiT − ViT at the smallest and the largest subset"),
        ("p", "Percentage points, mean over seeds [95% t interval; paired over the seeds both models ran, which "
              "pretrain on the same nested subset (a seed only one ran is left out)]."),
        *(("p", line) for line in gap_lines(summary["gaps"])),
        *more_figures(figures), ("h2", "Results")]
    for key, frame in fits.accuracy_rows(table).groupby(["eval", "dataset", "shots", "metric"], dropna=False):
        header, rows = _mean_table(frame)
        blocks += [("h3", eval_name(*key)),
                   ("p", "Percent, by pretraining subset size (examples): mean over seeds [95% t interval, cut to "
                         "0-100]."),
                   ("table", header, rows)]
        leads = leader_rows(frame)
        if leads:
            blocks.append(("table", ["subset", "best ViT", "best BiT", "ViT − BiT", "leader"], leads))
    blocks += [("h2", "Scaling-law fits"),
               ("p", "error = 100 − accuracy; a·x^−b + c (a·(x+d)^−b + c with ≥ 5 sizes). CIs are 95% bootstrap "
                     "intervals, over seeds when every size has several, else over residuals."),
               ("table", ["model", "evaluation", "form", "b", "b 95% CI", "c", "c 95% CI", "bootstrap"],
                [[f["model"], eval_name(f["eval"], f["dataset"], f["shots"], f["metric"]), f.get("form", "–"),
                  fmt(f.get("b")), fmt((f.get("ci") or {}).get("b")), fmt(f.get("c")),
                  fmt((f.get("ci") or {}).get("c")), f.get("bootstrap", f["status"])] for f in summary["fits"]]),
               ("h3", "Extrapolation error"),
               ("p", "The largest measured size held out (all seeds), the same law fitted to the rest and the held-out "
                     "size predicted: predicted − measured mean, accuracy points [95% bootstrap interval over seeds]."),
               ("table", ["model", "family", "evaluation", "held-out size", "predicted", "measured", "error"],
                extrapolation_rows(summary["extrapolation"]))]
    blocks += [("h2", "Compute frontier"), ("p", "Points no cheaper point beats, per evaluation.")]
    for entry in summary["pareto"]:
        blocks.append(("p", eval_name(entry["eval"], entry["dataset"], entry["shots"], entry["metric"]) + ": " +
                       "; ".join(f"{p['model']} n={fmt(p['subset_size'])} ({p['pretrain_flops']:.3g} FLOPs, "
                                 f"{p['value']:.1f})" for p in entry["points"])))
    diag = table[table["eval"] == "diagnostics"]
    if not diag.empty:
        blocks += [("h2", "What the ViT learned (Fig 7)"),
                   ("p", "Mean attention distance (pixels; class token excluded) per layer, its minimum over heads, "
                         "position-embedding locality (Spearman correlation of embedding similarity with minus "
                         "the 2D grid distance) and, for the ResNets, the theoretical receptive field per stage."),
                   *_figures(figures, "fig7"), ("table", *_mean_table_by_metric(diag))]
    if failures:
        blocks += [("h2", "Failed trials"), *(("p", f"{name}: {why}") for name, why in failures.items())]
    return blocks


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "verdict":
            out += [f"**{block[1]}**", ""]
        elif kind == "caveat":
            out += [f"> Caveat: {block[1]}", ""]
        elif kind == "figure":
            out += [f"![{block[1].stem}](figures/{block[1].name})", "", f"*{block[2]}*", ""]
        else:
            _, header, rows = block
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(out)


# A page of at most 1,100 px: wide tables scroll inside their own box, figures shrink to the column.
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        ".verdict{font-size:1.25em;line-height:1.4;border-left:4px solid #2a6;padding:.4em .8em;background:#f4faf6}"
        ".caveat{border-left:4px solid #d90;padding:.2em .8em;background:#fdf8ec;margin:.4em 0}"
        ".scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;margin:.5em 0 1em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#f3f3f3}"
        "figure{margin:1.5em 0}img{max-width:100%;height:auto;display:block}"
        "figcaption{font-size:14px;color:#444;margin-top:.4em}")
# Marks the page once every embedded figure has decoded, and whether it scrolls sideways, so a headless browser can
# check the report renders.
_SCRIPT = ("window.addEventListener('load',()=>{const i=[...document.images],d=document.body.dataset;d.figures="
           "i.length&&i.every(x=>x.complete&&x.naturalWidth>0)?'loaded':'missing';d.overflow="
           "document.documentElement.scrollWidth>window.innerWidth?'yes':'no'});")


def css_width(png: Path) -> int:
    """A figure's width on the page at its print size (CSS pixels are 1/96 inch): its text then reads at the point
    size it was drawn with, where the PNG's own pixels (200 dpi) would blow it up 2x. Wider figures shrink to the
    column (max-width: 100%)."""
    from PIL import Image

    with Image.open(png) as image:
        dpi = image.info.get("dpi", (96, 96))[0]
        return round(image.width * 96 / dpi)


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind in ("verdict", "caveat"):
            lead = "Caveat: " if kind == "caveat" else ""
            body.append(f'<p class="{kind}">{lead}{html.escape(block[1])}</p>')
        elif kind == "figure":
            data = base64.b64encode(block[1].read_bytes()).decode()
            body.append(f'<figure><img alt="{block[1].stem}" width="{css_width(block[1])}" '
                        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(block[2])}</figcaption></figure>')
        else:
            _, header, rows = block
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            table = f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"
            body.append(f'<div class="scroll">{table}</div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{''.join(body)}</body></html>")


def _records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready rows: missing values as null, shots as an int."""
    rows = []
    for row in frame.to_dict("records"):
        row = {k: (None if v is None or (not isinstance(v, str) and pd.isna(v)) else v) for k, v in row.items()}
        row["shots"] = None if row.get("shots") is None else int(row["shots"])
        rows.append(row)
    return rows


def write_report(table: pd.DataFrame, out: Path, title: str = "scaling study",
                 failures: dict[str, str] | None = None, panels: list[Path] | None = None) -> Path:
    """summary.json, figures/, report.md and report.html in `out`; returns the report.md path.

    `panels`: extra PNGs already in `out/figures` (per-trial Fig 7 panels) to show in the Fig 7 section.
    """
    out.mkdir(parents=True, exist_ok=True)
    fit_rows, fitted = fits.fit_table(table)
    points = intervals.point_table(fits.accuracy_rows(table))
    summary = {"points": _records(points), "gaps": intervals.gap_table(fits.accuracy_rows(table)),
               "fits": fit_rows, "extrapolation": fits.extrapolation_table(table),
               "crossovers": fits.crossover_table(table, fitted), "pareto": fits.pareto_table(table)}
    answer = verdict.verdict(table, summary)
    summary["verdict"] = {"sentence": answer.sentence, "caveats": list(answer.caveats)}
    atomic.write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    figures = plots.plot_all(table, out / "figures", summary["extrapolation"], fitted, summary["crossovers"],
                             summary["pareto"], points, compute=not verdict.fixed_compute(table))
    figures += panels or []
    blocks = build_blocks(table, title, summary, figures, failures, answer)
    atomic.write_bytes(out / "report.html", to_html(blocks, title).encode())
    path = out / "report.md"
    atomic.write_bytes(path, to_markdown(blocks).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True,
                        help="tidy results CSV (the study's results.csv schema), or a study's folder holding one")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    given = Path(args.results)
    path = given / "results.csv" if given.is_dir() and (given / "results.csv").is_file() else given  # a study's folder
    title = given.resolve().name if path is not given else given.stem
    return report_command(lambda: write_report(results.read(path), out, title=title), out)


def check_out(out: Path) -> None:
    """`out` is a folder or can be made one, said before any input is read (`mkdir` would fail on a file, or below
    one, after the inputs were read, with a traceback); and not a study run's own folder, whose report (with what
    only the run knows: its Fig 7 panels, its failed trials) would be replaced."""
    if (problem := atomic.folder_problem(out)) is not None:
        raise UserError(f"--out {out} {problem}; the report is written into a folder (new or existing)")
    if (out / STUDY_MARK).is_file():
        raise UserError(f"--out {out} is a study run's folder ({STUDY_MARK} beside its report): writing there would "
                        "replace that study's own report; give another folder")


STUDY_MARK = "git_commit.txt"  # written by `study.run` into every study's folder, and by nothing else


def report_command(write: Callable[[], Path], out: Path) -> int:
    """A command's end: `write()` makes a report in `out` (returning its markdown path), where it is printed and
    last its verdict (where it has one), or one line and exit 2."""
    try:
        check_out(out)
        path = write()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report:  {path}\nhtml:    {out / 'report.html'}\nsummary: {out / 'summary.json'}\n"
          f"figures: {out / 'figures'}")
    if (answer := verdict.Verdict.read(out / "summary.json")) is not None:
        print(f"\n{answer.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
