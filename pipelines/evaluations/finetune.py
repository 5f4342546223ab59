"""Fine-tuning from the pretrained weights: test top-1 and macro-F1, and the learning rate the sweep kept."""

from __future__ import annotations

from pipelines import finetune
from pipelines.downstream import Inputs, Measurement
from pipelines.finetune import FinetuneConfig as Config

DEFAULT = Config()


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    """Fine-tune on the task's train split (the chosen run's per-epoch curve goes to `inputs.curve`)."""
    def on_epoch(metrics: dict) -> None:
        inputs.curve(int(metrics["epoch"]), {k: v for k, v in metrics.items() if k != "epoch"})

    train, test = inputs.splits()
    rt, model = inputs.runtime, inputs.model
    ft = finetune.run(cfg, model.name, model.state, train, test, inputs.task.num_classes, rt.seed, rt.device,
                      progress=rt.progress, desc=f"finetune {inputs.dataset}", on_epoch=on_epoch, loader=rt.loader)
    return [inputs.measurement("top1", ft.top1), inputs.measurement("macro_f1", ft.macro_f1),
            inputs.measurement("lr", ft.lr)]
