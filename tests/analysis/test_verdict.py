"""The verdict: the sentence for each case (a leader, a crossover, too few sizes) and each computed caveat."""

import re

import numpy as np
import pandas as pd
import pytest

from analysis import fits, intervals, verdict

SIZES = (1e3, 1e4, 1e5, 1e6)


def _rows(model, family, accuracy, evaluation="fewshot", shots=5, dataset="d", seeds=(0, 1, 2), flops=None,
          chance=10.0):
    """One row per size and seed: accuracy(n) plus seed noise (sd 0.3) of the model's own."""
    noise = np.random.default_rng(len(model)).normal(0, 0.3, (len(SIZES), len(seeds)))
    return [{"model": model, "family": family, "subset_size": n, "examples_seen": 10 * n,
             "pretrain_flops": flops if flops is not None else 1e9 * n, "eval": evaluation, "dataset": dataset,
             "shots": shots, "metric": "top1", "value": accuracy(n) + noise[i, j], "spread": None, "seed": s,
             "chance": chance} for i, n in enumerate(SIZES) for j, s in enumerate(seeds)]


def _table(*parts) -> pd.DataFrame:
    table = pd.DataFrame([r for part in parts for r in part])
    table["shots"] = table["shots"].astype("Int64")
    return table


def _summary(table: pd.DataFrame) -> dict:
    rows, fitted = fits.fit_table(table)
    return {"gaps": intervals.gap_table(fits.accuracy_rows(table)), "fits": rows,
            "crossovers": fits.crossover_table(table, fitted)}


def _answer(table):
    return verdict.verdict(table, _summary(table))


def test_bit_leading_everywhere_gives_both_gaps_with_intervals_and_no_crossover():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 20 + 8 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30 + 9 * np.log10(n)))
    answer = _answer(table)
    gap = r"\+1\d\.\d \[\+1\d\.\d, \+1\d\.\d\]"  # ~13 at 1,000 and ~16 at 10^6 points, with an interval
    assert re.match(rf"BiT-R50x1 leads ViT-B/16 at every measured size; the gap grows from {gap} at 1,000 to {gap} "
                    r"at 1,000,000 images \(5-shot top-1 on d, BiT − ViT in points \[95% CI\]\)", answer.sentence)
    assert answer.sentence.endswith("; no crossover: the fitted ViT does not overtake the BiT for good between 1,000 "
                                    "and 1,000,000,000 images (1000x beyond the largest measured size).")
    assert answer.text.splitlines()[0] == answer.sentence


def test_a_bit_that_overtakes_inside_the_range_is_not_called_laws_that_do_not_cross():
    """The ViT leads at the small sizes and the BiT overtakes it: the laws do cross, in the other direction, so the
    sentence names which crossing it looked for and where, not "the fitted laws do not cross"."""
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 35 + 2 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 20 + 6 * np.log10(n)))  # equal at ~3,200
    summary = _summary(table)
    (cross,) = summary["crossovers"]
    assert cross["status"] == "none" and cross["window"] == [1e3, 1e9]
    assert cross["reason"].startswith("ViT ahead only below 10,000 (the ResNet overtakes the ViT, not the reverse)")
    sentence = verdict.verdict(table, summary).sentence
    assert sentence.startswith("The lead changes between BiT-R50x1 and ViT-B/16")
    assert "do not cross" not in sentence and sentence.endswith(
        "no crossover: the fitted ViT does not overtake the BiT for good between 1,000 and 1,000,000,000 images "
        "(1000x beyond the largest measured size).")


def test_laws_that_cross_inside_the_range_where_the_means_do_not_flip_are_found():
    """The measured means have the BiT ahead at every size, while the fitted ViT overtakes at ~5,000 images and stays
    ahead: the crossing is inside the measured range (status 'fitted'; the search used to begin at the largest size
    and missed it, and missed every bootstrap replicate that crossed before the largest size)."""
    vit_fit, bit_fit = fits.Fit(np.array([2000.0, 0.6, 10.0, 0.0])), fits.Fit(np.array([60.0, 0.2, 11.0, 0.0]))
    sizes = (1e3, 1e4, 1e5, 1e6)
    vit = pd.DataFrame({"subset_size": sizes, "seed": 0, "value": [58.0, 80.0, 86.0, 88.0]})
    bit = vit.assign(value=[74.0, 80.5, 86.5, 88.5])
    cross = fits.crossover(vit, bit, vit_fit, bit_fit)
    assert cross["status"] == "fitted" and 3e3 < cross["estimate"] < 1e4 and cross["window"] == [1e3, 1e9], cross
    clause = verdict._crossing(cross, True, 1e3)
    assert clause.startswith("the fitted ViT overtakes the BiT at ~") and clause.endswith(
        "inside the measured range, where the measured means show no ViT overtaking"), clause


def test_a_lead_taken_back_by_the_bit_is_said():
    """BiT, ViT, BiT, BiT ahead: the ViT overtakes between the first two sizes, and the sentence says the BiT leads
    again at the largest."""
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 30.0), _rows("BiT-R50x1", "BiT", lambda n: 30.0))
    vit = table["family"] == "ViT"
    table.loc[vit, "value"] += table.loc[vit, "subset_size"].map({1e3: -3.0, 1e4: 3.0, 1e5: -3.0, 1e6: -4.0})
    sentence = _answer(table).sentence
    assert "the ViT overtakes the BiT at ~" in sentence and sentence.endswith(
        "between 1,000 and 10,000, and the BiT leads again at 1,000,000.")


def test_sizes_without_an_interval_are_not_counted_as_resolved():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 30.0),
                   _rows("BiT-R50x1", "BiT", lambda n: 30.3 if n <= 1e4 else 33.0))
    table = table[(table["subset_size"] <= 1e4) | (table["seed"] == 0)]  # one seed at 10^5 and 10^6
    sentence = _answer(table).sentence
    assert "(the interval includes 0 at 2 of 2 sizes; 2 sizes with one seed, no interval)" in sentence, sentence


def test_a_value_that_is_not_a_number_leaves_the_rest_of_its_curve_fitted():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 20 + 8 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30 + 9 * np.log10(n)))
    table.loc[0, "value"] = np.nan
    rows, _ = fits.fit_table(table)
    assert [(r["model"], r["status"]) for r in rows] == [("BiT-R50x1", "fitted"), ("ViT-B/16", "fitted")]
    points = intervals.point_table(fits.accuracy_rows(table))
    assert points[(points["model"] == "ViT-B/16") & (points["subset_size"] == 1e3)]["n_seeds"].tolist() == [2]


def test_an_observed_crossover_gives_its_size_and_bracket():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 10 + 15 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 40 + 5 * np.log10(n)))  # equal at n = 10^3
    table.loc[table["subset_size"] == 1e3, "value"] -= 5  # BiT ahead at 1,000 only
    sentence = _answer(table).sentence
    assert sentence.startswith("The lead changes between BiT-R50x1 and ViT-B/16")
    assert "the ViT overtakes the BiT at ~" in sentence and "between 1,000 and 10,000" in sentence
    assert "[95% CI " in sentence


def test_vit_leading_everywhere_and_too_few_sizes():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 60 + np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30 + 3 * np.log10(n)))  # -27 at 10^3, -18 at 10^6
    assert _answer(table).sentence.startswith("ViT-B/16 leads BiT-R50x1 at every measured size; the gap shrinks")
    single = _answer(table[table["seed"] == 0]).sentence
    assert "at every measured size (one seed: no intervals); the gap" in single and "CI" not in single
    one = table[table["subset_size"] == 1e6]
    assert _answer(one).sentence.startswith("Too few subset sizes to say: BiT-R50x1 vs ViT-B/16 measured at 1 size;"
                                            " -18.")


def test_a_vit_ahead_at_the_smallest_size_alone_does_not_hide_a_crossing_beyond_the_largest():
    """The ViT leads by noise at the smallest size, trails from the next on and climbs faster: the search for where
    the fitted laws cross looks beyond the largest size, where the BiT leads, not below the smallest."""
    means = {"ViT-B/16": (10.6, 12.0, 16.0, 18.5), "BiT-R50x1": (10.2, 18.0, 20.0, 20.6)}  # at 256 .. 8,192
    table = _table([{"model": m, "family": m[:3], "subset_size": n, "examples_seen": 16384, "pretrain_flops": 1e12,
                     "eval": "fewshot", "dataset": "d", "shots": 5, "metric": "top1", "value": v + off, "spread": None,
                     "seed": s, "chance": 10.0}
                    for m, by in means.items() for n, v in zip((256, 1024, 4096, 8192), by, strict=True)
                    for s, off in enumerate((-0.3, 0.0, 0.3))])
    summary = _summary(table)
    (cross,) = summary["crossovers"]
    assert cross["status"] == "extrapolated" and 8192 < cross["estimate"] < 8192 * 1000, cross
    assert "the fitted laws cross at ~" in verdict.verdict(table, summary).sentence


def test_a_tie_is_no_lead_and_no_flip():
    """ViT ahead, tied, ahead: the ViT never trails, so nothing is overtaken, and the tie is said."""
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 30.0, seeds=(0,)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30.0, seeds=(0,)))
    table["value"] = [32.0, 30.0, 35.0, 36.0, 30.0, 30.0, 31.0, 31.0]  # ViT 1e3..1e6, then BiT 1e3..1e6
    summary = _summary(table)
    (cross,) = summary["crossovers"]
    assert cross["status"] != "observed" and fits.observed_crossing(
        table[table["family"] == "ViT"].set_index("subset_size")["value"],
        table[table["family"] == "BiT"].set_index("subset_size")["value"]) is None
    assert verdict.verdict(table, summary).sentence.startswith(
        "ViT-B/16 leads BiT-R50x1 at every measured size but 1 where they tie (one seed: no intervals)")
    flip = pd.Series([29.0, 30.0, 33.0], index=[1e3, 1e4, 1e5])  # behind, tied, ahead: a flip, bracketed after the tie
    assert fits.observed_crossing(flip, pd.Series(30.0, index=flip.index)) == pytest.approx((1e4, 1e4, 1e5))


def test_the_headline_is_5_shot_few_shot_before_other_evaluations():
    table = _table(*(_rows(m, f, lambda n: 50.0, evaluation=e, shots=k) for m, f in (("ViT-B/16", "ViT"),
                                                                                    ("BiT-R50x1", "BiT"))
                     for e, k in (("finetune", None), ("fewshot", 10), ("fewshot", 5), ("linear_probe", None))))
    assert verdict.headline(table) == ("fewshot", "d", 5, "top1")
    assert verdict.headline(table[table["eval"] == "finetune"]) == ("finetune", "d", None, "top1")


def test_upstream_at_chance_is_a_caveat_and_well_above_it_is_not():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 6.5, evaluation="upstream", shots=None, dataset="pretrain",
                         chance=6.25),
                   _rows("BiT-R50x1", "BiT", lambda n: 40.0, evaluation="upstream", shots=None, dataset="pretrain",
                         chance=6.25))
    (caveat,) = verdict.upstream_near_chance(table)
    assert caveat.startswith("ViT-B/16's upstream top-1 at 1,000,000 images is 6.") and "chance 6.25%" in caveat
    single = table[table["seed"] == 0].assign(value=lambda t: np.where(t["model"] == "ViT-B/16", 12.0, 40.0))
    (caveat,) = verdict.upstream_near_chance(single)  # one seed: under twice chance
    assert "12.0% (one seed, no interval; chance 6.25%): 1.9x chance, so it barely trained" in caveat
    tight = table.assign(value=lambda t: np.where(t["model"] == "ViT-B/16", 6.9 + 0.01 * t["seed"], 40.0))
    (caveat,) = verdict.upstream_near_chance(tight)  # an interval clear of chance, but at 1.1x chance: flagged too
    assert re.search(r"is 6\.9% \(\[6\.9, 6\.9\]; chance 6\.25%\): 1\.1x chance, so it barely trained", caveat), caveat
    assert verdict.upstream_near_chance(table.assign(value=lambda t: 12.6 + t["seed"])) == []  # 2.1x, clear of it


def test_a_parameter_at_its_bound_or_with_an_interval_over_decades_is_degenerate():
    issue = {"b": 0.3, "c": 2.4e-11, "ci": {"b": [0.2, 0.4], "c": [3.8e-14, 77.5]}}
    (found,) = verdict.degenerate(issue)
    assert found == "c = 2.4e-11 [3.8e-14, 77.5] (at its bound 0; interval spans 15 orders of magnitude)"
    assert verdict.degenerate({"b": 5.0, "c": 3.0, "ci": None}) == ["b = 5 (at its bound 5)"]
    assert verdict.degenerate({"b": 0.4, "c": 3.0, "ci": {"b": [0.3, 0.5], "c": [0.0, 6.0]}}) == [
        "c = 3 [0, 6] (interval spans unbounded below)"]
    assert verdict.degenerate({"b": 0.4, "c": 3.0, "ci": {"b": [0.3, 0.5], "c": [1.0, 6.0]}}) == []


def test_fixed_compute_per_model_is_detected():
    fixed = _table(_rows("ViT-B/16", "ViT", lambda n: 50.0, flops=3e12), _rows("BiT-R50x1", "BiT", lambda n: 50.0,
                                                                                 flops=5e12))
    assert verdict.fixed_compute(fixed)
    assert any("Fig 5" in c for c in _answer(fixed).caveats)
    assert not verdict.fixed_compute(_table(_rows("ViT-B/16", "ViT", lambda n: 50.0)))


def test_a_finetune_below_its_probe_is_a_caveat_with_both_numbers():
    table = _table(_rows("BiT-R50x1", "BiT", lambda n: 26.1, evaluation="finetune", shots=None),
                   _rows("BiT-R50x1", "BiT", lambda n: 33.8 if n < 1e6 else 20.0, evaluation="linear_probe",
                         shots=None))
    (caveat,) = verdict.finetune_below_probe(table)
    assert re.match(r"BiT-R50x1's fine-tune on d ends below its frozen linear probe: 2[56]\.\d vs 3[34]\.\d top-1 at "
                    r"100,000 images \(fine-tune - probe -7\.7 \[-7\.7, -7\.7\]; below at 3 of 4 sizes\): the "
                    r"fine-tune row under-trains$", caveat), caveat


def test_a_finetune_below_its_probe_by_the_seeds_noise_is_not_called_under_training():
    """The same backbone's fine-tune and probe, equal but for seed noise: a mean below is said, with the paired
    interval, and read as noise, not as an under-trained fine-tune (which it was called in 187 of 200 such studies)."""
    rows = [{**r, "value": v} for evaluation, values in (("finetune", (30.0, 32.0, 28.0)),
                                                         ("linear_probe", (31.0, 29.0, 31.0)))
            for r, v in zip(_rows("BiT-R50x1", "BiT", lambda n: 0.0, evaluation=evaluation, shots=None)[-3:], values,
                            strict=True)]
    (caveat,) = verdict.finetune_below_probe(_table(rows))
    assert caveat.endswith("30.0 vs 30.3 top-1 at 1,000,000 images (fine-tune - probe -0.3 [-7.9, +7.3]; below at "
                           "1 of 1 sizes): within the seeds' spread"), caveat


@pytest.mark.parametrize("found", [None, {"other": 1}])
def test_a_summary_without_a_verdict_reads_as_none(tmp_path, found):
    path = tmp_path / "summary.json"
    if found is not None:
        path.write_text('{"other": 1}')
    assert verdict.Verdict.read(path) is None


def test_a_fitted_overtaking_the_bit_takes_back_is_no_crossover():
    """The fitted ViT gets ahead at ~170 images and the fitted BiT takes the lead back at ~9,000 for good: no
    lasting overtaking, so none is reported (a first crossing alone was reported as one)."""
    vit_fit, bit_fit = fits.Fit(np.array([250.0, 0.8, 20.5, 0.0])), fits.Fit(np.array([60.0, 0.5, 20.0, 0.0]))
    means = {"ViT-B/16": (58.0, 60.0, 62.0), "BiT-R50x1": (57.0, 61.0, 63.0)}  # at 100, 1,000, 10,000
    rows = pd.DataFrame([{"subset_size": n, "seed": 0, "value": v}
                         for n, v in zip((100, 1_000, 10_000), means["ViT-B/16"], strict=True)])
    bit = rows.assign(value=list(means["BiT-R50x1"]))
    cross = fits.crossover(rows, bit, vit_fit, bit_fit)
    assert cross["status"] == "none" and cross["reason"].endswith(
        "the fitted ViT does not overtake the BiT for good from the smallest size to 1000x beyond the largest"), cross


def test_a_vit_ahead_from_small_sizes_is_searched_down_to_one_image_not_a_fraction_of_one():
    """Sizes 32..32,768: the search below the smallest starts at one image (1000x below was 0.032 images)."""
    sizes = (32, 256, 2048, 32768)
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 40 + 6 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30 + 5 * np.log10(n)))
    table["subset_size"] = table["subset_size"].map(dict(zip(SIZES, sizes, strict=True)))
    answer = _answer(table)
    assert answer.sentence.endswith("; no crossover: the fitted ViT does not overtake the BiT for good between 1 "
                                    "and 32,768 images (down to one image)."), answer.sentence


def test_an_equal_gap_at_both_ends_is_not_called_growth():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: 20 + 8 * np.log10(n)),
                   _rows("BiT-R50x1", "BiT", lambda n: 30 + 8 * np.log10(n)))
    gaps = _summary(table)["gaps"]
    for g in gaps:
        g["bit_minus_vit"] = 10.0  # equal at every size, to the printed digit and beyond
    answer = verdict.verdict(table, {**_summary(table), "gaps": gaps})
    assert "the gap is as large at both ends: +10.0" in answer.sentence, answer.sentence


def test_an_upstream_evaluation_that_produced_no_number_is_not_called_near_chance():
    table = _table(_rows("ViT-B/16", "ViT", lambda n: float("nan"), evaluation="upstream", shots=None,
                         dataset="pretrain", chance=6.25))
    assert verdict.upstream_near_chance(table) == []
