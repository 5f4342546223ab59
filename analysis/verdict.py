"""The study's answer in one or two sentences, with numbers and intervals, and the caveats the data supports.

The sentence reads the headline evaluation (linear few-shot at 5 shots where measured: the paper's Fig 4) of the
best ViT against the best BiT (highest mean at the largest size): who leads, how the BiT - ViT gap moves from the
smallest to the largest size, and where the crossover lies (`fits.crossover`). The caveats are computed, never
written by hand: a model whose upstream top-1 does not clear chance, a degenerate fit, compute fixed per point,
a fine-tune that ends below the frozen probe of the same backbone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import fits, intervals
from analysis.results import UPSTREAM
from pipelines import families
from pipelines.config import count

# A fitted parameter is degenerate when the data do not pin it down: its estimate sits at a bound of the fit
# (`fits.fit3`: 0 <= b <= 5, 0 <= c <= 100; within `AT_BOUND`), or its 95% bootstrap interval spans more than
# `SPAN_DECADES` orders of magnitude (a lower end at or below 0 counts as an infinite span).
BOUNDS = {"b": (0.0, fits.B_MAX), "c": (0.0, 100.0)}
AT_BOUND = 1e-3
SPAN_DECADES = 2.0


@dataclass(frozen=True)
class Verdict:
    sentence: str
    caveats: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The sentence, then one line per caveat (the console's and the MLflow description's form)."""
        return "\n".join([self.sentence, *(f"Caveat: {c}" for c in self.caveats)])

    @classmethod
    def read(cls, summary: Path) -> Verdict | None:
        """The verdict a report wrote into its `summary.json` (None: no such file, or a summary without one, e.g.
        a comparison's)."""
        if not summary.is_file():
            return None
        found = json.loads(summary.read_text()).get("verdict")
        return None if found is None else cls(found["sentence"], tuple(found["caveats"]))


def verdict(table: pd.DataFrame, summary: dict) -> Verdict:
    """The answer of a study's results `table` and its report's `summary` (`report.write_report`'s dict)."""
    key = headline(table)
    caveats = (*upstream_near_chance(table), *degenerate_fits(summary["fits"], key),
               *(["compute is fixed per model (every subset size trains for the same steps), so accuracy vs "
                  "compute (Fig 5) shows nothing varying and is left out"] if fixed_compute(table) else []),
               *finetune_below_probe(table))
    return Verdict(sentence(table, summary, key) if key else "No ViT/BiT pair was measured on one evaluation: "
                   "nothing to compare.", caveats)


def headline(table: pd.DataFrame) -> tuple | None:
    """The (eval, dataset, shots, metric) the sentence reads: the first top-1 evaluation with a ViT/BiT pair, few-shot
    (5 shots, else the most) before the linear probe before fine-tuning before the upstream top-1."""
    rows = fits.accuracy_rows(table)
    rows = rows[rows["metric"] == "top1"]
    order = {"fewshot": 0, "linear_probe": 1, "finetune": 2, UPSTREAM: 4}
    keys = []
    for key, frame in rows.groupby(intervals.GROUP, dropna=False):
        if intervals.model_pairs(frame):
            shots = None if pd.isna(key[2]) else int(key[2])
            keys.append(((order.get(key[0], 3), shots != 5, -(shots or 0), key[1]), (key[0], key[1], shots, key[3])))
    return min(keys)[1] if keys else None


def key_rows(table: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """The rows of one (eval, dataset, shots, metric) key, as `headline` returns it (shots None: none)."""
    frame = table[(table["eval"] == key[0]) & (table["dataset"] == key[1]) & (table["metric"] == key[3])]
    return frame[frame["shots"].isna()] if key[2] is None else frame[frame["shots"] == key[2]]


def _best(frame: pd.DataFrame, bias: str) -> str:
    """The model of `bias` with the highest mean at the largest size it was measured at."""
    mine = frame[frame["family"].isin(families.with_bias(bias))]
    means = mine.groupby(["model", "subset_size"])["value"].mean().reset_index()
    top = means.sort_values(["subset_size", "value"]).groupby("model").last()
    return top.sort_values(["subset_size", "value"]).index[-1]


def _name(key: tuple) -> str:
    evaluation, dataset, shots, _ = key
    what = {"fewshot": f"{shots}-shot", "linear_probe": "linear probe", "finetune": "fine-tuned",
            UPSTREAM: "upstream"}.get(evaluation, evaluation)
    return f"{what} top-1 on {dataset}"


def _gap(g: dict) -> str:
    ci = "" if g["ci"] is None else f" [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}]"
    return f"{g['bit_minus_vit']:+.1f}{ci}"


def _size(n: float) -> str:
    return f"{n:,.0f}" if n >= 10 else f"{n:.2g}"  # (a search window's end 1000x below 256 images: 0.26)


def sentence(table: pd.DataFrame, summary: dict, key: tuple) -> str:
    """One or two sentences on `key`'s best ViT vs best BiT: leader, gap at both ends, crossover."""
    frame = key_rows(table, key)
    vit, bit = _best(frame, "weak"), _best(frame, "strong")
    mine = [g for g in summary["gaps"] if (g["vit"], g["resnet"], g["eval"], g["dataset"], g["shots"], g["metric"])
            == (vit, bit, *key)]
    gaps = sorted(mine, key=lambda g: g["subset_size"])
    bounds = " [95% CI]" if any(g["ci"] is not None for g in mine) else ""
    where = f"({_name(key)}, BiT − ViT in points{bounds})"
    if len(gaps) < 2:
        at = f"; {_gap(gaps[0])} at {_size(gaps[0]['subset_size'])} images" if gaps else ""
        return f"Too few subset sizes to say: {bit} vs {vit} measured at {count(len(gaps), 'size')}{at} {where}."
    signs = {math.copysign(1, g["bit_minus_vit"]) for g in gaps if g["bit_minus_vit"] != 0}  # a tie leads neither
    ties = sum(g["bit_minus_vit"] == 0 for g in gaps)
    first, last = gaps[0]["bit_minus_vit"], gaps[-1]["bit_minus_vit"]
    moves = ("goes from" if first * last < 0 else "grows from" if abs(last) > abs(first) else
             "shrinks from" if abs(last) < abs(first) else "is as large at both ends:")
    span = (f"the gap {moves} {_gap(gaps[0])} at {_size(gaps[0]['subset_size'])} "
            f"{'and' if moves.endswith(':') else 'to'} {_gap(gaps[-1])} at {_size(gaps[-1]['subset_size'])} images")
    unresolved = sum(g["ci"] is not None and g["ci"][0] <= 0 <= g["ci"][1] for g in gaps)
    with_ci = sum(g["ci"] is not None for g in gaps)
    rest = len(gaps) - with_ci
    one_seed = f"{rest} size{'s' if rest > 1 else ''} with one seed"
    if not with_ci:
        doubt = " (one seed: no intervals)"
    elif unresolved:
        doubt = f" (the interval includes 0 at {unresolved} of {with_ci} sizes" + (
            f"; {one_seed}, no interval)" if rest else ")")
    else:
        doubt = f" ({one_seed}: no interval)" if rest else ""
    cross = next((c for c in summary["crossovers"] if (c["vit"], c["resnet"], c["eval"], c["dataset"], c["shots"],
                                                       c["metric"]) == (vit, bit, *key)), None)
    every = f"at every measured size but {ties} where they tie" if ties else "at every measured size"
    if not signs:
        lead = f"{bit} and {vit} tie at every measured size; {span}"
    elif signs == {1.0}:
        lead = f"{bit} leads {vit} {every}{doubt}; {span}"
    elif signs == {-1.0}:
        lead = f"{vit} leads {bit} {every}{doubt}; {span}"
    else:
        lead = f"The lead changes between {bit} and {vit}{doubt}; {span}"
    fitted = {f["model"] for f in summary["fits"] if f["status"] == "fitted"
              and (f["eval"], f["dataset"], f["shots"], f["metric"]) == key} >= {vit, bit}
    back = (f", and the BiT leads again at {_size(gaps[-1]['subset_size'])}"
            if cross is not None and cross["status"] == "observed" and last > 0 else "")
    return f"{lead} {where}; {_crossing(cross, fitted, gaps[0]['subset_size'])}{back}."


def _crossing(cross: dict | None, fitted: bool, smallest: float) -> str:
    """The crossover's clause; `fitted`: both models' laws were fitted (so "none" names the sizes searched)."""
    if cross is None or cross["status"] == "none":
        if not fitted or not cross or not cross.get("window"):
            return "no crossover between the measured sizes (too few sizes to fit laws)"
        a, b = cross["window"]
        side = ("down to one image" if fits.from_one_image(smallest, a) else
                f"{fits.EXTRAPOLATE:g}x below the smallest measured size") if a < smallest else \
            f"{fits.EXTRAPOLATE:g}x beyond the largest measured size"
        support = cross.get("support")
        doubt = (f"; {support:.0%} of the bootstrap fits do, so one is not ruled out" if support is not None
                 and support > (1 - intervals.LEVEL) / 2 else "")
        return (f"no crossover: the fitted ViT does not overtake the BiT for good between {_size(a)} and "
                f"{_size(b)} images ({side}{doubt})")
    ci = (f" [95% CI {fits.interval_text(cross['ci'], cross.get('window'), _size)[1:-1]}]" if cross.get("ci")
          else f" (no interval: {cross['reason']})" if cross.get("reason") else "")
    if cross["status"] == "observed":
        lo, hi = cross["bracket"]
        return (f"the ViT overtakes the BiT at ~{_size(cross['estimate'])} images{ci}, between {_size(lo)} and "
                f"{_size(hi)}")
    if cross["status"] == "fitted":
        return (f"the fitted ViT overtakes the BiT at ~{_size(cross['estimate'])} images{ci}, inside the measured "
                "range, where the measured means show no ViT overtaking")
    return f"the fitted laws cross at ~{_size(cross['estimate'])} images, outside the measured range{ci}"


def upstream_near_chance(table: pd.DataFrame) -> list[str]:
    """Models whose upstream top-1 at their largest size has not clearly left chance: a mean under twice chance, or
    a 95% t interval over seeds that includes chance (issue 25's bar: at least twice chance, the interval clear of
    it), whatever the number of seeds."""
    value = pd.to_numeric(table["value"], errors="coerce")  # the table also holds non-numeric values
    rows = table[(table["eval"] == UPSTREAM) & table["chance"].notna() & np.isfinite(value)]
    out = []
    for model, frame in rows.groupby("model"):
        n = frame["subset_size"].max()
        at = frame[frame["subset_size"] == n]
        chance = float(at["chance"].iloc[0])
        mean, lo, hi = intervals.mean_interval(intervals.per_seed(at).to_numpy(), intervals.PERCENT)
        includes = lo is not None and lo <= chance
        if not includes and mean >= 2 * chance:
            continue
        spread = "one seed, no interval" if lo is None else f"[{lo:.1f}, {hi:.1f}]"
        why = [f"{mean / chance:.1f}x chance" if mean >= chance else "below chance"] + \
              (["an interval that includes chance"] if includes else [])
        out.append(f"{model}'s upstream top-1 at {_size(n)} images is {mean:.1f}% ({spread}; chance {chance:.2f}%): "
                   f"{' and '.join(why)}, so it barely trained and its curves say little about data")
    return out


def degenerate(fit: dict) -> list[str]:
    """Why each of a summary fit row's b and c is degenerate (the rule above `BOUNDS`); empty when neither is."""
    out = []
    for name, (low, high) in BOUNDS.items():
        value, ci = fit.get(name), (fit.get("ci") or {}).get(name)
        if value is None:
            continue
        why = []
        if value - low <= AT_BOUND * (high - low) or high - value <= AT_BOUND * (high - low):
            why.append(f"at its bound {low if value - low < high - value else high:g}")
        if ci is not None and (ci[0] <= 0 or math.log10(ci[1] / ci[0]) > SPAN_DECADES):
            decades = "unbounded below" if ci[0] <= 0 else f"{math.log10(ci[1] / ci[0]):.0f} orders of magnitude"
            why.append(f"interval spans {decades}")
        if why:
            ci_text = "" if ci is None else f" [{ci[0]:.3g}, {ci[1]:.3g}]"
            out.append(f"{name} = {value:.3g}{ci_text} ({'; '.join(why)})")
    return out


def degenerate_fits(fit_rows: list[dict], key: tuple | None) -> list[str]:
    """One caveat per degenerate fit on the headline evaluation, and one counting those on the others."""
    out, others = [], 0
    for f in fit_rows:
        if f.get("status") != "fitted" or not (found := degenerate(f)):
            continue
        if key is not None and (f["eval"], f["dataset"], f["shots"], f["metric"]) == key:
            out.append(f"the {f['model']} fit on {_name(key)} is degenerate: {'; '.join(found)}; its extrapolation "
                       "(and any crossover read from it) is not determined by the data")
        else:
            others += 1
    if others:
        out.append(f"{count(others, 'fit')} on other evaluations {'is' if others == 1 else 'are'} degenerate as well "
                   "(summary.json 'fits')")
    return out


def fixed_compute(table: pd.DataFrame) -> bool:
    """Every model spends one pretraining compute at all its subset sizes (the same steps at every size), so
    accuracy vs compute has one x per model."""
    flops = table.dropna(subset=["pretrain_flops"]).groupby("model")
    sizes = table.groupby("model")["subset_size"].nunique()
    return bool(len(flops)) and bool((sizes > 1).all()) and bool(
        (flops["pretrain_flops"].agg(lambda v: np.ptp(v.to_numpy(float)) <= 1e-9 * v.abs().max())).all())


def finetune_below_probe(table: pd.DataFrame) -> list[str]:
    """Per model and task: where its fine-tune's mean top-1 ends below its frozen linear probe's (same backbone,
    same task), at the largest such size, with both numbers, the paired difference over seeds with its 95% interval,
    and how many sizes it happens at. Only a difference whose interval excludes 0 is called under-training; one
    within the seeds' spread is said to be."""
    top1 = table[table["metric"] == "top1"]
    keys = ["model", "dataset", "subset_size"]
    ft = top1[top1["eval"] == "finetune"].groupby(keys)["value"].mean()
    probe = top1[top1["eval"] == "linear_probe"].groupby(keys)["value"].mean()
    both = pd.concat({"finetune": ft, "probe": probe}, axis=1).dropna()
    out = []
    for (model, dataset), frame in both.groupby(level=["model", "dataset"]):
        below = frame[frame["finetune"] < frame["probe"]]
        if below.empty:
            continue
        n = below.index.get_level_values("subset_size").max()
        row = below.xs(n, level="subset_size").iloc[0]
        at = top1[(top1["model"] == model) & (top1["dataset"] == dataset) & (top1["subset_size"] == n)]
        diff = intervals.gap(intervals.per_seed(at[at["eval"] == "finetune"]),
                             intervals.per_seed(at[at["eval"] == "linear_probe"]))
        ci = diff["ci"]
        spread = f"{diff['bit_minus_vit']:+.1f}" + (", one seed" if ci is None else f" [{ci[0]:+.1f}, {ci[1]:+.1f}]")
        reading = ("the fine-tune row under-trains" if ci is not None and ci[1] < 0 else
                   "within the seeds' spread" if ci is not None else "one seed cannot tell under-training from noise")
        out.append(f"{model}'s fine-tune on {dataset} ends below its frozen linear probe: {row['finetune']:.1f} vs "
                   f"{row['probe']:.1f} top-1 at {_size(n)} images (fine-tune - probe {spread}; below at "
                   f"{len(below)} of {len(frame)} sizes): {reading}")
    return out
