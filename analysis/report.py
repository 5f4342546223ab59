"""The study report: figures plus `report.md` (results tables, who leads at each data size).

    python -m analysis.report --results results.csv --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis import plots, results
from pipelines.config import UserError


def _mean_table(frame: pd.DataFrame) -> pd.DataFrame:
    """model x subset_size, mean over seeds (with the spread when there are several seeds)."""
    grouped = frame.groupby(["model", "subset_size"])["value"]
    mean, std, n = grouped.mean(), grouped.std(), grouped.count()
    cells = mean.map("{:.1f}".format)
    if (n > 1).any():
        cells = cells + std.fillna(0).map(" ± {:.1f}".format)
    return cells.unstack("subset_size")


def leader_lines(frame: pd.DataFrame) -> list[str]:
    """Per subset size: the best ViT/Hybrid vs the best BiT, and the gap (ViT minus BiT)."""
    means = frame.groupby(["family", "model", "subset_size"])["value"].mean().reset_index()
    lines = []
    for n, group in means.groupby("subset_size"):
        vit = group[group["family"].isin(["ViT", "Hybrid"])].nlargest(1, "value")
        bit = group[group["family"] == "BiT"].nlargest(1, "value")
        if vit.empty or bit.empty:
            continue
        gap = float(vit["value"].iloc[0] - bit["value"].iloc[0])
        leader = vit["model"].iloc[0] if gap > 0 else bit["model"].iloc[0]
        lines.append(f"| {int(n):,} | {vit['model'].iloc[0]} {vit['value'].iloc[0]:.1f} | "
                     f"{bit['model'].iloc[0]} {bit['value'].iloc[0]:.1f} | {gap:+.1f} | {leader} |")
    return lines


def _section(title: str, frame: pd.DataFrame) -> list[str]:
    table = _mean_table(frame)
    header = "| model | " + " | ".join(f"{int(c):,}" for c in table.columns) + " |"
    out = [f"### {title}", "", "Percent, by pretraining subset size (examples):", "", header,
           "|---" * (len(table.columns) + 1) + "|"]
    out += [f"| {model} | " + " | ".join(str(v) for v in row) + " |" for model, row in table.iterrows()]
    leads = leader_lines(frame)
    if leads:
        out += ["", "| subset | best ViT | best BiT | ViT − BiT | leader |", "|---|---|---|---|---|", *leads]
    return out + [""]


def write_report(table: pd.DataFrame, out: Path, title: str = "scaling study",
                 failures: dict[str, str] | None = None) -> Path:
    """Figures into `out/figures`, and `out/report.md` linking them."""
    figures = plots.plot_all(table, out / "figures")
    lines = [f"# {title}: ViT vs BiT-ResNet across pretraining-data scale", "",
             f"{table['model'].nunique()} models, subsets {sorted(table['subset_size'].unique().tolist())}, "
             f"seeds {sorted(table['seed'].dropna().unique().tolist())}; {len(table)} result rows "
             "(`results.csv`).", ""]
    lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures if p.suffix == ".png"] + [""]
    lines += ["## Results", ""]
    groups = table.groupby(["eval", "dataset", "shots", "metric"], dropna=False)
    for (evaluation, dataset, shots, metric), frame in groups:
        name = f"{evaluation} / {dataset}" + ("" if pd.isna(shots) else f" / {int(shots)}-shot") + f" / {metric}"
        lines += _section(name, frame)
    if failures:
        lines += ["## Failed trials", ""] + [f"- {name}: {why}" for name, why in failures.items()] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="tidy results CSV (the study's results.csv schema)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        table = results.read(args.results)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = write_report(table, out, title=Path(args.results).stem)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}\nfigures: {out / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
