"""Typed records from JSON data and dotted assignments into them: the machinery behind recipes (and anything else
that is a tree of frozen dataclasses, such as a search space's targets).

`from_data` builds a dataclass from JSON data: lists become tuples where the type says so, objects become nested
dataclasses, a `Spec` may also be written as its name alone; a missing field takes its default, an unknown one is
an error naming the valid ones, a wrong type an error naming the field. `assign` sets a value at a dotted path of a
dataclass's JSON form, knowing which keys each level takes (a `Spec`'s other keys are its kwargs), and checks the
value's type where the field has one. `fits` checks a JSON value against a component parameter's annotation.
"""

from __future__ import annotations

import collections.abc
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any


class RecipeError(ValueError):
    """A recipe, or an override of it, that is not valid; the message names the field and the valid choices."""


@dataclass(frozen=True)
class Spec:
    """A registry key plus JSON kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else tp


def assign(data: dict[str, Any], tp: Any, segments: list[str], value: Any, path: str, parent: str) -> None:
    """Set ``value`` at ``segments`` inside the JSON form ``data`` of the dataclass type ``tp`` (at ``parent``)."""
    key, rest = segments[0], segments[1:]
    tp = _unwrap_optional(tp)
    if tp is Spec and key not in ("name", "kwargs"):
        data, tp = data.setdefault("kwargs", {}), dict[str, Any]  # any other key is one of the kwargs
    if is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        if key not in hints:
            where = f"'{parent}'" if parent else "a recipe"
            raise RecipeError(f"unknown recipe setting '{path}': {where} takes {', '.join(hints)}")
        child_tp = hints[key]
    else:
        child_tp = Any
    if not rest:
        if child_tp is not Any:
            _coerce(child_tp, value, path)  # a wrong type fails here, even where a later assignment replaces it
        data[key] = value
        return
    child = data.get(key)
    if child is None and is_dataclass(_unwrap_optional(child_tp)):
        raise RecipeError(f"'{path}': '{key}' is not set; set it whole, e.g. --set {key}='{{...}}'")
    if child is None:
        child = data[key] = {}
    if not isinstance(child, dict):
        raise RecipeError(f"'{path}': '{key}' holds {json.dumps(child)}, which has no field '{rest[0]}'")
    assign(child, child_tp, rest, value, path, f"{parent}.{key}" if parent else key)


def lookup(data: Any, segments: list[str]) -> Any:
    """The value at ``segments`` of a dataclass's JSON form, with `assign`'s rule that a `Spec`'s other keys are its
    kwargs; None where nothing is set."""
    for key in segments:
        if isinstance(data, dict) and set(data) == {"name", "kwargs"} and key not in data:
            data = data["kwargs"]
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def from_data(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    hints = typing.get_type_hints(cls)
    if cls is Spec and isinstance(data, str):
        return Spec(data, {})
    if cls is Spec and isinstance(data, (list, tuple)) and len(data) == 2:
        data = {"name": data[0], "kwargs": data[1] or {}}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: expected an object with {', '.join(hints)}, got {json.dumps(data, default=str)}")
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise RecipeError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(hints)}")
    values = {k: _coerce(hints[k], v, f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise RecipeError(f"{path}: {err}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` (JSON data) as type ``tp``: lists become tuples, objects dataclasses; wrong types are an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[-1] if len(errors) == 1 else f"{path}: {json.dumps(value)} fits none of "
                          f"{' | '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if is_dataclass(tp):
        return from_data(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {json.dumps(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise RecipeError(f"{path}: expected {len(args)} values, got {json.dumps(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{path}: expected an object, got {json.dumps(value)}")
        return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    return _scalar(tp, value, path)


def _scalar_fits(tp: Any, value: Any) -> bool:
    """JSON scalars: an int is a float too, a bool is no number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
            str: isinstance(value, str)}[tp]


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp not in (bool, int, float, str):
        raise RecipeError(f"{path}: unsupported field type {tp}")
    if not _scalar_fits(tp, value):
        raise RecipeError(f"{path}: expected {tp.__name__}, got {json.dumps(value)}")
    return float(value) if tp is float else value


def _is_torch(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__module__.split(".")[0] == "torch"


def _all(answers: list[bool | None]) -> bool | None:
    return False if False in answers else None if None in answers else True


def fits(tp: Any, value: Any) -> bool | None:
    """Whether the JSON ``value`` fits the annotation ``tp`` of a component's parameter: True, False, or None where
    the annotation gives nothing to check against (a plugin's own class, an annotation left as a string)."""
    if tp is Any:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        answers = [fits(a, value) for a in args]
        return True if True in answers else None if None in answers else False
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp in (bool, int, float, str):
        return _scalar_fits(tp, value)
    sequence = (tuple, list, collections.abc.Sequence)
    if tp in sequence or origin in sequence:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and _all([fits(a, v) for a, v in zip(args, value)])
        return _all([fits(args[0], v) for v in value]) if args else True
    if tp in (dict, Mapping) or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        return _all([fits(args[1], v) for v in value.values()]) if args else True
    if _is_torch(tp):
        return False  # a tensor or module: JSON data never is one (the JSON alternative of the union is what counts)
    return True if isinstance(tp, type) and isinstance(value, tp) else None


def type_name(tp: Any) -> str:
    """An annotation as a recipe writer reads it: ``float`` for ``float | torch.Tensor``, ``int or null`` ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if not _is_torch(a))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("collections.abc.", "")
