"""Linear probe: multinomial logistic regression on cached frozen pre-logit features (the full train split).

All regularisation strengths of the grid are trained together from one feature pass (one batched L-BFGS
problem: their objectives are independent, so the joint minimum is every single minimum), the strength is
chosen on a held-out validation slice of the train split, and the chosen probe is scored on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.metrics import classification_metrics, holdout


@dataclass(frozen=True)
class LinearProbeConfig:
    l2_grid: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # weight penalty, per mean-loss unit
    max_iter: int = 300
    val_fraction: float = 0.2

    def __post_init__(self):
        if not self.l2_grid or min(self.l2_grid) < 0 or not 0 < self.val_fraction < 1 or self.max_iter < 1:
            raise ValueError("l2_grid must be non-negative and non-empty, 0 < val_fraction < 1, max_iter >= 1")


@dataclass
class LinearProbeResult:
    top1: float
    macro_f1: float
    l2: float
    val_top1: dict[float, float]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2_grid: tuple[float, ...],
                 max_iter: int, chunk: int = 8192) -> torch.Tensor:
    """Weights [R, D+1, C] (last row: bias, unpenalised) minimising mean CE + l2_r * ||W_r||^2 for each r.

    L-BFGS on the exact full-data objective, its loss and gradient accumulated over mini-batches of `chunk`
    examples, so memory beyond the features is one chunk's logits for every strength; runs where `x` lives.
    """
    l2 = torch.tensor(l2_grid, dtype=x.dtype, device=x.device)
    w = torch.zeros(len(l2_grid), x.shape[1] + 1, num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        total = (l2 * w[:, :-1].pow(2).sum((1, 2))).sum()
        total.backward()
        total = total.detach()
        for lo in range(0, len(x), chunk):
            logits = torch.einsum("nd,rdc->rnc", x[lo:lo + chunk], w[:, :-1]) + w[:, -1:]
            yc = y[lo:lo + chunk]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), yc.repeat(len(l2_grid)),
                                                   reduction="sum") / len(x)
            ce.backward()
            total += ce.detach()
        return total

    optimizer.step(closure)
    return w.detach()


@dataclass(frozen=True)
class Fitted:
    """The chosen probe: logits = ((x - mean) / std) @ w[:-1] + w[-1], with the l2 picked on the held-out slice."""

    w: torch.Tensor  # [D+1, C] on standardised features (last row: bias)
    mean: torch.Tensor
    std: torch.Tensor
    l2: float
    val_top1: dict[float, float]  # every strength's top-1 (percent) on the held-out slice

    def logits(self, x: np.ndarray) -> np.ndarray:
        return _logits(self.w, x, self.mean, self.std)

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C, D], bias [C]) on raw features: the standardisation folded in, as a classifier head."""
        weight = self.w[:-1] / self.std[:, None]
        return weight.T.contiguous(), self.w[-1] - self.mean @ weight


def fit(cfg: LinearProbeConfig, features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
        device: torch.device | None = None) -> Fitted:
    """Fit every strength of `cfg.l2_grid` on (1 - val_fraction) of the rows, keep the one with the best top-1 on
    the rest (ties: the stronger penalty).

    Runs on `device` (the GPU where there is one), in float32: the features are standardised, so single precision
    loses nothing the held-out metrics can see, and it halves the memory and doubles the CPU's throughput against
    float64 (the gradient is summed over chunks of the rows, so memory does not grow with the split).
    """
    device = device or torch.device("cpu")
    train, val = holdout(len(labels), cfg.val_fraction, seed, salt=31337)
    x = torch.from_numpy(features[np.sort(train)]).to(device, torch.float32)
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    x = (x - mean) / std
    w = fit_logistic(x, torch.from_numpy(labels[np.sort(train)]).to(device), num_classes, cfg.l2_grid, cfg.max_iter)
    del x
    val_top1 = {l2: classification_metrics(_logits(w[r], features[val], mean, std), labels[val])["top1"]
                for r, l2 in enumerate(cfg.l2_grid)}
    best = max(range(len(cfg.l2_grid)), key=lambda r: (val_top1[cfg.l2_grid[r]], cfg.l2_grid[r]))  # ties: stronger
    return Fitted(w[best], mean, std, cfg.l2_grid[best], val_top1)


def _logits(w: torch.Tensor, x: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    z = (torch.from_numpy(x).to(mean) - mean) / std
    return (z @ w[:-1] + w[-1]).cpu().double().numpy()


def classes_seen(*labels: np.ndarray) -> int:
    """The number of classes the probe fits when none is given: the largest label seen, plus one."""
    return int(max(y.max() for y in labels)) + 1


def score(probe: Fitted, test_features: np.ndarray, test_labels: np.ndarray) -> LinearProbeResult:
    """A fitted probe's test metrics (percent), with its chosen l2 and the held-out slice's top-1 per strength."""
    test = classification_metrics(probe.logits(test_features), test_labels)
    return LinearProbeResult(test["top1"], test["macro_f1"], probe.l2, probe.val_top1)


def run(cfg: LinearProbeConfig, train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
        test_labels: np.ndarray, seed: int, device: torch.device | None = None) -> LinearProbeResult:
    """Fit on (1 - val_fraction) of the train split, pick l2 on the rest, report the test metrics (percent)."""
    probe = fit(cfg, train_features, train_labels, classes_seen(train_labels, test_labels), seed, device)
    return score(probe, test_features, test_labels)
