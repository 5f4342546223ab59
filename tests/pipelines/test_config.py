from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipelines.config import ConfigError, apply_overrides, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    sizes: tuple[int, ...] = (1,)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_fills_nested_and_coerces_ints_to_floats():
    cfg = from_dict(Outer, {"name": "x", "sizes": [2, 3], "inner": {"lr": 1}})
    assert cfg == Outer("x", (2, 3), Inner(1.0, "a"))
    assert isinstance(cfg.inner.lr, float)
    assert to_dict(cfg) == {"name": "x", "sizes": [2, 3], "inner": {"lr": 1.0, "kind": "a"}, "maybe": None}


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'inner\.lrr'; valid keys here: lr, kind"):
        from_dict(Outer, {"name": "x", "inner": {"lrr": 1}})


@pytest.mark.parametrize("data, message", [
    ({"name": 3}, r"name: expected str, got 3"),
    ({"name": "x", "sizes": "12"}, r"sizes: expected a list"),
    ({"name": "x", "sizes": [1, "a"]}, r"sizes\[1\]: expected int"),
    ({"name": "x", "inner": {"kind": "c"}}, r"inner.kind: 'c' is not one of 'a', 'b'"),
    ({"name": "x", "maybe": True}, r"maybe"),
    ({}, r"missing required key 'name'"),
])
def test_wrong_types_fail_with_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_dotted_overrides_parse_yaml_values():
    data = apply_overrides({"pretrain": {"epochs": 10}}, ["pretrain.epochs=3", "seeds=[0, 1]", "a.b=x"])
    assert data == {"pretrain": {"epochs": 3}, "seeds": [0, 1], "a": {"b": "x"}}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["pretrain.epochs"])
