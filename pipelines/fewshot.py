"""Linear few-shot evaluation (the paper's Fig 4 protocol, as big_vision's `fewshot_lsr`): closed-form
regularised least squares from frozen pre-logit features to {-1, +1} one-hot targets."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse

from pipelines.config import UserError

BIAS_FEATURE = 100.0  # big_vision: a large constant feature so the bias is almost unregularised


@dataclass(frozen=True)
class FewshotConfig:
    shots: tuple[int, ...] = (1, 5, 10, 25)
    l2_reg: float = 2.0**10  # big_vision fewshot_lsr default
    repeats: int = 3  # independent draws of the k-shot sets; for each draw the sets are nested

    def __post_init__(self):
        if not self.shots or min(self.shots) < 1 or self.repeats < 1 or self.l2_reg < 0:
            raise ValueError("shots must be positive integers, repeats >= 1 and l2_reg >= 0")


@dataclass
class FewshotResult:
    top1: dict[int, float]  # mean over repeats, percent
    top1_std: dict[int, float] = field(default_factory=dict)


def ridge_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int,
                 l2_reg: float) -> np.ndarray:
    """Class scores [N_test, C] of the ridge regression from features to {-1, +1} one-hot targets.

    Features are standardised with the training set's statistics and given a constant bias feature; the
    solve uses the smaller of the D x D and N x N systems (kernel form when N < D), in float64. The targets
    are never materialised: X^T Y = 2 * (per-class feature sums) - (feature sums).
    """
    x = x_train.astype(np.float64)  # the one copy of the training features; the rest works in place
    mean = x.mean(0)
    x -= mean
    n, d = x.shape
    onehot = scipy.sparse.csr_matrix((np.ones(n), (y_train, np.arange(n))), shape=(num_classes, n))
    if n >= d:
        # Normal equations of [X / std, b]: X^T X of the centred features gives their variances on its diagonal,
        # so standardising is a rescaling of the D x D system and the bias column is handled in closed form.
        upper = scipy.linalg.blas.dsyrk(1.0, x.T, trans=0)  # X^T X (upper triangle), X^T is Fortran-ordered
        std = np.sqrt(np.diag(upper) / n) + 1e-5
        col = x.sum(0) / std
        gram = np.empty((d + 1, d + 1))
        gram[:d, :d] = (np.triu(upper) + np.triu(upper, 1).T) / np.outer(std, std)
        gram[:d, d] = gram[d, :d] = BIAS_FEATURE * col
        gram[d, d] = BIAS_FEATURE**2 * n
        gram[np.diag_indices(d + 1)] += l2_reg
        counts = np.bincount(y_train, minlength=num_classes)
        class_sums = (onehot @ x) / std
        xty = np.vstack([2.0 * class_sums.T - col[:, None], BIAS_FEATURE * (2.0 * counts - n)[None, :]])
        w = scipy.linalg.solve(gram, xty, assume_a="pos")
    else:
        std = np.sqrt(np.einsum("ij,ij->j", x, x) / n) + 1e-5
        x = _with_bias(x / std)
        y = 2.0 * onehot.T.toarray() - 1.0
        w = x.T @ scipy.linalg.solve(x @ x.T + l2_reg * np.eye(n), y, assume_a="pos")
    xt = _with_bias((x_test.astype(np.float64) - mean) / std)
    return xt @ w


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def nested_shots(labels: np.ndarray, shots: tuple[int, ...], seed: int) -> dict[int, np.ndarray]:
    """Indices of a k-shot training set per k; each set contains the smaller ones (same per-class order)."""
    rng = np.random.default_rng([seed, 4242])
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    short = min(len(p) for p in per_class)
    if max(shots) > short:
        raise UserError(f"{max(shots)}-shot asked, but a class has only {short} training examples")
    return {k: np.sort(np.concatenate([p[:k] for p in per_class])) for k in shots}


def run(cfg: FewshotConfig, train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
        test_labels: np.ndarray, seed: int) -> FewshotResult:
    """k-shot top-1 (percent) for every k in `cfg.shots`, mean and std over `cfg.repeats` draws."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores: dict[int, list[float]] = {k: [] for k in cfg.shots}
    for repeat in range(cfg.repeats):
        for k, idx in nested_shots(train_labels, cfg.shots, seed * 1000 + repeat).items():
            pred = ridge_scores(train_features[idx], train_labels[idx], test_features, num_classes,
                                cfg.l2_reg).argmax(-1)
            scores[k].append(100.0 * float((pred == test_labels).mean()))
    return FewshotResult({k: float(np.mean(v)) for k, v in scores.items()},
                         {k: float(np.std(v)) for k, v in scores.items()})
