"""What to run next: candidate grid points ranked by how much they are expected to narrow the crossover interval
per GPU-hour.

Method (preposterior simulation on the fits' own bootstrap). The paired bootstrap fits of the two curves
(`fits.fit_law`, resampling seeds within each size) are the predictive distribution: to simulate a candidate's
outcome, draw one replicate pair, read each new point's mean accuracy off that replicate's curve and add seed
noise (the pooled within-size standard deviation over seeds of that model). The table with the simulated rows is
refitted (bootstrap again) and the width of the 95% interval is measured; its mean over `N_OUTCOMES` outcomes is
the expected width after. Drawing the mean from the bootstrap and the seed noise on top is what a new run adds:
where the curve could be (the fits' spread) and what one seed of it would measure.

The interval: with a crossover (at least half of the replicate pairs cross within `RANGE` of the measured sizes),
the 95% percentile interval of the replicates' crossing size, width in decades (log10) of subset size, replicates
that do not cross counted at the range's end where they point (so a candidate that makes them cross is rewarded).
Without one: the 95% interval of BiT - ViT accuracy (points) at the largest size a candidate within the budget reaches.

Why this and not a closed form: the law is nonlinear and the interval is a percentile of a crossing of two fits;
refitting the same estimator the report uses measures exactly the interval the report will print. The cost is
kept small: `N_REPLICATES` bootstrap fits per refit, `N_OUTCOMES` outcomes per candidate, a handful of candidates
(midpoints between measured sizes, 2x and 4x beyond, one more seed): about 8 x 12 x 2 x 41 curve fits.

With two measured sizes the 3-parameter law is one equation short: `two_size_law` draws its floor uniformly over
every value the two points allow, so the interval before a third size says honestly how little two sizes pin down,
and a third size (simulated from those replicates) is refitted with the full law.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from analysis.fits import MIN_SUPPORT, Fit, _by_size, fit_law, paired, power_law, seed_labels, seed_resamples

N_REPLICATES = 40  # bootstrap fits per refit (the report uses 200; 40 resolve a 95% interval's width to ~10%)
N_OUTCOMES = 12  # simulated outcomes per candidate
RANGE = 1000.0  # crossings are searched from the smallest measured size / RANGE to RANGE x the largest
GRID = 256  # points of the log-spaced search grid

Cost = Callable[[str, int, int], float]  # (model, subset size, seed) -> GPU-hours


@dataclass(frozen=True)
class Candidate:
    """What a grid can add: a subset size (for every model and seed) or a seed (for every model and size)."""

    kind: str  # "size" | "seed"
    value: int  # the subset size or the seed
    points: tuple[tuple[str, int, int], ...]  # (model, subset size, seed) the grid gains
    gpu_hours: float
    reason: str


@dataclass(frozen=True)
class Target:
    """The interval the suggestions narrow: the crossover's (decades of subset size) or a gap's (points)."""

    kind: str  # "crossover" | "gap"
    at: float | None  # the subset size of the gap
    width: float  # now

    @property
    def unit(self) -> str:
        return "decades" if self.kind == "crossover" else "points"


@dataclass(frozen=True)
class Suggestion:
    candidate: Candidate
    width_after: float  # expected, over the simulated outcomes
    reduction: float  # target width now - width_after
    chosen: bool  # within the budget, greedily by reduction per GPU-hour
    points: tuple[tuple[str, int, int], ...] = ()  # what the grid gains with it, given the candidates chosen
    gpu_hours: float = 0.0  # their cost: more than the candidate's alone where a seed meets a new size

    @property
    def per_gpu_hour(self) -> float:
        return self.reduction / self.gpu_hours if self.gpu_hours > 0 else math.inf


def fit_curve(frame: pd.DataFrame, n: int = N_REPLICATES, seed: int = 0) -> Fit | None:
    """`fit_law` with `n` bootstrap replicates; with two sizes, `two_size_law`. None with fewer sizes."""
    per_size = _by_size(frame)
    if len(per_size) >= 3:
        return fit_law(frame, seed, n_bootstrap=n)
    return replace(two_size_law(per_size, zlib.crc32(str(frame["model"].iloc[0]).encode()), n, seed),
                   seeds=seed_labels(frame)) if len(per_size) == 2 else None


def two_size_law(per_size: list[tuple[float, np.ndarray]], salt: int, n: int, seed: int) -> Fit:
    """err = a * x^-b + c through two sizes' means: one equation short, so each replicate draws the floor c uniformly
    in [0, the smaller error) (any floor the two points allow) on top of resampling seeds (`seed_resamples`, paired
    across models); `salt` (the model) makes the two models' floors independent. The point estimate: the middle
    floor."""
    (x1, v1), (x2, v2) = per_size
    params = _through(x1, x2, 100.0 - v1.mean(), 100.0 - v2.mean(), 0.5)
    if min(len(v1), len(v2)) < 2:
        return Fit(params, bootstrap="none (one seed)")
    floors = np.random.default_rng([seed, salt]).uniform(0.0, 1.0, n)
    samples = [_through(x1, x2, 100.0 - v1[i1].mean(), 100.0 - v2[i2].mean(), u)
               for (i1, i2), u in zip(seed_resamples([len(v1), len(v2)], seed, n), floors, strict=True)]
    return Fit(params, np.array(samples), "seeds and a uniform floor (2 sizes)")


def _through(x1: float, x2: float, e1: float, e2: float, u: float) -> np.ndarray:
    """The law through (x1, e1) and (x2, e2) with the floor at fraction `u` of the smaller error (b >= 0)."""
    c = u * max(min(e1, e2), 0.0)
    b = max(math.log(max(e1 - c, 1e-9) / max(e2 - c, 1e-9)) / math.log(x2 / x1), 0.0)
    return np.array([(e1 - c) * x1**b, b, c, 0.0])


def crossings(vit: Fit, bit: Fit, lo: float, hi: float) -> np.ndarray:
    """Per paired replicate: the first size in [lo, hi] where ViT's accuracy overtakes BiT's; where none does, `lo`
    if the ViT is ahead there already, else `hi`; NaN where a replicate's fit failed."""
    grid = np.geomspace(lo, hi, GRID)
    rows = [power_law(grid, *b) - power_law(grid, *v)  # err_bit - err_vit = acc_vit - acc_bit
            for v, b in zip(*paired(vit, bit), strict=True)]
    diff = np.stack(rows) if rows else np.empty((0, GRID))
    up = (diff[:, :-1] <= 0) & (diff[:, 1:] > 0)
    out = np.where(diff[:, 0] > 0, lo, hi)
    for row in np.flatnonzero(up.any(axis=1)):
        i = int(np.argmax(up[row]))
        d1, d2 = diff[row, i], diff[row, i + 1]
        t = d1 / (d1 - d2)  # log-linear interpolation between the two grid points
        out[row] = math.exp(math.log(grid[i]) + t * (math.log(grid[i + 1]) - math.log(grid[i])))
    out[~np.isfinite(diff).all(axis=1)] = np.nan
    return out


def search_range(frame: pd.DataFrame) -> tuple[float, float]:
    """Where crossings are searched: `RANGE` x beyond the measured sizes on either side (fixed by what is
    measured now, so the widths before and after a candidate are comparable)."""
    return float(frame["subset_size"].min()) / RANGE, float(frame["subset_size"].max()) * RANGE


def _width(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return math.inf
    return float(np.percentile(values, 97.5) - np.percentile(values, 2.5))


def interval_width(vit: Fit | None, bit: Fit | None, target: Target, lo: float, hi: float) -> float:
    """The target's 95% interval width from the paired bootstrap replicates; inf without replicates."""
    if vit is None or bit is None or not len(vit.samples) or not len(bit.samples):
        return math.inf
    if target.kind == "crossover":
        return _width(np.log10(crossings(vit, bit, lo, hi)))
    gap = [power_law(target.at, *b) - power_law(target.at, *v) for v, b in zip(*paired(vit, bit), strict=True)]
    return _width(np.asarray(gap, float))  # err_bit - err_vit = ViT - BiT accuracy (the width of either sign)


def seed_noise(frame: pd.DataFrame, fit: Fit | None) -> float:
    """One seed's standard deviation: pooled within-size over seeds, else the fit's residual RMS, else 0."""
    per_size = [v for _, v in _by_size(frame)]
    dof = sum(len(v) - 1 for v in per_size)
    if dof > 0:
        return math.sqrt(sum(((v - v.mean()) ** 2).sum() for v in per_size) / dof)
    if fit is None:
        return 0.0
    resid = 100.0 - frame["value"].to_numpy(float) - power_law(frame["subset_size"].to_numpy(float), *fit.params)
    return float(np.sqrt(np.mean(resid**2))) if len(resid) else 0.0


def candidates(frame: pd.DataFrame, max_size: int, cost: Cost) -> list[Candidate]:
    """Geometric midpoints between measured sizes, 2x and 4x beyond the largest (up to `max_size`, the source's
    size: subsets nest inside it), and one more seed at every size. Each adds what a grid must: every model x
    seed at a new size, every model x size for a new seed."""
    models = sorted(frame["model"].unique())
    sizes = sorted(int(s) for s in frame["subset_size"].unique())
    seeds = sorted(int(s) for s in frame["seed"].dropna().unique()) or [0]
    new = {int(round(math.sqrt(a * b))): f"between {a:,} and {b:,} (geometric midpoint)"
           for a, b in zip(sizes, sizes[1:], strict=False)}
    for k in (2, 4):
        new.setdefault(min(sizes[-1] * k, max_size), f"{k}x the largest measured size" +
                       (" (capped at the source's size)" if sizes[-1] * k > max_size else ""))
    out = []
    for n, why in sorted(new.items()):
        if n in sizes or n > max_size:
            continue
        points = tuple((m, n, s) for m in models for s in seeds)
        out.append(Candidate("size", n, points, sum(cost(*p) for p in points),
                             f"{why}; {len(points)} points (every model x seed)"))
    seed = max(seeds) + 1
    points = tuple((m, n, seed) for m in models for n in sizes)
    out.append(Candidate("seed", seed, points, sum(cost(*p) for p in points),
                         f"one more seed; {len(points)} points (every model x size)"))
    return out


def simulate(frame: pd.DataFrame, fits: dict[str, Fit], noise: dict[str, float], cand: Candidate,
             rng: np.random.Generator) -> pd.DataFrame:
    """`frame` with the candidate's rows drawn from one paired bootstrap replicate plus seed noise (one replicate
    per model, drawn apart, where the models did not all run the same seeds: `paired`)."""
    n = min(len(f.samples) for f in fits.values())
    same = len({f.seeds for f in fits.values()}) == 1 and next(iter(fits.values())).seeds != ()
    groups = [list(fits)] if same else [[model] for model in fits]
    pick = {}
    for group in groups:  # the models sharing one replicate
        valid = [i for i in range(n) if all(np.isfinite(fits[m].samples[i]).all() for m in group)]
        i = int(rng.choice(valid)) if valid else None
        pick |= dict.fromkeys(group, i)
    rows = []
    for model, size, seed in cand.points:
        fit, i = fits[model], pick[model]
        params = fit.samples[i] if i is not None else fit.params
        acc = 100.0 - power_law(size, *params) + rng.normal(0.0, noise[model])
        rows.append({"model": model, "subset_size": size, "seed": seed, "value": float(acc)})
    return pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)


def target_for(fits: dict[str, Fit], vit: str, bit: str, frame: pd.DataFrame, cands: list[Candidate],
               budget: float | None) -> Target:
    """The crossover when at least half of the replicate pairs cross in range, else the BiT - ViT gap at the
    largest size a size candidate within the budget reaches (the largest measured size if none does)."""
    lo, hi = search_range(frame)
    found = crossings(fits[vit], fits[bit], lo, hi)
    found = found[np.isfinite(found)]
    if len(found) and np.mean((found > lo) & (found < hi)) >= MIN_SUPPORT:
        probe = Target("crossover", None, 0.0)
    else:
        reach = [c.value for c in cands if c.kind == "size" and (budget is None or c.gpu_hours <= budget)]
        probe = Target("gap", float(max(reach + list(frame["subset_size"]))), 0.0)
    return Target(probe.kind, probe.at, interval_width(fits[vit], fits[bit], probe, lo, hi))


def expected_width(frame: pd.DataFrame, vit: str, bit: str, target: Target, fits: dict[str, Fit],
                   cand: Candidate, seed: int = 0) -> float:
    """Mean interval width over `N_OUTCOMES` simulated outcomes of `cand` (the same random stream for every
    candidate, so their differences are not sampling noise); an outcome with no interval counts as no change."""
    rng = np.random.default_rng(seed)
    noise = {m: seed_noise(frame[frame["model"] == m], fits[m]) for m in (vit, bit)}
    lo, hi = search_range(frame)
    widths = []
    for _ in range(N_OUTCOMES):
        grown = simulate(frame, fits, noise, cand, rng)
        after = {m: fit_curve(grown[grown["model"] == m]) for m in (vit, bit)}
        w = interval_width(after[vit], after[bit], target, lo, hi)
        widths.append(w if math.isfinite(w) else target.width)
    return float(np.mean(widths))


def _rank(reduction: float, gpu_hours: float) -> tuple:
    """Narrowing candidates first, most per GPU-hour first; then the others, least widening first."""
    if reduction > 0:
        return (0, -reduction / max(gpu_hours, 1e-12))
    return (1, -reduction)


def suggest(frame: pd.DataFrame, vit: str, bit: str, max_size: int, cost: Cost,
            budget: float | None = None) -> tuple[Target, list[Suggestion]]:
    """Rank the candidates for narrowing the ViT-vs-BiT interval on one evaluation.

    Args:
        frame: one evaluation's accuracy rows of both models (model, subset_size, seed, value).
        vit, bit: the two models' names in `frame`.
        max_size: the largest subset the source holds.
        cost: GPU-hours of one grid point.
        budget: GPU-hours to spend; candidates are chosen greedily by reduction per GPU-hour while it lasts,
            each priced with the points it adds to the grid of those chosen before it (a seed chosen after a
            size also runs at that size); its reduction is simulated alone, not jointly with them.
            None: only the best candidate is chosen.
    Returns:
        The target interval (now) and the candidates, best reduction per GPU-hour first (each priced as chosen, or
        as it would add to all those chosen).
    """
    frame = frame[frame["model"].isin([vit, bit])][["model", "subset_size", "seed", "value"]]
    frame = frame.assign(seed=frame["seed"].fillna(0))
    fits = {m: fit_curve(frame[frame["model"] == m]) for m in (vit, bit)}
    if any(f is None or not len(f.samples) for f in fits.values()):
        raise ValueError(f"{vit} and {bit} need 2 measured sizes and 2 seeds at each (or 3 sizes and a free "
                         "parameter) for a bootstrap to simulate from")
    cands = candidates(frame, max_size, cost)
    target = target_for(fits, vit, bit, frame, cands, budget)
    after = {c: expected_width(frame, vit, bit, target, fits, c) for c in cands}
    grid = Grid(frame, cost)
    chosen: list[Candidate] = []
    while len(chosen) < (len(cands) if budget is not None else 1):  # greedy, each priced with those chosen before
        spent = grid.hours(chosen)
        affordable = [(c, grid.adds(chosen, c)) for c in cands if c not in chosen and target.width - after[c] > 0]
        affordable = [(c, hours) for c, (_, hours) in affordable if budget is None or spent + hours <= budget]
        if not affordable:
            break
        chosen.append(min(affordable, key=lambda ch: _rank(target.width - after[ch[0]], ch[1]))[0])
    out = []
    for c in cands:
        # a chosen candidate's price with those chosen before it; the others' with all chosen (what adding it costs)
        points, hours = grid.adds(chosen[:chosen.index(c)] if c in chosen else chosen, c)
        out.append(Suggestion(c, after[c], target.width - after[c], c in chosen, points, hours))
    return target, sorted(out, key=lambda s: _rank(s.reduction, s.gpu_hours))


class Grid:
    """The points a grid gains from candidates: a grid crosses every model, size and seed, so a new seed chosen with a
    new size also runs at that size, which neither candidate holds alone."""

    def __init__(self, frame: pd.DataFrame, cost: Cost):
        self.models = sorted(frame["model"].unique())
        self.sizes = {int(s) for s in frame["subset_size"].unique()}
        self.seeds = {int(s) for s in frame["seed"].dropna().unique()} or {0}
        self.cost = functools.cache(cost)  # each point priced once (the dry run's cost model per call)

    def points(self, chosen: list[Candidate]) -> set[tuple[str, int, int]]:
        sizes = self.sizes | {c.value for c in chosen if c.kind == "size"}
        seeds = self.seeds | {c.value for c in chosen if c.kind == "seed"}
        return {(m, n, s) for m in self.models for n in sizes for s in seeds}

    def adds(self, chosen: list[Candidate], cand: Candidate) -> tuple[tuple[tuple[str, int, int], ...], float]:
        """The points `cand` adds to the grid with `chosen`, and their GPU-hours."""
        new = tuple(sorted(self.points([*chosen, cand]) - self.points(chosen)))
        return new, sum(self.cost(*p) for p in new)

    def hours(self, chosen: list[Candidate]) -> float:
        return sum(self.cost(*p) for p in self.points(chosen) - self.points([]))
