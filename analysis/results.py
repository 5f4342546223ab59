"""The tidy results table: one row per trial x evaluation x metric. Everything in `analysis` reads this
table, so numbers from elsewhere (a published table, another lab's CSV) go through the same fits and plots."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pipelines.config import UserError

COLUMNS = ["model", "family", "subset_size", "examples_seen", "pretrain_flops", "eval", "dataset", "shots",
           "metric", "value", "seed"]
FAMILIES = ("ViT", "BiT", "Hybrid")
EVALS = ("fewshot", "linear_probe", "finetune", "diagnostic")
ACCURACY_METRICS = ("top1", "top5", "macro_f1")
_FEWSHOT = re.compile(r"(\d+)shot_(\w+)")


def records_from_metrics(trial: dict, metrics: dict[str, float]) -> list[dict]:
    """Rows for one trial from its metric keys (`fewshot/<dataset>/<k>shot_top1`, `finetune/<dataset>/top1`,
    `linear_probe/<dataset>/top1`, and `diag/<name>` as eval `diagnostic`), the names the study logs to MLflow.

    Args:
        trial: model, family, subset_size, seed, examples_seen, pretrain_flops.
        metrics: final metrics of the trial.
    """
    rows = []
    base = {k: trial[k] for k in ("model", "family", "subset_size", "examples_seen", "pretrain_flops")}
    for key, value in metrics.items():
        if key.startswith("diag/"):  # Fig 7 numbers: pixels or a correlation, not percentages
            rows.append({**base, "eval": "diagnostic", "dataset": "pretrain", "shots": None,
                         "metric": key.split("/", 1)[1], "value": float(value), "seed": trial["seed"]})
            continue
        parts = key.split("/")
        if len(parts) != 3 or parts[0] not in EVALS:
            continue
        evaluation, dataset, name = parts
        shots = None
        if evaluation == "fewshot":
            match = _FEWSHOT.fullmatch(name)
            if not match:
                continue
            shots, name = int(match.group(1)), match.group(2)
        if name not in ACCURACY_METRICS:
            continue
        rows.append({"model": trial["model"], "family": trial["family"], "subset_size": trial["subset_size"],
                     "examples_seen": trial["examples_seen"], "pretrain_flops": trial["pretrain_flops"],
                     "eval": evaluation, "dataset": dataset, "shots": shots, "metric": name,
                     "value": float(value), "seed": trial["seed"]})
    return rows


def build_table(records: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(records, columns=COLUMNS)
    table["shots"] = table["shots"].astype("Int64")
    return table.sort_values(["eval", "dataset", "shots", "model", "subset_size", "seed"],
                             na_position="first").reset_index(drop=True)


def write(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(path, index=False)


def read(path: str | Path) -> pd.DataFrame:
    """Read and check a results CSV; a malformed one is a `UserError` naming the column and row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    table = pd.read_csv(path)
    required = ["model", "family", "subset_size", "eval", "metric", "value"]
    for col in required:
        if col not in table.columns:
            raise UserError(f"{path}: missing required column '{col}' (required: {', '.join(required)})")
    for col in COLUMNS:
        if col not in table.columns:
            table[col] = None
    for col in ("subset_size", "examples_seen", "pretrain_flops", "value", "shots", "seed"):
        numeric = pd.to_numeric(table[col], errors="coerce")
        bad = numeric.isna() & table[col].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is not a number: {table[col][row]!r}")
        table[col] = numeric
    for col, valid in (("family", FAMILIES), ("eval", EVALS)):
        bad = ~table[col].isin(valid)
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: column '{col}' row {row + 2} is {table[col][row]!r}; valid: "
                            f"{', '.join(valid)}")
    table["dataset"] = table["dataset"].fillna("")
    table["shots"] = table["shots"].astype("Int64")
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
