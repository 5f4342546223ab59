from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipelines.config import ALLOW_NONFINITE, ConfigError, apply_overrides, from_dict, load_yaml, to_dict


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


def test_a_key_given_twice_takes_the_last_and_says_so(capsys):
    """Layered overrides (a script's base, then its changes) take the last value; it is said, naming the values: the
    README's brace-expanded URLs, unquoted in a shell, are three overrides of one key, and a study of the last shard
    alone failed later on a puzzling sample count."""
    urls = [f"data.pretrain.urls=/d/train-00000{i}.tar" for i in range(3)]
    assert apply_overrides({}, urls) == {"data": {"pretrain": {"urls": "/d/train-000002.tar"}}}
    assert capsys.readouterr().err == ("note: override 'data.pretrain.urls' given 3 times (/d/train-000000.tar, "
                                       "/d/train-000001.tar, /d/train-000002.tar): the last is used (a shell expands "
                                       "an unquoted {a..b} into one override per value: quote it)\n")
    assert apply_overrides({}, ["data.pretrain.size=2048", " data.pretrain.size=1024"])["data"]["pretrain"] == {
        "size": 1024}
    said = capsys.readouterr().err
    assert said == "note: override 'data.pretrain.size' given 2 times (2048, 1024): the last is used\n"
    for layered in (["models=[ViT-Pico/4, BiT-R14-Pico]", "models=[ViT-Pico/4]"],  # a script's, not a shell's
                    ["downstream[0].test_root=/d/test", "downstream[0].test_root=/d/test_empty"]):
        apply_overrides({"downstream": [{}]}, layered)
        assert "a shell expands" not in capsys.readouterr().err


def test_an_override_reaches_a_list_entry_as_error_messages_name_it():
    data = {"downstream": [{"name": "a", "root": "/x"}, {"name": "b"}], "data": {"subsets": [1, 2]}}
    apply_overrides(data, ["downstream[1].root=/data/pets", "downstream[0].size=12", "data.subsets[1]=8"])
    assert data == {"downstream": [{"name": "a", "root": "/x", "size": 12}, {"name": "b", "root": "/data/pets"}],
                    "data": {"subsets": [1, 8]}}
    with pytest.raises(ConfigError, match=r"^override 'downstream\[2\].root': downstream has 2 entries, so there "
                                          r"is no downstream\[2\]; valid: downstream\[0\]..downstream\[1\] \(or from "
                                          r"the end, downstream\[-1\]\)$"):
        apply_overrides(data, ["downstream[2].root=/y"])
    with pytest.raises(ConfigError, match=r"models has no list, so there is no models\[0\]; valid: none"):
        apply_overrides(data, ["models[0]=ViT-B/16"])
    apply_overrides(data, ["downstream[-1].name=c", "data.subsets[-2]=4"])  # from the end, as in Python
    assert data["downstream"][1]["name"] == "c" and data["data"]["subsets"] == [4, 8]
    with pytest.raises(ConfigError, match=r"no downstream\[-3\]"):
        apply_overrides(data, ["downstream[-3].name=d"])
    with pytest.raises(ConfigError, match=r"^override 'downstream\[x\].name': 'x' is not an entry number; downstream "
                                          r"has 2 entries, valid: downstream\[0\]"):
        apply_overrides(data, ["downstream[x].name=d"])


@pytest.mark.parametrize("text, value", [
    ("1e6", 1e6), ("1E-3", 1e-3), ("3e+4", 3e4), ("2.5e3", 2500.0), (".5", 0.5), ("-.5", -0.5), ("1_000", 1000),
    ("1.0e3", 1000.0), ("1.0e-3", 1e-3), ("42", 42),
    ("1e", "1e"), ("e5", "e5"), ("v1.2", "v1.2"), ("09", "09"), ("1.2.3", "1.2.3"),  # not numbers: stay strings
])
def test_numbers_parse_as_a_person_writes_them(text, value):
    got = load_yaml(text)
    assert got == value and type(got) is type(value)
    assert apply_overrides({}, [f"inner.lr={text}"]) == {"inner": {"lr": value}}


def test_yaml_loading_stays_safe():
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        load_yaml("!!python/object/apply:os.system ['echo no']")


@dataclass(frozen=True)
class Floats:
    lr: float = 1e-3
    grid: tuple[float, ...] = (1.0,)
    maybe: float | None = None
    bound: float = field(default=0.0, metadata=ALLOW_NONFINITE)


@pytest.mark.parametrize("data, message", [
    ({"lr": ".nan"}, r"^lr: expected a finite number, got nan$"),
    ({"lr": ".inf"}, r"^lr: expected a finite number, got inf$"),
    ({"lr": "-.inf"}, r"^lr: expected a finite number, got -inf$"),
    ({"grid": "[1.0, .nan]"}, r"^grid\[1\]: expected a finite number, got nan$"),
    ({"maybe": ".inf"}, r"^maybe: expected a finite number, got inf$"),
])
def test_nan_and_inf_are_refused_unless_the_field_allows_them(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Floats, {k: load_yaml(v) for k, v in data.items()})
    assert from_dict(Floats, {"bound": load_yaml(".inf")}).bound == float("inf")
