"""Per-model recipes: a grid's `recipes:` section, pretraining settings for one model or a whole family merged over
`pretrain:`, as the ViT paper's Table 3 gives each model its own learning rate, weight decay and dropout.

    recipes:
      ViT: {dropout: 0.1, pre_logits: true}     # a family: every ViT of the grid
      ViT-L/16: {lr: 4.0e-4, epochs: 14}         # a model: beats its family, key by key

A recipe may set any `pretrain:` key (`PretrainConfig`, model knobs included); a duration (`epochs`, `steps` or
`examples`) replaces the one `pretrain:` gives. A point's identity hashes its merged settings, so a recipe changes
the points it applies to and only those.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines import families, models
from pipelines.config import ConfigError, from_dict, to_dict
from pipelines.pretrain import PretrainConfig

_DURATIONS = ("epochs", "steps", "examples")
# Keys that say one thing in different units: a recipe giving one of a group replaces the whole group.
_ONE_OF = (_DURATIONS, ("eval_every", "eval_every_examples"))


@dataclasses.dataclass(frozen=True)
class Recipes:
    """`{model name or family: {pretrain key: value}}`, each checked at load: its name, its keys, their types."""

    by_name: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, data: Any, where: str) -> Recipes:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of model or family names to pretrain settings, "
                              f"got {data!r}")
        keys = [f.name for f in dataclasses.fields(PretrainConfig)]
        for name, recipe in data.items():
            if name not in models.MODELS and name not in families.FAMILIES:
                raise ConfigError(f"{where}: '{name}' is neither a model nor a family; valid families: "
                                  f"{', '.join(families.FAMILIES)}; valid models: {', '.join(models.MODELS)}")
            if not isinstance(recipe, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping of pretrain keys, got {recipe!r}")
            unknown = sorted(set(recipe) - set(keys))
            if unknown:
                raise ConfigError(f"unknown key '{where}.{name}.{unknown[0]}'; valid keys here (pretrain's): "
                                  f"{', '.join(keys)}")
            alone = recipe if any(k in recipe for k in _DURATIONS) else {**recipe, "steps": 1}
            from_dict(PretrainConfig, alone, f"{where}.{name}")  # types and ranges, named by the recipe's key
        return cls(dict(data))

    def to_config(self) -> dict:
        return dict(self.by_name)

    def applying(self, model: str) -> list[str]:
        """The recipes `model` takes, weakest first: its family's, then its own."""
        return [name for name in (models.get_spec(model).family, model) if name in self.by_name]

    def where(self, model: str) -> str:
        """Which recipes `model` takes, for messages: ` (with recipes.ViT and recipes.ViT-B/16)`, or ''."""
        names = self.applying(model)
        return f" (with {' and '.join(f'recipes.{n}' for n in names)})" if names else ""

    def merged(self, base: PretrainConfig, model: str) -> PretrainConfig:
        """`base` with `model`'s recipes merged over it (a nested section, `augment`, key by key).

        Raises:
            ConfigError: settings that do not go together (a micro-batch above the batch), naming the recipes.
        """
        names = self.applying(model)
        if not names:
            return base
        data = to_dict(base)
        for name in names:
            recipe = self.by_name[name]
            for group in _ONE_OF:
                if any(k in recipe for k in group):
                    data = {k: v for k, v in data.items() if k not in group}
            data = _merge(data, recipe)
        return from_dict(PretrainConfig, data, f"pretrain{self.where(model)}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
