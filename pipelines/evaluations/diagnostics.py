"""What the model learned in place of the CNN's built-in bias (Fig 7) as numbers, on the first images of the
pretraining source's held-out split; a ViT's arrays are kept as `FILE` for the Fig 7 panels."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines import diagnostics
from pipelines.downstream import Inputs, Measurement

FILE = "fig7.safetensors"


@dataclass(frozen=True)
class Config:
    batch: int = 128  # fixed images (the pretraining test split's first) for attention distances

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


DEFAULT = Config()


def identity(cfg: Config) -> dict:
    """The protocol's identity since EVAL_VERSION 1 (kept, so finished studies are not re-evaluated)."""
    return {"batch": cfg.batch}


def measure(cfg: Config, inputs: Inputs) -> list[Measurement]:
    model = inputs.model
    images = inputs.pretrain_images(cfg.batch) if diagnostics.needs_images(model.family) else None  # none for a BiT
    diag = diagnostics.run(model.module, model.family, images, model.image_size, inputs.runtime.device,
                           inputs.runtime.precision)
    if diag.has_panel:
        inputs.keep(FILE, diagnostics.to_bytes(diag))
    return [inputs.measurement(name, value) for name, value in diag.metrics.items()]
