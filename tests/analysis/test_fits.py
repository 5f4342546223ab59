"""Known-answer tests: synthetic curves with known parameters through the same estimators."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits

SIZES = np.geomspace(1e4, 1e7, 7)


def _curve(model, family, a, b, c, sizes=SIZES, noise=0.0, seeds=(0,), rng=None):
    rng = rng or np.random.default_rng(0)
    rows = []
    for s in seeds:
        for n in sizes:
            acc = 100 - fits.power_law(n, a, b, c) + (rng.normal(0, noise) if noise else 0.0)
            rows.append({"model": model, "family": family, "subset_size": n, "examples_seen": n,
                         "pretrain_flops": n * (2 if family == "ViT" else 1), "eval": "fewshot", "dataset": "d",
                         "shots": 5, "metric": "top1", "value": acc, "seed": s})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("noise, seeds, kind", [(0.0, (0,), "residuals"), (0.3, (0, 1, 2), "seeds")])
def test_fit_recovers_exponent_and_floor(noise, seeds, kind):
    frame = _curve("ViT-B/16", "ViT", a=2000, b=0.4, c=12, noise=noise, seeds=seeds)
    fit = fits.fit_law(frame)
    a, b, c, d = fit.params
    assert b == pytest.approx(0.4, abs=0.05) and c == pytest.approx(12, abs=1.5)  # 4-param fit: 7 sizes
    assert fit.bootstrap == kind and len(fit.samples) > 100
    if noise:
        lo, hi = np.percentile(fit.samples[:, 1], [2.5, 97.5])
        assert lo <= 0.4 <= hi


@pytest.mark.parametrize("sizes, key", [(np.geomspace(1e4, 1e7, 16), "estimate"), (SIZES, "fit_estimate")])
def test_observed_crossover_is_found_within_5_percent(sizes, key):
    # Errors a n^-b + c with equal floors cross where n^(b_vit - b_bit) = a_vit / a_bit. On a dense grid the
    # log-linear interpolation inside the measured bracket is within 5%; on a coarse grid the fitted curves are.
    vit = _curve("ViT-B/16", "ViT", a=3000, b=0.5, c=5, sizes=sizes)
    bit = _curve("BiT-R50x1", "BiT", a=150, b=0.2, c=5, sizes=sizes)
    true = (3000 / 150) ** (1 / 0.3)  # where the two errors are equal
    table = pd.concat([vit, bit])
    _, fitted = fits.fit_table(table)
    (row,) = fits.crossover_table(table, fitted)
    assert row["status"] == "observed" and row[key] == pytest.approx(true, rel=0.05)
    lo, hi = row["bracket"]
    assert lo < true < hi


def test_crossover_beyond_the_measured_range_is_extrapolated_with_an_interval():
    rng = np.random.default_rng(1)
    sizes = np.geomspace(1e4, 1e6, 6)
    vit = _curve("ViT-B/16", "ViT", a=3000, b=0.5, c=5, sizes=sizes, noise=0.05, rng=rng)
    bit = _curve("BiT-R50x1", "BiT", a=150, b=0.3, c=5, sizes=sizes, noise=0.05, rng=rng)
    true = (3000 / 150) ** (1 / 0.2)
    assert true > sizes[-1]
    table = pd.concat([vit, bit])
    _, fitted = fits.fit_table(table)
    (row,) = fits.crossover_table(table, fitted)
    assert row["status"] == "extrapolated" and row["estimate"] == pytest.approx(true, rel=0.25)
    lo, hi = row["ci"]  # open above where over 2.5% of the replicates do not cross within 1000x (here 9%)
    assert lo < row["estimate"] and (hi > row["estimate"] if hi is not None else 0.5 <= row["support"] < 0.975)


def test_curves_that_never_cross():
    table = pd.concat([_curve("ViT-B/16", "ViT", a=400, b=0.2, c=20), _curve("BiT-R50x1", "BiT", a=300, b=0.2, c=5)])
    _, fitted = fits.fit_table(table)
    (row,) = fits.crossover_table(table, fitted)
    assert row["status"] == "none" and row["estimate"] is None


SEEDS = (0, 1, 2, 3, 4)


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_extrapolation_error_interval_covers_zero_when_the_law_holds(rng_seed):
    frame = _curve("ViT-B/16", "ViT", a=2000, b=0.4, c=12, sizes=SIZES[:5], noise=0.5, seeds=SEEDS,
                   rng=np.random.default_rng(rng_seed))
    check = fits.extrapolation_error(frame)
    assert check["status"] == "measured" and check["size"] == SIZES[4] and check["n_fit_sizes"] == 4
    assert check["error"] == pytest.approx(check["predicted"] - check["measured"])
    assert check["ci"][0] < 0 < check["ci"][1]


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_extrapolation_error_shows_a_held_out_point_off_the_law(rng_seed):
    frame = _curve("ViT-B/16", "ViT", a=2000, b=0.4, c=12, sizes=SIZES[:5], noise=0.5, seeds=SEEDS,
                   rng=np.random.default_rng(rng_seed))
    frame.loc[frame["subset_size"] == SIZES[4], "value"] += 4.0  # the largest size beats the law by 4 points
    check = fits.extrapolation_error(frame)
    assert check["error"] == pytest.approx(-4.0, abs=1.5)
    assert check["ci"][1] < 0


def test_extrapolation_error_needs_three_sizes_left():
    check = fits.extrapolation_error(_curve("ViT-B/16", "ViT", a=2000, b=0.4, c=12, sizes=SIZES[:3]))
    assert check["status"] == "not enough sizes" and check["error"] is None and check["n_fit_sizes"] == 2
    table = pd.concat([_curve("ViT-B/16", "ViT", a=2000, b=0.4, c=12),
                       _curve("BiT-R50x1", "BiT", a=300, b=0.2, c=5, sizes=SIZES[:3])])
    rows = {r["model"]: r for r in fits.extrapolation_table(table)}
    assert rows["ViT-B/16"]["family"] == "ViT" and abs(rows["ViT-B/16"]["error"]) < 0.5
    assert rows["ViT-B/16"]["ci"] is None  # one seed: nothing to resample
    assert rows["BiT-R50x1"]["status"] == "not enough sizes"


def test_the_three_parameter_fit_recovers_a_known_law():
    sizes = np.array([256.0, 1024.0, 4096.0, 8192.0])  # the default study's: 4 sizes, the 3-parameter law
    fit = fits.fit_law(_curve("ViT-Pico/4", "ViT", a=900, b=0.7, c=60, sizes=sizes, noise=0.2, seeds=(0, 1, 2)))
    a, b, c, d = fit.params
    assert (b, c, d) == (pytest.approx(0.7, abs=0.1), pytest.approx(60, abs=1.0), 0.0)
    assert fit.bootstrap == "seeds" and fit.samples.shape == (fits.N_BOOTSTRAP, 4)
    assert np.all(np.isfinite(fit.samples)) and np.all(fit.samples[:, 3] == 0)


def _sse(x, err, params):
    return float(((fits.power_law(x, *params) - err) ** 2).sum())


def test_the_three_parameter_fit_is_the_bounded_global_minimum():
    # Noisy, flat, saturated and rising curves (a small study's degenerate fits: b at its bound, a ~ 0, c at a
    # bound): the exact solve is never worse than curve_fit from any of three starts, and keeps to the bounds.
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(0)
    x = np.repeat([256.0, 1024.0, 4096.0, 8192.0], 3)
    xs = x / x.min()
    curves = [fits.power_law(x, 900, 0.7, 60), np.full(12, 80.0), fits.power_law(x, 1e9, 5.0, 75),
              fits.power_law(x, 5.0, 0.3, 0.0), np.full(12, 99.5), 80 + np.log2(x / 256)]  # the last: rising error
    errs = np.array([np.clip(curve + rng.normal(0, s, 12), 0, 100) for curve in curves for s in (0.0, 0.5, 3.0)])
    exact = fits.fit3(x, errs)
    for err, params in zip(errs, exact, strict=True):
        a, b, c, d = params
        assert a >= 0 and 0 <= b <= fits.B_MAX and 0 <= c <= 100 and d == 0
        local = []
        for p0 in ([err.max() - err.min() + 1e-3, 0.5, max(err.min() * 0.5, 0)], [1.0, 0.1, 50.0], [10.0, 2.0, 1.0]):
            try:
                popt, _ = curve_fit(lambda x, a, b, c: fits.power_law(x, a, b, c), xs, err, p0=p0,
                                    bounds=([0, 0, 0], [np.inf, fits.B_MAX, 100]), maxfev=20000)
            except RuntimeError:
                continue
            local.append(_sse(xs, err, popt))
        assert _sse(x, err, params) <= min(local) + 1e-6 * (1 + min(local))
    assert _sse(x, errs[0], exact[0]) < 1e-12 and exact[0][1] == pytest.approx(0.7, abs=1e-6)  # exact data: exact law


def test_the_three_parameter_fit_refuses_non_finite_values():
    with pytest.raises(ValueError, match="non-finite"):
        fits.fit3(np.array([1.0, 2.0, 4.0]), np.array([[50.0, np.nan, 40.0]]))


def test_pareto_frontier_drops_dominated_points():
    table = pd.DataFrame([
        {"model": m, "subset_size": 1, "pretrain_flops": f, "value": v, "eval": "finetune", "dataset": "d",
         "shots": None, "metric": "top1", "family": "ViT", "seed": 0}
        for m, f, v in (("a", 1.0, 50), ("b", 2.0, 40), ("c", 3.0, 60), ("d", 4.0, 60))])
    (entry,) = fits.pareto_table(table)
    assert [p["model"] for p in entry["points"]] == ["a", "c"]
    assert math.isclose(entry["points"][1]["pretrain_flops"], 3.0)


@pytest.mark.parametrize("bit_seeds", [(3, 4, 5), (5, 4, 3)], ids=["in-order", "relabelled"])
def test_bootstrap_replicates_pair_by_seed_and_not_by_position(bit_seeds):
    """Two models of different seeds: replicate i of one has nothing to do with replicate i of the other, so the
    spread of their gap is that of independent draws, whatever the seeds are called. With the same seeds they stay
    paired row by row (seed s pretrained both models on the same nested subset)."""
    sizes, offsets = (256, 1024, 4096, 8192), (-1.3, 0.0, 1.3)
    vit = pd.concat([_curve("ViT-B/16", "ViT", a=300, b=0.3, c=60, sizes=sizes, seeds=(s,)).assign(
        value=lambda f, o=o: f["value"] + o) for s, o in zip((0, 1, 2), offsets, strict=True)])
    bit = pd.concat([_curve("BiT-R50x1", "BiT", a=200, b=0.3, c=55, sizes=sizes, seeds=(s,)).assign(
        value=lambda f, o=o: f["value"] + o) for s, o in zip(bit_seeds, offsets, strict=True)])
    fv, fb = fits.fit_law(vit), fits.fit_law(bit)
    sv, sb = fits.paired(fv, fb)
    gap = fits.power_law(8192, *sb.T) - fits.power_law(8192, *sv.T)
    alone = np.hypot(*(fits.power_law(8192, *s.T).std() for s in (sv, sb)))  # independent draws' spread
    assert gap.std() == pytest.approx(alone, rel=0.25)
    same = fits.fit_law(bit.assign(seed=bit["seed"].map(dict(zip(bit_seeds, (0, 1, 2), strict=True)))))
    assert all((a == b).all() for a, b in zip(fits.paired(fv, same), (fv.samples, same.samples), strict=True))


def test_the_four_parameter_fit_is_never_worse_than_the_three_parameter_law_it_contains():
    """d = 0 is the 3-parameter law, solved exactly (`fit3`): the 4-parameter least squares must not end above it
    (the local solver alone did, in 12 of these 150 noisy laws, once on a different curve altogether)."""
    rng = np.random.default_rng(0)
    x = np.repeat([256.0, 1024.0, 4096.0, 8192.0, 16384.0], 3)
    for _ in range(150):
        a, b, c = rng.uniform(5, 80), rng.uniform(0.05, 1.5), rng.uniform(0, 60)
        err = np.clip(fits.power_law(x, a, b, c) + rng.normal(0, rng.uniform(0.2, 3), len(x)), 0, 100)
        sse = [float(np.sum((fits.power_law(x, *p) - err) ** 2))
               for p in (fits._fit_once(x, err, four=True), fits.fit3(x, err[None])[0])]
        assert sse[0] <= sse[1] * (1 + 1e-9) + 1e-12


def test_a_curve_without_shots_has_its_law_drawn_and_in_the_fit_diagnostics(tmp_path, monkeypatch):
    """Fine-tune and linear-probe rows carry no shot count (<NA> in the results table's nullable column): their fits
    are keyed with shots None, as the figures look them up (Fig 3 drew no fitted law, and the fit diagnostics held
    only the few-shot fits, before)."""
    import matplotlib

    matplotlib.use("Agg")
    from analysis import plots

    rng = np.random.default_rng(0)
    frames = [_curve(m, f, a, 0.4, c, seeds=(0, 1, 2), noise=0.3, rng=rng) for m, f, a, c in
              (("ViT-B/16", "ViT", 900, 20), ("BiT-R50x1", "BiT", 300, 30))]
    table = pd.concat(frames + [f.assign(eval="finetune", shots=None) for f in frames], ignore_index=True)
    table["shots"] = table["shots"].astype("Int64")
    _, fitted = fits.fit_table(table)
    assert sorted((k[1], k[3]) for k in fitted) == [("fewshot", 5)] * 2 + [("finetune", None)] * 2
    drawn, real = [], plots._fitted_curves

    def fitted_curves(ax, frame, key, found, palette, reach=None):
        drawn.append((key[0], sorted(m for m in frame["model"].unique() if found.get((m, *key)) is not None)))
        real(ax, frame, key, found, palette, reach)

    monkeypatch.setattr(plots, "_fitted_curves", fitted_curves)
    plots.fig_vs_data(table, "finetune", tmp_path, "fig3", "Fig 3", fitted, [])
    assert drawn == [("finetune", ["BiT-R50x1", "ViT-B/16"])]
    points, errorbar = [], plots.plt.Axes.errorbar
    monkeypatch.setattr(plots.plt.Axes, "errorbar", lambda ax, x, y, **kw: points.append(len(x)) or errorbar(
        ax, x, y, **kw))
    plots.fig_fit_diagnostics(table, tmp_path, [], fitted)
    assert points == [4 * len(SIZES)]  # every size of all four fits


def test_the_legend_names_what_any_panel_draws_not_only_the_last(tmp_path, monkeypatch):
    """A model (or a study) drawn in some panels only is named in the figure's one legend, whichever panel is last."""
    import matplotlib

    matplotlib.use("Agg")
    from analysis import intervals, plots

    rng = np.random.default_rng(0)
    vit, bit = (_curve(m, f, 900, 0.4, 20, seeds=(0, 1), noise=0.3, rng=rng) for m, f in
                (("ViT-B/16", "ViT"), ("BiT-R50x1", "BiT")))
    table = pd.concat([vit, bit, vit.assign(shots=10)], ignore_index=True)  # the 10-shot panel has no BiT
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plots.fig_vs_data(table, "fewshot", tmp_path, "fig4", "Fig 4", {}, [])
    points = pd.concat([intervals.point_table(fits.accuracy_rows(pd.concat([vit, bit]))).assign(study="A"),
                        intervals.point_table(fits.accuracy_rows(vit.assign(shots=1))).assign(study="B")])
    plots.fig_studies_vs_data(points, "fewshot", ["A", "B"], tmp_path)
    (single, studies) = ([t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
                         for fig in figures)
    assert {"ViT-B/16", "BiT-R50x1"} <= set(single) and len(single) == len(set(single))
    assert sorted(studies) == ["A: BiT-R50x1", "A: ViT-B/16", "B: ViT-B/16"]  # B drew the 1-shot panel, not the last


def test_a_crossover_interval_counts_the_replicates_that_do_not_cross_at_their_side():
    """Replicates that do not cross in the sizes searched lie beyond them (the BiT still ahead there) or below them
    (the ViT already ahead): where more than 2.5% do, that end of the interval is open, not a percentile of the
    crossing replicates alone (a finite upper end at 73% support, before)."""
    crossing = list(np.geomspace(1e4, 1e5, 80))
    found = fits._with_interval({}, crossing + [math.inf] * 20, "fit-bootstrap")
    assert found["support"] == 0.8 and found["ci"][0] == pytest.approx(crossing[2], rel=0.03) and found["ci"][1] is None
    found = fits._with_interval({}, crossing + [math.inf] * 1, "fit-bootstrap")  # 1 of 81: past 2.5%, closed
    assert None not in found["ci"] and found["ci"][1] <= 1e5
    found = fits._with_interval({}, [-math.inf] * 10 + crossing, "seed-bootstrap")
    assert found["ci"][0] is None and 9e4 < found["ci"][1] <= 1e5
    assert fits.interval_text([2e4, None], [256, 8.192e6]) == "[20,000, beyond 8,192,000]"
    assert fits.interval_text([None, 300], None) == "[below the smallest size, 300]"
    assert fits._with_interval({}, crossing[:40] + [math.inf] * 60, "fit-bootstrap")["ci"] is None  # 40%: none


def test_no_crossover_says_how_many_bootstrap_fits_cross_all_the_same():
    """'none' is decided by the fitted laws, so its support is their bootstrap's (it was the measured means', 0%
    where a third of the fits crossed), and the verdict says when a crossover is not ruled out."""
    from analysis import intervals, verdict

    sizes = [256, 1024, 4096, 8192]
    for r in range(40):  # laws that truly cross at ~29,800 images, 3.6x beyond the largest size, seed noise sd 1
        rng = np.random.default_rng(r)
        table = pd.concat([_curve("ViT-B/16", "ViT", 222, 0.3, 45, sizes, 1.0, (0, 1, 2), rng),
                           _curve("BiT-R50x1", "BiT", 40, 0.2, 50, sizes, 1.0, (0, 1, 2), rng)], ignore_index=True)
        rows, fitted = fits.fit_table(table)
        (c,) = fits.crossover_table(table, fitted)
        if c["status"] == "none" and c["support"] > 0.1:
            break
    else:
        raise AssertionError("no 'none' with crossing bootstrap fits in 40 simulated studies")
    vit, bit = (fitted[(m, "fewshot", "d", 5, "top1")] for m in ("ViT-B/16", "BiT-R50x1"))
    vit, bit = fits.paired(vit, bit)
    a, b = c["window"]
    crosses = [fits._crossing(lambda x, i=i: fits.power_law(x, *bit[i]) - fits.power_law(x, *vit[i]), a, b,
                              lasting=True) is not None for i in range(len(vit))]
    assert c["support"] == pytest.approx(np.mean(crosses))
    summary = {"gaps": intervals.gap_table(fits.accuracy_rows(table)), "fits": rows, "crossovers": [c]}
    table["chance"] = 20.0
    assert f"; {c['support']:.0%} of the bootstrap fits do, so one is not ruled out)." in verdict.verdict(
        table, summary).sentence
