"""Linear few-shot top-1 (the paper's Fig 4) on the frozen features, per k; selected by `evaluate.fewshot`."""

from __future__ import annotations

from pipelines import fewshot
from pipelines.downstream import Inputs, Measurement
from pipelines.fewshot import FewshotConfig as Config

DEFAULT = Config()


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Mean and std over `cfg.repeats` draws of the k-shot training sets, for every k in `cfg.shots`."""
    shots = fewshot.run(cfg, *inputs.features(), inputs.runtime.seed)
    return [inputs.measurement("top1", shots.top1[k], shots=k, spread=shots.top1_std[k]) for k in cfg.shots]
