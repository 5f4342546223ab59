"""The model families: everything the code asks of a family, in one table without torch (`analysis` reads it).

A family row says which function builds its models, which Fig 7 diagnostics apply and where they find the parts
they read, its role in the crossover analysis (the paper's weak vs strong inductive bias) and how the figures and
the report draw and name it. A model row in `pipelines.models.MODELS` names its family; adding a family is its
builder, its model rows and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipelines.config import ConfigError


@dataclass(frozen=True)
class Attention:
    """Fig 7 for a transformer: patch-filter PCA, position-embedding similarity, mean attention distance.

    Attribute paths on the built model (timm's `VisionTransformer` layout): `patch_embed` has `grid_size`;
    `patch_filters` is the convolution whose RGB filters the PCA shows (None where the patches are not RGB, as
    in a hybrid, whose projection acts on ResNet features); `blocks` each hold a timm `Attention` as `.attn`.
    """

    patch_embed: str = "patch_embed"
    patch_filters: str | None = "patch_embed.proj"
    pos_embed: str = "pos_embed"
    blocks: str = "blocks"
    kind: ClassVar[str] = "attention"


@dataclass(frozen=True)
class ReceptiveField:
    """Fig 7's distance axis for a ResNet: the theoretical receptive field per stage, in pixels.

    `stem` and `stages` are attribute paths (timm's `ResNetV2` layout: each stage's blocks have conv1..conv3).
    """

    stem: str = "stem"
    stages: str = "stages"
    kind: ClassVar[str] = "receptive_field"


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the `family` of a model row and of the results table.
        label: how the report names it.
        bias: "weak" or "strong" inductive bias; the crossover analysis pairs every weak-bias model with every
            strong-bias one (ViT paper: where does the weaker prior overtake the stronger one).
        builder: "module:function" building a model from its row and the grid's knobs:
            `(kwargs, num_classes, image_size, options: models.ModelOptions) -> nn.Module`.
        diagnostic: which Fig 7 numbers apply and where they find their parts; None: no Fig 7 numbers.
        convolutional: has a ResNet path (timm's `train.py` puts such models in channels_last).
        marker: its matplotlib marker in every figure.
        colour: its band colour in the figures.
        knobs: the model knobs (`pipelines.models.ModelOptions` fields) its builder honours besides the head's
            initialisation, which every family takes; a grid setting another one fails at load.
    """

    name: str
    label: str
    bias: str
    builder: str
    diagnostic: Attention | ReceptiveField | None
    convolutional: bool
    marker: str
    colour: str
    knobs: tuple[str, ...] = ()


# The order here is the order of figure legends and of error messages.
_TRANSFORMER = ("dropout", "drop_path", "pool", "pos_embed", "pre_logits", "weight_init")
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("ViT", "ViT", "weak", "pipelines.models:build_vit", Attention(), False, "o", "#f4a261",
           _TRANSFORMER),
    Family("BiT", "BiT-ResNet", "strong", "pipelines.models:build_bit", ReceptiveField(), True, "s", "#8d99ae",
           ("dropout", "drop_path")),
    Family("Hybrid", "R50+ViT hybrid", "weak", "pipelines.models:build_hybrid", Attention(patch_filters=None), True,
           "^", "#90be6d", _TRANSFORMER),
]}


def get(name: str) -> Family:
    """The family row named `name`; an unknown name fails listing the valid ones."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'; valid families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def with_bias(bias: str) -> list[str]:
    """Names of the families with a "weak" or a "strong" inductive bias, in table order."""
    return [f.name for f in FAMILIES.values() if f.bias == bias]


def with_diagnostic(kind: str) -> list[str]:
    """Names of the families whose Fig 7 diagnostic is `kind` ("attention" or "receptive_field")."""
    return [f.name for f in FAMILIES.values() if f.diagnostic is not None and f.diagnostic.kind == kind]
