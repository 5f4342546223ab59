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
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots={list(self.shots)}: must be positive integers (k examples per class)")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats}: must be >= 1")
        if self.l2_reg < 0:
            raise ValueError(f"l2_reg={self.l2_reg}: must be >= 0")


@dataclass
class FewshotResult:
    top1: dict[int, float]  # mean over repeats, percent
    top1_std: dict[int, float] = field(default_factory=dict)


def ridge_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int,
                 l2_reg: float) -> np.ndarray:
    """Class scores [N_test, C] of the ridge regression from features to {-1, +1} one-hot targets."""
    return _scores(ridge_fit(x_train, y_train, num_classes, l2_reg), x_test)


def ridge_predictions(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int,
                      l2_reg: float, chunk: int = 4096) -> np.ndarray:
    """The predicted class of each test row, scored `chunk` rows at a time: memory holds chunk x C scores, not
    N_test x C (21k classes and 100k test images would be 17 GB of float64)."""
    fit = ridge_fit(x_train, y_train, num_classes, l2_reg)
    return np.concatenate([_scores(fit, x_test[lo:lo + chunk]).argmax(-1) for lo in range(0, len(x_test), chunk)])


def ridge_fit(x_train: np.ndarray, y_train: np.ndarray, num_classes: int,
              l2_reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights [D+1, C] of the ridge regression from features to {-1, +1} one-hot targets, and the training
    features' mean and std they expect.

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
    return w, mean, std


def _scores(fit: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, mean, std = fit
    return _with_bias((x.astype(np.float64) - mean) / std) @ w


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def nested_shots(labels: np.ndarray, shots: tuple[int, ...], seed: int) -> dict[int, np.ndarray]:
    """Indices of a k-shot training set per k; each set contains the smaller ones (same per-class order).

    O(N): the rows are sorted by class once (stable, so each class's rows keep their order), then each class's
    rows are permuted in class order: the same draws as permuting `flatnonzero(labels == c)` class by class.
    """
    rng = np.random.default_rng([seed, 4242])
    by_class = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    if max(shots) > (short := int(counts[present].min())):
        raise UserError(f"{max(shots)}-shot asked, but a class has only {short} training examples")
    ends = np.cumsum(counts)
    firsts = np.stack([rng.permutation(by_class[ends[c] - counts[c]:ends[c]])[:max(shots)] for c in present])
    return {k: np.sort(firsts[:, :k].ravel()) for k in shots}


def draws(labels: np.ndarray, cfg: FewshotConfig, seed: int) -> list[dict[int, np.ndarray]]:
    """The k-shot training sets of each of `cfg.repeats` draws (rows of the train split)."""
    return [nested_shots(labels, cfg.shots, seed * 1000 + repeat) for repeat in range(cfg.repeats)]


def needed_rows(sets: list[dict[int, np.ndarray]]) -> np.ndarray:
    """The train rows some draw trains on (sorted): the only ones whose features few-shot needs."""
    return np.unique(np.concatenate([draw[max(draw)] for draw in sets]))


def run(cfg: FewshotConfig, train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
        test_labels: np.ndarray, seed: int, rows: np.ndarray | None = None) -> FewshotResult:
    """k-shot top-1 (percent) for every k in `cfg.shots`, mean and std over `cfg.repeats` draws.

    `train_labels` are the whole train split's (the shots are drawn from them); `train_features` are those of its
    `rows` (sorted; default: every row): `needed_rows` of the draws, less any that could not be read.
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores: dict[int, list[float]] = {k: [] for k in cfg.shots}
    for draw in draws(train_labels, cfg, seed):
        for k, idx in draw.items():
            if rows is not None:  # a chosen row that could not be read is left out of its set
                idx = idx[np.isin(idx, rows)]
            at = idx if rows is None else np.searchsorted(rows, idx)
            pred = ridge_predictions(train_features[at], train_labels[idx], test_features, num_classes, cfg.l2_reg)
            scores[k].append(100.0 * float((pred == test_labels).mean()))
    return FewshotResult({k: float(np.mean(v)) for k, v in scores.items()},
                         {k: float(np.std(v)) for k, v in scores.items()})
