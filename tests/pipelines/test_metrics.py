import numpy as np
import pytest

from pipelines.metrics import classification_metrics, holdout, macro_f1, top1


def test_macro_f1_known_answer():
    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert macro_f1(preds, labels) == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    metrics = classification_metrics(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), np.array([0, 1]))
    assert metrics["loss"] == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)


def test_top1_counts_any_of_a_samples_classes():
    logits = np.array([[0.0, 5.0, 0.0], [3.0, 0.0, 0.0]])
    assert top1(logits, np.array([1, 1])) == 50.0
    assert top1(logits, np.array([[2, 1], [1, -1]])) == 50.0  # multi-label, padded with -1


def test_holdout_is_a_seeded_disjoint_split_of_at_least_one():
    kept, held = holdout(50, 0.1, seed=0, salt=7)
    assert len(held) == 5 and sorted([*kept, *held]) == list(range(50))
    assert np.array_equal(holdout(50, 0.1, seed=0, salt=7)[1], held)
    assert not np.array_equal(holdout(50, 0.1, seed=1, salt=7)[1], held)
    assert len(holdout(5, 0.01, seed=0, salt=7)[1]) == 1
