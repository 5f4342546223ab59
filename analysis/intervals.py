"""Means over seeds and their 95% intervals: every plotted point, table cell and BiT - ViT gap in the report.

A point's interval is Student's t interval over its seeds (mean +- t_{0.975, n-1} * sd / sqrt(n)). With the
3-5 seeds a CPU study affords, a percentile bootstrap of a mean under-covers badly (3 values have only 10
distinct resampled means); the t interval is exact for normal seed noise and says honestly how wide 3 seeds are.
A gap between two models is paired over the seeds both ran (seed s of every model pretrains on the same nested
subset, so the per-seed differences cancel the subset draw; a seed only one model ran is left out), else, with
fewer than two in common, Welch's interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from pipelines import families

LEVEL = 0.95
GROUP = ["eval", "dataset", "shots", "metric"]
POINT = ["model", "family", *GROUP, "subset_size"]


PERCENT = (0.0, 100.0)  # an accuracy's range (`results.ACCURACY_METRICS`)


def mean_interval(values, bounds: tuple[float, float] | None = None) -> tuple[float, float | None, float | None]:
    """Mean of `values` (one per seed) and its 95% t interval; no interval from a single value. With `bounds` (a
    metric's range: `PERCENT` for an accuracy) the interval is cut to it: with 2-3 seeds a t interval of an accuracy
    near 100% reaches past it (99.5 [93.1, 105.9]), which no accuracy can be."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, None, None
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    lo, hi = mean - half, mean + half
    return (mean, lo, hi) if bounds is None else (mean, max(lo, bounds[0]), min(hi, bounds[1]))


def errorbar(values, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """seaborn's `errorbar=` callable: the same interval the tables give (a single seed: no bar)."""
    mean, lo, hi = mean_interval(values, bounds)
    return (mean, mean) if lo is None else (lo, hi)


def accuracy_errorbar(values) -> tuple[float, float]:
    """`errorbar` for an accuracy: cut to 0-100%, as the tables give it."""
    return errorbar(values, PERCENT)


def per_seed(frame: pd.DataFrame) -> pd.Series:
    """One value per seed (repeated rows of a seed are averaged), indexed by seed."""
    return frame.groupby(frame["seed"].fillna(-1))["value"].mean()


def point_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per plotted point (model, evaluation, subset size): n_seeds, mean, ci_low, ci_high (an accuracy's cut
    to 0-100) and the mean examples_seen / pretrain_flops (the compute axis)."""
    from analysis.results import ACCURACY_METRICS

    out = []
    for key, frame in table.groupby(POINT, dropna=False):
        named = dict(zip(POINT, key, strict=True))
        mean, lo, hi = mean_interval(per_seed(frame).to_numpy(),
                                     PERCENT if named["metric"] in ACCURACY_METRICS else None)
        out.append({**named, "n_seeds": int(frame["seed"].nunique(dropna=False)),
                    "mean": mean, "ci_low": lo, "ci_high": hi,
                    "examples_seen": _mean_or_none(frame["examples_seen"]),
                    "pretrain_flops": _mean_or_none(frame["pretrain_flops"])})
    columns = [*POINT, "n_seeds", "mean", "ci_low", "ci_high", "examples_seen", "pretrain_flops"]
    return pd.DataFrame(out, columns=columns)


def _mean_or_none(col: pd.Series) -> float | None:
    col = pd.to_numeric(col, errors="coerce").dropna()
    return float(col.mean()) if len(col) else None


def gap(bit: pd.Series, vit: pd.Series) -> dict:
    """BiT minus ViT (percentage points) from per-seed values, with its 95% interval and how it was made: paired over
    the seeds both ran (a seed one model lacks, a failed trial, is left out: it would bring its subset's draw into
    the mean unpaired, and could flip the gap's sign), with an interval where there are two or more; Welch's
    interval where they share no seed."""
    common = bit.index.intersection(vit.index)
    if len(common) >= 2:
        mean, lo, hi = mean_interval((bit[common] - vit[common]).to_numpy())
        method = f"paired over {len(common)} seeds"
        if not len(common) == len(bit) == len(vit):
            method += f" (those both ran; BiT {len(bit)}, ViT {len(vit)})"
    elif len(common) == 1:  # the one seed both ran: paired, with no interval (the others' subsets differ)
        mean, lo, hi = float((bit[common] - vit[common]).iloc[0]), None, None
        method = ("one seed: no interval" if len(bit) == len(vit) == 1 else
                  f"one seed both ran: no interval (BiT {len(bit)}, ViT {len(vit)})")
    elif len(bit) >= 2 and len(vit) >= 2:
        mean = float(bit.mean() - vit.mean())
        vb, vv = bit.var(ddof=1) / len(bit), vit.var(ddof=1) / len(vit)
        se = math.sqrt(vb + vv)
        df = (vb + vv) ** 2 / (vb**2 / (len(bit) - 1) + vv**2 / (len(vit) - 1)) if se > 0 else 1.0
        half = float(stats.t.ppf(0.5 + LEVEL / 2, df) * se)
        lo, hi = mean - half, mean + half
        method = f"Welch ({len(bit)} vs {len(vit)} seeds, not the same seeds)"
    else:
        mean, lo, hi = float(bit.mean() - vit.mean()), None, None
        method = "one seed: no interval"
    return {"bit_minus_vit": mean, "ci": None if lo is None else [lo, hi], "method": method}


def same_seeds(vit: pd.DataFrame, bit: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both models' rows, at each size only the seeds both ran there (all of each where they share none): seed s
    of every model pretrains on the same nested subset, so comparing means over different seed sets mixes the
    subsets' draws into the difference."""
    both = (set(zip(vit["subset_size"], vit["seed"].fillna(-1), strict=True))
            & set(zip(bit["subset_size"], bit["seed"].fillna(-1), strict=True)))
    shared_sizes = {n for n, _ in both}

    def keep(frame: pd.DataFrame) -> pd.DataFrame:
        pairs = zip(frame["subset_size"], frame["seed"].fillna(-1), strict=True)
        return frame[[(n, s) in both or n not in shared_sizes for n, s in pairs]]

    return keep(vit), keep(bit)


def model_pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """Every (weak-bias, strong-bias) pair of models in `frame` (`families.Family.bias`: a ViT or a hybrid, a
    BiT)."""
    of_model = frame.groupby("model")["family"].first()
    weak, strong = families.with_bias("weak"), families.with_bias("strong")
    return [(v, r) for v, fv in of_model.items() if fv in weak for r, fr in of_model.items() if fr in strong]


def gap_table(table: pd.DataFrame) -> list[dict]:
    """Every (weak-bias, strong-bias) pair on every evaluation, at every subset size both were measured at."""
    out = []
    for key, frame in table.groupby(GROUP, dropna=False):
        for v, r in model_pairs(frame):
            sizes = sorted(set(frame.loc[frame["model"] == v, "subset_size"])
                           & set(frame.loc[frame["model"] == r, "subset_size"]))
            for n in sizes:
                at = frame[frame["subset_size"] == n]
                out.append({"vit": v, "resnet": r, "eval": key[0], "dataset": key[1],
                            "shots": None if pd.isna(key[2]) else int(key[2]), "metric": key[3],
                            "subset_size": float(n),
                            **gap(per_seed(at[at["model"] == r]), per_seed(at[at["model"] == v]))})
    return out


def ends(gaps: list[dict]) -> list[tuple[dict, dict]]:
    """Per (pair, evaluation): the gap at the smallest and at the largest subset size."""
    groups: dict[tuple, list[dict]] = {}
    for g in gaps:
        groups.setdefault((g["vit"], g["resnet"], g["eval"], g["dataset"], g["shots"], g["metric"]), []).append(g)
    return [(min(rows, key=lambda g: g["subset_size"]), max(rows, key=lambda g: g["subset_size"]))
            for rows in groups.values()]
