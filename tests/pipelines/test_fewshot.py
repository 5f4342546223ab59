import time

import numpy as np
import pytest

from pipelines import fewshot


def test_separable_features_are_scored_on_the_held_out_test_split():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (10, 32))
    labels = np.repeat(np.arange(10), 30)
    feats = centres[labels] + rng.normal(0, 0.5, (300, 32))
    test_labels = labels[1::2].copy()
    wrong = np.arange(0, len(test_labels), 10)  # every 10th test label names another class: exactly 90% is right
    test_labels[wrong] = (test_labels[wrong] + 1) % 10
    result = fewshot.run(fewshot.FewshotConfig(shots=(1, 5), repeats=2), feats[::2], labels[::2], feats[1::2],
                         test_labels, seed=0)
    assert result.top1 == {1: 90.0, 5: 90.0}  # 100% would mean the shots were scored, not the test split


@pytest.mark.parametrize("n", [20, 200])  # kernel form (N < D) and primal form (N >= D)
def test_solution_equals_a_direct_lstsq_ridge_solve(n):
    rng = np.random.default_rng(1)
    x, y, xt = rng.normal(size=(n, 64)), rng.integers(0, 5, n), rng.normal(size=(50, 64))
    l2 = 2.0**10
    scores = fewshot.ridge_scores(x, y, xt, 5, l2)
    # Reference: ridge as an augmented least-squares problem [X; sqrt(l2) I] w = [Y; 0], on the same
    # standardised, bias-padded features, solved by numpy.linalg.lstsq.
    mean, std = x.mean(0), x.std(0) + 1e-5
    pad = lambda a: np.hstack([(a - mean) / std, np.full((len(a), 1), fewshot.BIAS_FEATURE)])  # noqa: E731
    target = 2.0 * np.eye(5)[y] - 1.0
    w, *_ = np.linalg.lstsq(np.vstack([pad(x), np.sqrt(l2) * np.eye(65)]),
                            np.vstack([target, np.zeros((65, 5))]), rcond=None)
    np.testing.assert_allclose(scores, pad(xt) @ w, atol=1e-5)


def test_shot_sets_are_nested_and_balanced():
    labels = np.repeat(np.arange(4), 30)
    sets = fewshot.nested_shots(labels, (1, 5, 10), seed=3)
    assert set(sets[1]) < set(sets[5]) < set(sets[10])
    assert np.bincount(labels[sets[5]]).tolist() == [5, 5, 5, 5]
    assert not np.array_equal(sets[5], fewshot.nested_shots(labels, (1, 5, 10), seed=4)[5])


def test_too_many_shots_is_a_clear_error():
    with pytest.raises(Exception, match="25-shot asked, but a class has only 3"):
        fewshot.nested_shots(np.repeat(np.arange(2), 3), (25,), seed=0)


def test_shot_selection_is_linear_in_the_rows_21k_classes_of_50_in_well_under_a_second():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(21_000), 50))
    start = time.perf_counter()
    sets = fewshot.nested_shots(labels, (1, 5, 10, 25), seed=0)
    assert time.perf_counter() - start < 1.0  # the per-class scan it replaced took minutes at this size
    assert np.bincount(labels[sets[25]]).tolist() == [25] * 21_000 and set(sets[1]) < set(sets[25])


def test_the_draw_is_that_of_a_per_class_permutation_class_by_class():
    """The shots of a seed are those of permuting each class's rows (in row order) in class order: what the
    selection drew before it sorted by class once (so studies keep their shots)."""
    labels = np.random.default_rng(5).integers(0, 6, 200)
    rng = np.random.default_rng([7, 4242])
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(6)]
    want = {k: np.sort(np.concatenate([p[:k] for p in per_class])) for k in (1, 4)}
    got = fewshot.nested_shots(labels, (1, 4), seed=7)
    assert all(np.array_equal(got[k], want[k]) for k in (1, 4))


def test_features_of_the_needed_rows_alone_give_the_whole_splits_answer():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 20)
    feats = rng.normal(0, 3, (5, 8))[labels] + rng.normal(0, 1, (100, 8))
    cfg = fewshot.FewshotConfig(shots=(1, 3), repeats=2)
    rows = fewshot.needed_rows(fewshot.draws(labels, cfg, 0))
    assert len(rows) < len(labels)
    whole = fewshot.run(cfg, feats, labels, feats[:30], labels[:30], seed=0)
    assert fewshot.run(cfg, feats[rows], labels, feats[:30], labels[:30], seed=0, rows=rows) == whole
