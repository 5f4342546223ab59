"""Scaling-law estimators on the tidy table: saturating power laws of error vs data size, their bootstrap
confidence intervals and held-out checks, ViT-vs-BiT crossovers, and the accuracy-vs-compute frontier.

Error is 100 - accuracy (percent). The 3-parameter law is err = a * x^-b + c; with >= 5 sizes the
4-parameter err = a * (x + d)^-b + c is used (revisiting_neural_scaling_laws' M2/M3 family).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

GROUP = ["eval", "dataset", "shots", "metric"]
N_BOOTSTRAP = 200
FOUR_PARAM_MIN_SIZES = 5


def power_law(x, a, b, c, d=0.0):
    return a * np.power(np.asarray(x, dtype=float) + d, -b) + c


@dataclass
class Fit:
    """A fitted law with bootstrap samples of its parameters (rows of [a, b, c, d])."""

    params: np.ndarray
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 4)))
    bootstrap: str = "none"  # "seeds", "residuals" or "none (exactly determined)"

    def error(self, x):
        return power_law(x, *self.params)

    def accuracy(self, x):
        return 100.0 - self.error(x)


def _fit_once(x: np.ndarray, err: np.ndarray, four: bool) -> np.ndarray:
    """Least squares in log-x space; x is rescaled by its minimum for conditioning."""
    x0 = x.min()
    xs = x / x0
    c0 = max(0.0, err.min() * 0.5)
    p0 = [max(err.max() - c0, 1e-3), 0.5, c0] + ([0.0] if four else [])
    lower = [0.0, 0.0, 0.0] + ([0.0] if four else [])
    upper = [np.inf, 5.0, 100.0] + ([xs.max()] if four else [])
    fn = power_law if four else (lambda x, a, b, c: power_law(x, a, b, c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, _ = curve_fit(fn, xs, err, p0=p0, bounds=(lower, upper), maxfev=20000)
    a, b, c = popt[:3]
    d = popt[3] if four else 0.0
    return np.array([a * x0**b, b, c, d * x0])  # back to the original x scale


def fit_law(frame: pd.DataFrame, seed: int = 0) -> Fit | None:
    """Fit one (model, eval, dataset, shots, metric) curve; None with fewer than 3 distinct sizes.

    Bootstrap: over seeds when every size has >= 2 seeds, else over residuals; an exactly determined fit
    (as many points as parameters) has no residual freedom and gets no interval.
    """
    means = frame.groupby("subset_size")["value"].mean()
    if len(means) < 3:
        return None
    x, err = means.index.to_numpy(float), 100.0 - means.to_numpy(float)
    four = len(means) >= FOUR_PARAM_MIN_SIZES
    try:
        params = _fit_once(x, err, four)
    except (RuntimeError, ValueError):
        return None
    rng = np.random.default_rng(seed)
    per_size = [g.to_numpy(float) for _, g in frame.groupby("subset_size")["value"]]
    if min(len(v) for v in per_size) >= 2:
        kind = "seeds"
        draws = (100.0 - np.array([rng.choice(v, len(v)).mean() for v in per_size]) for _ in range(N_BOOTSTRAP))
    elif len(means) > (4 if four else 3):
        kind = "residuals"
        resid = err - power_law(x, *params)
        draws = (power_law(x, *params) + rng.choice(resid, len(resid)) for _ in range(N_BOOTSTRAP))
    else:
        return Fit(params, bootstrap="none (exactly determined)")
    samples = []
    for boot in draws:
        try:
            samples.append(_fit_once(x, boot, four))
        except (RuntimeError, ValueError):
            continue
    return Fit(params, np.array(samples).reshape(-1, 4), kind)


def heldout_check(frame: pd.DataFrame) -> dict | None:
    """Fit on all but the largest size, predict the largest: how well does the law extrapolate here?"""
    sizes = sorted(frame["subset_size"].unique())
    if len(sizes) < 4:
        return None
    fit = fit_law(frame[frame["subset_size"] < sizes[-1]])
    if fit is None:
        return None
    measured = float(frame[frame["subset_size"] == sizes[-1]]["value"].mean())
    predicted = float(fit.accuracy(sizes[-1]))
    return {"size": float(sizes[-1]), "measured": measured, "predicted": predicted,
            "abs_error": abs(predicted - measured)}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) >= 10 else None


def accuracy_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows (percentages); diagnostics have their own units and are not fitted."""
    return table[table["eval"] != "diagnostic"]


def fit_table(table: pd.DataFrame) -> tuple[list[dict], dict[tuple, Fit]]:
    """Every curve's fit as summary rows, and the fits keyed by (model, eval, dataset, shots, metric)."""
    rows, fits = [], {}
    table = accuracy_rows(table)
    for key, frame in table.groupby(["model", *GROUP], dropna=False):
        fit = fit_law(frame)
        row = {"model": key[0], "eval": key[1], "dataset": key[2], "shots": _int_or_none(key[3]),
               "metric": key[4], "n_sizes": int(frame["subset_size"].nunique()), "status": "fitted"}
        if fit is None:
            rows.append({**row, "status": "too few sizes (need 3)"})
            continue
        fits[key] = fit
        a, b, c, d = (float(v) for v in fit.params)
        row.update(form="a*(x+d)^-b+c" if d else "a*x^-b+c", a=a, b=b, c=c, d=d, bootstrap=fit.bootstrap,
                   ci={"b": _interval(fit.samples[:, 1]), "c": _interval(fit.samples[:, 2])},
                   heldout=heldout_check(frame))
        rows.append(row)
    return rows, fits


def _int_or_none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else int(v)


def _crossing(diff_fn, lo: float, hi: float) -> float | None:
    """First x in [lo, hi] (log grid) where diff goes from <= 0 to > 0, refined by bisection in log x."""
    grid = np.geomspace(lo, hi, 400)
    d = diff_fn(grid)
    idx = np.flatnonzero((d[:-1] <= 0) & (d[1:] > 0))
    if not len(idx):
        return None
    a, b = math.log(grid[idx[0]]), math.log(grid[idx[0] + 1])
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if diff_fn(np.array([math.exp(mid)]))[0] <= 0 else (a, mid)
    return math.exp(0.5 * (a + b))


EXTRAPOLATE = 1000.0  # search fitted crossings up to 1000x beyond the measured range on either side


def crossover(vit: pd.Series, bit: pd.Series, vit_fit: Fit | None, bit_fit: Fit | None) -> dict:
    """Where the ViT's accuracy overtakes the ResNet's.

    Args:
        vit, bit: mean accuracy indexed by subset size.
    Returns:
        status 'observed' (sign flip between two measured sizes, log-linear interpolation inside the
        bracket), 'extrapolated' (fitted curves cross outside the measured range; CI over bootstrap pairs)
        or 'none'.
    """
    sizes = sorted(set(vit.index) & set(bit.index))
    diff = [float(vit[s] - bit[s]) for s in sizes]
    for (x1, d1), (x2, d2) in zip(zip(sizes, diff, strict=True), list(zip(sizes, diff, strict=True))[1:],
                                  strict=False):
        if d1 <= 0 < d2:
            t = d1 / (d1 - d2)
            estimate = math.exp(math.log(x1) + t * (math.log(x2) - math.log(x1)))
            fitted = None  # the fitted curves' crossing inside the bracket, when both curves are fitted
            if vit_fit is not None and bit_fit is not None:
                fitted = _crossing(lambda x: vit_fit.accuracy(x) - bit_fit.accuracy(x), x1, x2)
            return {"status": "observed", "estimate": estimate, "bracket": [float(x1), float(x2)], "ci": None,
                    "fit_estimate": fitted}
    none = {"status": "none", "estimate": None, "bracket": None, "ci": None, "fit_estimate": None}
    if vit_fit is None or bit_fit is None or not sizes:
        return none
    lo, hi = min(sizes), max(sizes)
    ranges = [(lo / EXTRAPOLATE, lo)] if diff[0] > 0 else [(hi, hi * EXTRAPOLATE)]
    for a, b in ranges:
        estimate = _crossing(lambda x: vit_fit.accuracy(x) - bit_fit.accuracy(x), a, b)
        if estimate is None:
            continue
        n = min(len(vit_fit.samples), len(bit_fit.samples))
        boots = [_crossing(lambda x, i=i: power_law(x, *bit_fit.samples[i]) - power_law(x, *vit_fit.samples[i]),
                           a, b) for i in range(n)]
        ci = _interval(np.array([v for v in boots if v is not None], dtype=float))
        return {"status": "extrapolated", "estimate": estimate, "bracket": None, "ci": ci, "fit_estimate": estimate}
    return none


def crossover_table(table: pd.DataFrame, fits: dict[tuple, Fit]) -> list[dict]:
    """Every (ViT or Hybrid, BiT) pair measured on the same evaluation."""
    out = []
    table = accuracy_rows(table)
    for key, frame in table.groupby(GROUP, dropna=False):
        means = frame.groupby(["model", "subset_size"])["value"].mean()
        families = frame.groupby("model")["family"].first()
        vits = [m for m, f in families.items() if f in ("ViT", "Hybrid")]
        bits = [m for m, f in families.items() if f == "BiT"]
        for v in vits:
            for r in bits:
                found = crossover(means[v], means[r], fits.get((v, *key)), fits.get((r, *key)))
                out.append({"vit": v, "resnet": r, "eval": key[0], "dataset": key[1],
                            "shots": _int_or_none(key[2]), "metric": key[3], **found})
    return out


def pareto_table(table: pd.DataFrame) -> list[dict]:
    """Per evaluation: the points no cheaper point beats (accuracy vs pretraining FLOPs)."""
    out = []
    frame = accuracy_rows(table).dropna(subset=["pretrain_flops"])
    for key, group in frame.groupby(GROUP, dropna=False):
        points = group.groupby(["model", "subset_size"]).agg(pretrain_flops=("pretrain_flops", "mean"),
                                                            value=("value", "mean")).reset_index()
        best = -np.inf
        frontier = []
        for _, p in points.sort_values(["pretrain_flops", "value"], ascending=[True, False]).iterrows():
            if p["value"] > best:
                best = p["value"]
                frontier.append({"model": p["model"], "subset_size": float(p["subset_size"]),
                                 "pretrain_flops": float(p["pretrain_flops"]), "value": float(p["value"])})
        out.append({"eval": key[0], "dataset": key[1], "shots": _int_or_none(key[2]), "metric": key[3],
                    "points": frontier})
    return out
