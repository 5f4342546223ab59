"""Typed, frozen configuration: dataclasses filled from plain dicts (YAML) and dotted overrides.

One config system for the whole project. Unknown keys and wrong types fail at load with a one-line
`ConfigError` naming the key and what would be valid (big_vision locks its ConfigDict the same way).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# `field(metadata=ALLOW_NONFINITE)`: a float field that may be nan or inf. Others refuse them: `lr: .nan` parses
# as a float and would otherwise pass every `lr <= 0` check.
ALLOW_NONFINITE = {"allow_nonfinite": True}


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits 2."""


class ConfigError(UserError):
    """A config key, type or value is not valid."""


def first_line(err: BaseException) -> str:
    """An error's message cut to its first line (at most 300 characters), or its type where it has none: what a
    one-line message quotes of an error from a library."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def count(n: float, noun: str, nouns: str | None = None) -> str:
    """`n` and its noun, singular for one: "1 shard", "1,024 shards", "0.5 GPUs" (`nouns`: an irregular plural)."""
    number = f"{int(n):,}" if float(n).is_integer() else f"{n:g}"
    return f"{number} {noun if n == 1 else nouns or noun + 's'}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


class _Loader(yaml.SafeLoader):
    """Safe loading (plain data only) that reads numbers as a person writes them.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e6`, `1.0e3` and `-.5` are strings
    there. This adds YAML 1.2's floats (a dot or an exponent); ints (`1_000` too) and the rest resolve as before.
    A key given twice in one mapping is an error, where PyYAML keeps the last silently (a second `seeds:` further
    down a grid would override the first unseen); keys a merge (`<<: *base`) brings in may still be overridden.
    """

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not _within(key_node, node):
                continue  # a merge, or a key a merge brought in (from elsewhere in the file): may be overridden
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own error says so
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key '{key}' is given twice (also on line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _within(inner, outer) -> bool:
    """Whether node `inner` is written inside node `outer` (not brought in from an anchor elsewhere)."""
    return outer.start_mark.index <= inner.start_mark.index <= outer.end_mark.index


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^[-+]?(?:
    [0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+   # 1e6, 1E-3, 3e+4, 2.5e3
    |[0-9][0-9_]*\.[0-9_]*                       # 2.5, 1_000.0
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5, -.5e-3
    )$""", re.X), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML as plain data (safe loading), with `1e6`, `1E-3`, `3e+4` and `.5` as numbers.

    Args:
        text: a YAML document.

    Returns:
        Its value: dicts, lists, strings, numbers, booleans and None only.
    """
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects are built


def _coerce(value: Any, tp: Any, where: str, finite: bool = True) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, finite)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of "
                          f"{' | '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]", finite) for i, v in enumerate(value))
    if hasattr(tp, "from_config"):  # a section whose keys come from a table (`evaluate:`, one per evaluation)
        return value if isinstance(value, tp) else tp.from_config(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and finite and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{key}'; valid keys here: {', '.join(_names(cls))}")
    kwargs = {}
    for name, value in data.items():
        finite = not fields[name].metadata.get("allow_nonfinite", False)
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name, finite)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(f"missing required key '{key}' ({_expected(hints[missing[0]])})")
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _names(cls: type) -> list[str]:
    """A config's keys, its own before those it inherits (a pretraining schedule before the model knobs)."""
    own = cls.__dict__.get("__annotations__", {})
    names = [f.name for f in dataclasses.fields(cls)]
    return [n for n in names if n in own] + [n for n in names if n not in own]


def _expected(tp: Any) -> str:
    """What a missing key takes, for its error message."""
    if dataclasses.is_dataclass(tp):
        names = _names(tp)
        return f"a mapping with keys {', '.join(names[:5])}" + (", ..." if len(names) > 5 else "")
    if typing.get_origin(tp) in (tuple, list):
        return f"a list of {_type_name((typing.get_args(tp) or (Any,))[0])}"
    return _type_name(tp)


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (tuples become lists) for YAML, JSON and MLflow params."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _brace_expanded(values: list[str]) -> bool:
    """The values look like a shell's expansion of one `{a..b}` or `{x,y}`: distinct, with a common prefix or
    suffix of 3 characters or more, and what differs between them a word each (`000001`, `b`), never nothing or
    a list's tail (two overrides a script layered, `[A, B]` then `[A]`)."""
    if len(set(values)) < len(values):
        return False
    head = len(os.path.commonprefix(values))
    tail = len(os.path.commonprefix([v[head:][::-1] for v in values]))
    return head + tail >= 3 and all(re.fullmatch(r"\w+", v[head:len(v) - tail]) for v in values)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars/lists) to a nested dict. `key[i]` is entry i of
    a list, as error messages name it (`downstream[0].root=/data/pets/train`). A key given more than once takes
    its last value, said in one line on stderr: a script layering its overrides means it, but a shell expanding an
    unquoted `{000000..000002}` makes three overrides of one key, and the study would read the last shard alone."""
    given: dict[str, list[str]] = {}
    for item in overrides:
        if "=" in item:
            given.setdefault(item.split("=", 1)[0].strip(), []).append(item.split("=", 1)[1])
    for path, values in given.items():
        if len(values) > 1:
            shell = " (a shell expands an unquoted {a..b} into one override per value: quote it)" \
                if _brace_expanded(values) else ""
            print(f"note: override '{path}' given {len(values)} times ({', '.join(values[:3])}"
                  f"{', ...' if len(values) > 3 else ''}): the last is used{shell}", file=sys.stderr)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = _child(node, key, path)
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML") from None
        node, key = _slot(node, keys[-1], path)
        node[key] = value
    return data


_INDEXED = re.compile(r"(.+)\[([^\]]*)\]")


def _slot(node: dict, key: str, path: str) -> tuple[dict | list, str | int]:
    """Where `key` of an override path lives in `node`: (node, key), or (the list, i) for `name[i]`."""
    indexed = _INDEXED.fullmatch(key)
    if indexed is None:
        return node, key
    name = indexed[1]
    items = node.get(name)
    held = f"{len(items)} entries" if isinstance(items, list) else "no list"
    valid = f"{name}[0]..{name}[{len(items) - 1}] (or from the end, {name}[-1])" if items else "none"
    try:
        i = int(indexed[2])
    except ValueError:
        raise ConfigError(f"override '{path}': '{indexed[2]}' is not an entry number; {name} has {held}, "
                          f"valid: {valid}") from None
    if not isinstance(items, list) or not -len(items) <= i < len(items):
        raise ConfigError(f"override '{path}': {name} has {held}, so there is no {name}[{i}]; valid: {valid}")
    return items, i % len(items)


def _child(node: dict, key: str, path: str) -> dict:
    """The mapping at `key` under `node` (made if absent, unless `key` names a list entry)."""
    parent, slot = _slot(node, key, path)
    child = parent[slot] if isinstance(parent, list) else parent.setdefault(slot, {})
    if not isinstance(child, dict):
        raise ConfigError(f"override '{path}': '{key}' is not a mapping")
    return child


def flatten(data: dict, prefix: str = "", index_lists: bool = False) -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`; lists stay as values, or, with `index_lists`, a list holding dicts or lists
    is flattened by index as an override names its entries (`downstream[0].root`)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}", index_lists))
    return out


def _flat(value: Any, name: str, index_lists: bool) -> dict[str, Any]:
    if isinstance(value, dict):
        return flatten(value, name + ".", index_lists)
    if index_lists and isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{name}[{i}]", index_lists).items()}
    return {name: value}
