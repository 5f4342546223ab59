"""Few-shot solver speed: our closed-form ridge vs sklearn LogisticRegression, same features, same run.

    python bench/fewshot_speed.py [--n 50000] [--dim 768] [--classes 1000]

Goal (issue 5): <= 2 s on 2 cores and >= 20x faster than the baseline. Prints the ratio last.
Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipelines.fewshot import ridge_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sklearn-max-iter", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    y = rng.integers(0, args.classes, args.n)
    xt = rng.normal(size=(1000, args.dim)).astype(np.float32)

    start = time.perf_counter()
    ridge_scores(x, y, xt, args.classes, 2.0**10).argmax(-1)
    ours = time.perf_counter() - start
    print(f"ridge (closed form, l2=2^10): {ours:.2f} s")

    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    LogisticRegression(max_iter=args.sklearn_max_iter, C=1.0).fit(x, y).predict(xt)
    base = time.perf_counter() - start
    print(f"sklearn LogisticRegression (lbfgs, max_iter={args.sklearn_max_iter}): {base:.2f} s")
    print(f"speed-up vs sklearn: {base / ours:.1f}x")


if __name__ == "__main__":
    main()
