"""The tidy results table: one row per trial x evaluation x metric. Everything in `analysis` reads this
table, so numbers from elsewhere (a published table, another lab's CSV) go through the same fits and plots."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import atomic, evaluations, families
from pipelines.config import UserError

COLUMNS = ["model", "family", "subset_size", "examples_seen", "pretrain_flops", "eval", "dataset", "shots",
           "metric", "value", "spread", "seed", "chance"]
# spread: std over repeats (few-shot draws), where there are some; chance: a top-1 row's chance level (100 / the
# dataset's classes, percent), where the classes are known
ACCURACY_METRICS = ("top1", "macro_f1")  # percentages, fitted and compared; other metrics have their own units
# The pretraining source's held-out top-1 (dataset "pretrain"): not an evaluation a study selects, pretraining
# measures it; it says whether a model trained at all.
UPSTREAM = "upstream"


def rows(fields: dict, measurements: Iterable, chance: dict[str, float] | None = None) -> list[dict]:
    """One row per measurement of a trial.

    Args:
        fields: the trial's model, family, subset_size, examples_seen, pretrain_flops and seed.
        measurements: records with eval, dataset, shots, metric, value and spread (the trial's typed output).
        chance: {dataset: chance top-1 in percent}, for the top-1 rows of the datasets it names.
    """
    base = {k: fields[k] for k in ("model", "family", "subset_size", "examples_seen", "pretrain_flops", "seed")}
    chance = chance or {}
    return [{**base, "eval": m.eval, "dataset": m.dataset, "shots": m.shots, "metric": m.metric,
             "value": float(m.value), "spread": m.spread,
             "chance": chance.get(m.dataset) if m.metric == "top1" else None} for m in measurements]


def build_table(records: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(records, columns=COLUMNS)
    table["shots"] = table["shots"].astype("Int64")
    return table.sort_values(["eval", "dataset", "shots", "model", "subset_size", "seed"],
                             na_position="first").reset_index(drop=True)


def write(table: pd.DataFrame, path: Path) -> None:
    """The table as CSV, whole or not at all (`analysis.compare` and `--suggest` read it back)."""
    atomic.write_bytes(path, table.to_csv(index=False).encode())


def _shown(value) -> str:
    return "empty" if pd.isna(value) else f"{float(value):g}"


def studies_below(folder: Path) -> str:
    """Where a folder without results.csv was given for a study's (`--out`, not `--out/<study>`): the studies' folders
    below it, as a clause for the error ("" where there are none)."""
    below = sorted(str(p.parent) for p in folder.glob("*/results.csv"))
    return f" (the studies' folders below it: {', '.join(below)})" if below else ""


def read(path: str | Path) -> pd.DataFrame:
    """Read and check a results CSV; a malformed one is a `UserError` naming the column and row."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder without results.csv; give a study's folder or a results CSV"
                        + studies_below(path))
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: not a results CSV (empty file)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a results CSV (not text)") from None
    except pd.errors.ParserError as err:  # rows of unequal widths, an unclosed quote
        reason = str(err).strip().removeprefix("Error tokenizing data. C error: ")
        raise UserError(f"{path}: not a results CSV ({reason})") from None
    required = ["model", "family", "subset_size", "eval", "metric", "value"]
    for col in required:
        if col not in table.columns:
            raise UserError(f"{path}: missing required column '{col}' (required: {', '.join(required)})")
    for col in COLUMNS:
        if col not in table.columns:
            table[col] = None
    for col in ("subset_size", "examples_seen", "pretrain_flops", "value", "spread", "shots", "seed", "chance"):
        numeric = pd.to_numeric(table[col], errors="coerce")
        bad = numeric.isna() & table[col].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is not a number: {table[col][row]!r}")
        table[col] = numeric
    bad = ~np.isfinite(table["subset_size"].to_numpy(float))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{path}: column 'subset_size' row {row + 2} is {_shown(table['subset_size'][row])}: every "
                        "row needs the size of the subset it pretrained on")
    bad = ~np.isfinite(table["value"].to_numpy(float))
    if bad.any():  # left in, the intervals would drop it and still count its seed; said, and left out
        row = int(np.argmax(bad))
        print(f"{path}: {int(bad.sum())} row(s) without a finite value left out (the first: row {row + 2}, "
              f"{table['model'][row]} at {_shown(table['subset_size'][row])} images, seed "
              f"{_shown(table['seed'][row])}, {table['eval'][row]} {table['metric'][row]}: "
              f"{_shown(table['value'][row])})", file=sys.stderr)
        table = table[~bad].reset_index(drop=True)
    for col, valid in (("family", families.names()), ("eval", (*evaluations.names(), UPSTREAM))):
        bad = ~table[col].isin(valid)
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is {table[col][row]!r}; valid: "
                            f"{', '.join(valid)}")
    if table.empty:
        raise UserError(f"{path}: no result rows (a header alone, or every value empty): nothing to report")
    _check_values(path, table)
    table["dataset"] = table["dataset"].fillna("")
    table["shots"] = table["shots"].astype("Int64")
    _check_repeats(path, table)
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]


def _check_values(path: Path, table: pd.DataFrame) -> None:
    """Values no study writes: a subset size that is not > 0, a seed or shot count that is not a whole number >= 0,
    an accuracy outside [0, 100], a row without its model or metric (a line cut short: pandas fills the missing
    fields with nothing)."""
    for col in ("model", "metric"):
        bad = table[col].isna()
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is empty (a line cut short?): every row names its "
                            f"{col}")
    bad = table["subset_size"] <= 0
    if bad.any():
        row = int(bad.idxmax())
        raise UserError(f"{path}: column 'subset_size' row {row + 2} is {_shown(table['subset_size'][row])}; it must "
                        "be a number of images > 0")
    for col, what in (("seed", "a whole number >= 0"), ("shots", "a whole number >= 0")):
        values = table[col]
        bad = values.notna() & ((values % 1 != 0) | (values < 0))
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is {_shown(values[row])}; it must be {what}")
    if table["seed"].isna().any() and table["seed"].notna().any():
        row = int(table["seed"].isna().idxmax())
        raise UserError(f"{path}: column 'seed' row {row + 2} is empty while other rows have one (a line cut "
                        "short?): give every row its seed, or none")
    accuracy = table["metric"].isin(ACCURACY_METRICS)
    bad = accuracy & ((table["value"] < 0) | (table["value"] > 100))
    if bad.any():
        row = int(bad.idxmax())
        raise UserError(f"{path}: column 'value' row {row + 2} is {_shown(table['value'][row])}, a "
                        f"{table['metric'][row]} outside [0, 100]: accuracies are percentages")
    for metric in ACCURACY_METRICS:
        values = table.loc[table["metric"] == metric, "value"]
        if len(values) and (values <= 1).all() and (values > 0).any():
            print(f"{path}: every {metric} is at most 1: if they are fractions, multiply them by 100 (the report "
                  "reads percentages, as are the chance levels)", file=sys.stderr)


KEY = ["model", "subset_size", "seed", "eval", "dataset", "shots", "metric"]  # one measurement of one trial


def _check_repeats(path: Path, table: pd.DataFrame) -> None:
    """Two rows of one measurement would be averaged as if they were one (a column left out, such as `shots`, makes
    the 1- and 5-shot rows of a trial repeats; so does a table pasted twice)."""
    repeated = table.duplicated(subset=KEY, keep=False)
    if repeated.any():
        first = table[repeated].index[:2]
        row = table.loc[first[0]]
        shots = "" if pd.isna(row["shots"]) else f", {int(row['shots'])} shots"
        raise UserError(f"{path}: rows {first[0] + 2} and {first[1] + 2} are the same measurement ({row['model']} at "
                        f"{_shown(row['subset_size'])} images, seed {_shown(row['seed'])}, {row['eval']} "
                        f"{row['metric']}{shots}): each (model, subset_size, seed, eval, dataset, shots, metric) is "
                        "one row")
