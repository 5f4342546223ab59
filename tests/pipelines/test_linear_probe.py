import numpy as np
import torch

from pipelines import linear_probe


def _blobs(n_per_class=40, classes=5, dim=16, spread=0.5, seed=0):
    """Gaussian blobs around fixed class centres; `seed` draws the samples (another seed: held-out data)."""
    centres = np.random.default_rng(123).normal(0, 4, (classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(0, spread, (len(labels), dim)), labels


def test_separable_features_are_scored_on_the_held_out_test_split():
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    wrong = np.arange(0, len(yt), 10)  # every 10th test label names another class: exactly 90% is right
    yt[wrong] = (yt[wrong] + 1) % 5
    result = linear_probe.run(linear_probe.LinearProbeConfig(), x, y, xt, yt, seed=0)
    assert result.top1 == 90.0
    assert set(result.val_top1) == set(linear_probe.LinearProbeConfig().l2_grid)
    assert all(v == 100.0 for v in result.val_top1.values())  # the minival is carved from the train split


def test_joint_solve_equals_separate_solves():
    x, y = _blobs(spread=3.0)
    xt, yt = torch.from_numpy((x - x.mean(0)) / x.std(0)), torch.from_numpy(y)
    grid = (1e-3, 1e-1)
    joint = linear_probe.fit_logistic(xt, yt, 5, grid, max_iter=500)
    for r, l2 in enumerate(grid):
        alone = linear_probe.fit_logistic(xt, yt, 5, (l2,), max_iter=500)
        torch.testing.assert_close(joint[r], alone[0], atol=2e-3, rtol=0)
    # stronger regularisation, smaller weights
    assert joint[1, :-1].norm() < joint[0, :-1].norm()


def test_rows_in_many_chunks_give_the_full_batch_answer():
    """The loss and gradient summed over chunks are the full-batch ones: 200 rows in chunks of 16 reach the weights
    of one 200-row chunk, within float32 summation-order noise (atol 1e-4 on weights of order 1)."""
    x, y = _blobs(spread=3.0)
    x = torch.from_numpy((x - x.mean(0)) / x.std(0)).float()
    whole = linear_probe.fit_logistic(x, torch.from_numpy(y), 5, (1e-2,), max_iter=200, chunk=len(x))
    chunked = linear_probe.fit_logistic(x, torch.from_numpy(y), 5, (1e-2,), max_iter=200, chunk=16)
    assert whole.abs().max() > 0.1  # a fitted probe, not two zero initialisations
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)
