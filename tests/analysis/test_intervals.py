"""Known-answer tests for the seed statistics every point, gap and crossover interval of the report uses."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits, intervals
from analysis.report import gap_lines

T_975_2DF = 4.302652729911275  # Student t quantile, 2 degrees of freedom (3 seeds)


def _rows(model, family, values_by_size, eval="fewshot", shots=5):
    """values_by_size: {size: [value of seed 0, seed 1, ...]}."""
    return [{"model": model, "family": family, "subset_size": n, "examples_seen": 100.0, "pretrain_flops": 1e9,
             "eval": eval, "dataset": "d", "shots": shots, "metric": "top1", "value": v, "seed": s}
            for n, values in values_by_size.items() for s, v in enumerate(values)]


def test_mean_interval_is_students_t_over_seeds():
    mean, lo, hi = intervals.mean_interval([1.0, 2.0, 3.0])
    half = T_975_2DF * 1.0 / math.sqrt(3)  # sd of (1, 2, 3) is 1
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert intervals.mean_interval([5.0]) == (5.0, None, None)


def test_point_table_gives_each_plotted_point_its_mean_and_interval():
    table = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {256: [10, 20, 30], 1024: [40.0]}))
    points = intervals.point_table(table).set_index("subset_size")
    assert points.loc[256, "n_seeds"] == 3 and points.loc[256, "mean"] == 20
    assert points.loc[256, "ci_high"] - points.loc[256, "mean"] == pytest.approx(T_975_2DF * 10 / math.sqrt(3))
    assert points.loc[1024, "mean"] == 40 and pd.isna(points.loc[1024, "ci_low"])
    assert intervals.accuracy_errorbar([10, 20, 30]) == pytest.approx((points.loc[256, "ci_low"],
                                                                       points.loc[256, "ci_high"]))
    assert points.loc[256, "ci_low"] == 0  # 20 - 24.8, an accuracy's interval cut at 0


def test_an_accuracys_interval_is_cut_to_0_100_and_other_metrics_are_not():
    """2 seeds near 100%: the t interval (12.7 x the spread) reaches past 100, which no accuracy can; an accuracy's
    interval in the tables and its error bar stop at 100 (and 0), a metric in other units (px) keeps its own."""
    high = [99.0, 100.0]
    rows = _rows("BiT-R14-Pico", "BiT", {256: high}) + [
        {**r, "eval": "diagnostics", "metric": "attn_dist_layer1_mean", "shots": None}
        for r in _rows("BiT-R14-Pico", "BiT", {256: [99.0, 120.0]})]
    points = intervals.point_table(pd.DataFrame(rows)).set_index("metric")
    assert points.loc["top1", "ci_high"] == 100.0 and points.loc["top1", "ci_low"] < 99.0
    assert points.loc["attn_dist_layer1_mean", "ci_high"] > 200  # not an accuracy: uncut
    assert intervals.accuracy_errorbar(high) == (points.loc["top1", "ci_low"], 100.0)
    assert intervals.errorbar(high)[1] > 100  # the generic one, for any unit
    assert intervals.mean_interval([0.0, 2.0], intervals.PERCENT)[1] == 0.0


def test_gap_is_paired_over_seeds_when_both_models_ran_the_same_seeds():
    # Seed effects shared by both models (the same nested subset) cancel in the paired differences (1, 2, 3).
    vit = pd.Series([10.0, 30.0, 50.0], index=[0, 1, 2])
    bit = pd.Series([11.0, 32.0, 53.0], index=[0, 1, 2])
    g = intervals.gap(bit, vit)
    half = T_975_2DF / math.sqrt(3)
    assert g["bit_minus_vit"] == pytest.approx(2.0) and g["ci"] == pytest.approx([2 - half, 2 + half])
    assert g["method"].startswith("paired")
    unpaired = intervals.gap(bit, vit.set_axis([3, 4, 5]))  # other seeds: Welch, much wider here
    assert unpaired["method"].startswith("Welch") and unpaired["ci"][1] - unpaired["ci"][0] > 20


def test_a_seed_one_model_lacks_is_left_out_of_the_gap_and_the_crossover():
    """A failed ViT trial (seed 2 at 4,096): the BiT's seed 2 shares its subset with the ViT's seed 2, not with the
    seeds the ViT kept, so the gap pairs the two seeds both ran. With the seed effect (the subset's draw) larger than
    the gap, comparing means over different seed sets flipped it (and the verdict): here +2 everywhere."""
    subset = {0: 0.0, 1: 12.0, 2: -30.0}  # each seed's subset draw, shared by both models
    sizes = (256, 1024, 4096)
    vit = _rows("ViT-Pico/4", "ViT", {n: [20 + subset[s] for s in range(3)] for n in sizes})
    bit = _rows("BiT-R14-Pico", "BiT", {n: [22 + subset[s] + 0.1 * s for s in range(3)] for n in sizes})
    vit = [r for r in vit if not (r["subset_size"] == 4096 and r["seed"] == 2)]
    table = pd.DataFrame(vit + bit)
    at = {g["subset_size"]: g for g in intervals.gap_table(table)}
    assert at[4096]["bit_minus_vit"] == pytest.approx(2.05)
    assert at[4096]["method"] == "paired over 2 seeds (those both ran; BiT 3, ViT 2)"
    assert at[256]["method"] == "paired over 3 seeds"
    (crossing,) = fits.crossover_table(table, fits.fit_table(table)[1])
    assert crossing["status"] == "none"  # over all BiT seeds the 4,096 means flip (BiT 3.4 behind), then back
    assert intervals.gap(pd.Series([1.0, 2.0]), pd.Series([0.0, 1.0], index=[5, 6]))["method"].startswith("Welch")


def test_gap_lines_give_the_smallest_and_largest_subset_with_intervals():
    table = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {256: [10, 30, 50], 1024: [5, 5, 5], 4096: [20, 21, 22]})
                         + _rows("BiT-R14-Pico", "BiT", {256: [11, 32, 53], 1024: [9, 9, 9], 4096: [20, 21, 22]}))
    gaps = intervals.gap_table(table)
    assert [g["subset_size"] for g in gaps] == [256, 1024, 4096]
    (line,) = gap_lines(gaps)
    half = T_975_2DF / math.sqrt(3)
    assert f"+2.0 [{2 - half:+.1f}, {2 + half:+.1f}] at 256" in line and "+0.0 [+0.0, +0.0] at 4,096" in line
    assert "1,024" not in line


def test_fit_uses_every_seed_not_only_the_means():
    # Two seeds at every size but the largest, which has one seed far off: a fit to every seed's point weights
    # each size by its seeds, so it differs from a fit to the means; both recover b on symmetric noise.
    sizes = [256, 1024, 4096, 16384]
    law = {n: 100 - fits.power_law(n, 400, 0.5, 10) for n in sizes}
    table = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {n: [law[n] - 1, law[n] + 1] for n in sizes}))
    fit = fits.fit_law(table)
    assert fit.params[1] == pytest.approx(0.5, abs=0.02) and fit.bootstrap == "seeds"
    lo, hi = np.nanpercentile(fit.samples[:, 1], [2.5, 97.5])
    assert lo < 0.5 < hi and hi - lo > 0.01  # 4 sizes, 3 parameters: the interval comes from the seeds


def test_seed_bootstrap_is_paired_across_models():
    draws_a = list(fits.seed_resamples([3, 3, 3], seed=0, n=5))
    draws_b = list(fits.seed_resamples([3, 3, 3], seed=0, n=5))
    assert all((x == y).all() for a, b in zip(draws_a, draws_b, strict=True) for x, y in zip(a, b, strict=True))


def test_observed_crossover_has_a_seed_bootstrap_interval_inside_its_bracket():
    # ViT - BiT = -4, -2, +2, +4 on every seed (+-1 seed noise): it crosses between 1,024 and 4,096 in every
    # replicate, so the interval lies in that bracket and holds the estimate.
    sizes = [256, 1024, 4096, 16384]
    diff = dict(zip(sizes, [-4, -2, 2, 4], strict=True))
    bit = {n: [50.0, 51.0, 52.0] for n in sizes}
    vit = {n: [50 + diff[n] + e for e in (1.0, -1.0, 0.5)] for n in sizes}
    table = pd.DataFrame(_rows("ViT-Pico/4", "ViT", vit) + _rows("BiT-R14-Pico", "BiT", bit))
    _, fitted = fits.fit_table(table)
    (row,) = fits.crossover_table(table, fitted)
    assert row["status"] == "observed" and row["bracket"] == [1024, 4096]
    assert row["support"] == 1.0 and row["reason"] is None
    assert 1024 <= row["ci"][0] <= row["estimate"] <= row["ci"][1] <= 4096
    d1, d2 = -2 + 0.5 / 3 - 1, 2 + 0.5 / 3 - 1  # mean ViT - mean BiT at 1,024 and 4,096
    assert row["estimate"] == pytest.approx(1024 * 4 ** (d1 / (d1 - d2)))  # log-linear interpolation


def test_crossover_rows_without_an_interval_say_why():
    sizes = [256, 1024, 4096]
    one_seed = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {n: [40.0 + i * 10] for i, n in enumerate(sizes)})
                            + _rows("BiT-R14-Pico", "BiT", {n: [45.0 + i] for i, n in enumerate(sizes)}))
    (row,) = fits.crossover_table(one_seed, fits.fit_table(one_seed)[1])
    assert row["status"] == "observed" and row["ci"] is None and "single seed" in row["reason"]
    behind = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {n: [20.0 + 5 * i, 21 + 5 * i, 22 + 5 * i]
                                                      for i, n in enumerate(sizes)})
                          + _rows("BiT-R14-Pico", "BiT", {n: [60.0 + 2 * i, 61 + 2 * i, 62 + 2 * i]
                                                          for i, n in enumerate(sizes)}))
    (row,) = fits.crossover_table(behind, fits.fit_table(behind)[1])
    assert row["status"] == "none" and row["support"] == 0.0 and "BiT ahead at every measured size" in row["reason"]


def test_a_resnet_overtaking_the_vit_is_not_called_a_vit_lead():
    sizes = [256, 1024, 4096]
    table = pd.DataFrame(_rows("ViT-Pico/4", "ViT", {n: [30.0 + i, 31 + i, 32 + i] for i, n in enumerate(sizes)})
                         + _rows("BiT-R14-Pico", "BiT", {n: [29.0 + 5 * i, 30 + 5 * i, 31 + 5 * i]
                                                         for i, n in enumerate(sizes)}))
    (row,) = fits.crossover_table(table, fits.fit_table(table)[1])
    assert row["status"] == "none" and row["reason"].startswith("ViT ahead only below 1,024")


def test_one_seed_both_ran_is_paired_without_an_interval_and_disjoint_sizes_have_no_crossover():
    """Two of three trials of one model failed at a size: the gap is the one seed both ran, not the other seeds'
    mean against it (which had the opposite sign here); two models measured at no common size have no crossover
    (the bootstrap's "who is ahead at the largest common size" had no size to look at, and raised)."""
    g = intervals.gap(pd.Series([22.0, 34.0, -8.0]), pd.Series([20.0]))
    assert g == {"bit_minus_vit": 2.0, "ci": None, "method": "one seed both ran: no interval (BiT 3, ViT 1)"}
    vit = _rows("ViT-Pico/4", "ViT", {n: [20.0, 21.0] for n in (256, 1024, 4096)})
    bit = _rows("BiT-R14-Pico", "BiT", {n: [22.0, 23.0] for n in (512, 2048, 8192)})
    table = pd.DataFrame(vit + bit)
    (row,) = fits.crossover_table(table, fits.fit_table(table)[1])
    assert row["status"] == "none" and row["ci"] is None


def test_a_failed_bootstrap_refit_is_left_out_not_counted_as_no_crossing():
    """A replicate whose refit failed is kept as NaN (for pairing); it says nothing about where the laws cross, so
    it neither lowers the support nor opens the interval (6 failed refits of 200 opened its upper end)."""
    found = fits._with_interval({}, [1e4 + i for i in range(90)] + [math.nan] * 10, "fit-bootstrap")
    assert found["support"] == 1.0 and None not in found["ci"]
