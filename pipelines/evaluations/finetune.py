"""Fine-tuning from the pretrained weights: test top-1 and macro-F1, and the learning rate the sweep kept."""

from __future__ import annotations

from pipelines import finetune
from pipelines.downstream import Inputs, Measurement
from pipelines.finetune import FinetuneConfig as Config
from pipelines.loop import Hooks

DEFAULT = Config()


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Fine-tune on the task's train split (the chosen run's per-epoch curve goes to `inputs.curve`)."""
    def on_epoch(epoch: finetune.FinetuneEpoch) -> None:
        inputs.curve(epoch.epoch, epoch.metrics())

    train, test = inputs.splits()
    model = inputs.model
    ft = finetune.run(cfg, model.name, model.state, train, test, inputs.task.num_classes, inputs.runtime,
                      Hooks(on_epoch=on_epoch, label=f"finetune {inputs.dataset}"), model.options)
    return [inputs.measurement("top1", ft.top1), inputs.measurement("macro_f1", ft.macro_f1),
            inputs.measurement("lr", ft.lr)]
