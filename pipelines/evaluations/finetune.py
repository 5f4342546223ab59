"""Fine-tuning from the pretrained weights: test top-1 and macro-F1, and the learning rate the sweep kept."""

from __future__ import annotations

from pipelines import distributed, finetune
from pipelines.downstream import Inputs, Measurement
from pipelines.finetune import FinetuneConfig as Config
from pipelines.loop import Hooks

DEFAULT = Config()
PROTOCOL_VERSION = 2  # 2: the minival is a fixed slice of the task's seeded key order (`finetune.split_minival`)


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Fine-tune on the task's train split (the chosen run's per-epoch curve goes to `inputs.curve`, every run's
    steps to `inputs.progress`, counted over the sweep)."""
    def on_epoch(epoch: finetune.FinetuneEpoch) -> None:
        inputs.curve(epoch.epoch, epoch.metrics())

    train, test = inputs.splits()
    model = inputs.model
    head = None
    if finetune.probe_on_frozen_features(cfg, model.image_size, model.options):
        # LP-FT's start from the features the other evaluations extracted (and the linear probe's fit, where its
        # settings are LP-FT's) instead of a second pass over the train split: the same numbers.
        fitted = inputs.probe(finetune.LP_FT_PROBE, inputs.task.num_classes)
        head = distributed.on_main(lambda: finetune.ProbeHead.of(fitted))

    def on_steps(step: int, steps: int, record) -> None:  # `step` counts over the sweep; so do its examples
        per_step = record.examples_seen / max(record.step, 1)
        inputs.progress(step, steps, {"loss": record.loss, "images_per_s": record.images_per_s,
                                      "examples_seen": step * per_step})

    ft = finetune.run(cfg, model.name, model.state, train, test, inputs.task.num_classes, inputs.runtime,
                      Hooks(on_epoch=on_epoch, label=f"finetune {inputs.dataset}"), model.options, head, on_steps)
    return [inputs.measurement("top1", ft.top1), inputs.measurement("macro_f1", ft.macro_f1),
            inputs.measurement("lr", ft.lr)]
