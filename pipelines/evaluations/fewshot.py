"""Linear few-shot top-1 (the paper's Fig 4) on the frozen features, per k; selected by `evaluate.fewshot`."""

from __future__ import annotations

from pipelines import distributed, fewshot
from pipelines.downstream import Inputs, Measurement
from pipelines.fewshot import FewshotConfig as Config

DEFAULT = Config()


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Mean and std over `cfg.repeats` draws of the k-shot training sets, for every k in `cfg.shots`: drawn from
    the index's labels, so features are extracted for the union of the draws' sets (and the test split) only."""
    seed = inputs.runtime.seed
    labels = inputs.splits()[0].labels
    train = inputs.train_features(fewshot.needed_rows(fewshot.draws(labels, cfg, seed)))
    test = inputs.test_features()

    def solve() -> list[Measurement]:
        (x, rows), (x_test, y_test) = train, test
        shots = fewshot.run(cfg, x, labels, x_test, y_test, seed, rows)
        return [inputs.measurement("top1", shots.top1[k], shots=k, spread=shots.top1_std[k]) for k in cfg.shots]

    return distributed.on_main(solve)
