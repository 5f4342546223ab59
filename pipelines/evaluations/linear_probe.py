"""Linear probe on the frozen features: test top-1 and macro-F1, and the l2 strength chosen on the minival."""

from __future__ import annotations

from pipelines import distributed, linear_probe
from pipelines.downstream import Inputs, Measurement
from pipelines.linear_probe import LinearProbeConfig as Config

DEFAULT = Config()


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Fit on the whole train split's features, once, on the main rank (on its device); the fit is shared with
    LP-FT's start where their settings agree (`Inputs.probe`)."""
    found = inputs.features()
    fitted = inputs.probe(cfg, linear_probe.classes_seen(found[1], found[3]) if found is not None else 0)

    def solve() -> list[Measurement]:
        probe = linear_probe.score(fitted, found[2], found[3])
        return [inputs.measurement("top1", probe.top1), inputs.measurement("macro_f1", probe.macro_f1),
                inputs.measurement("l2", probe.l2)]

    return distributed.on_main(solve)
