"""A search space: dotted recipe fields (the names ``--set`` takes) mapped to ranges, checked against a recipe.

The space is a JSON object; every entry names a recipe field and how to draw it::

    {"optimizer.lr":        {"type": "float", "low": 1e-4, "high": 1e-1, "log": true},
     "augment.p_rotation":  {"type": "float", "low": 0.0, "high": 0.5},
     "net.dropout":         {"type": "categorical", "choices": [0.2, 0.4, 0.6]},
     "epochs":              {"type": "int", "low": 2, "high": 8},
     "loss.weight":         {"type": "list", "items": [1, {"type": "float", "low": 50, "high": 250}]},
     "loss.name":           {"type": "fixed", "value": "topk_ce"}}

``float`` and ``int`` take ``low``, ``high`` and optionally ``log`` and ``step``; ``categorical`` any JSON values
(objects and lists too); ``list`` a list whose items are constants or ranges (each range a parameter named
``path[i]``, e.g. van den Hork's class weights); ``fixed`` a value every trial gets, as ``--set`` would set it.
A trial's overrides are the fixed entries first, then the drawn ones, each in the file's order.

Everything is checked before any training (`load_space`): unknown fields and kwargs the recipe's components do not
take (the recipe's own validation, at both ends of every range and at every choice), empty or single-point ranges,
log ranges through zero, unknown keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from decathlete.recipes.base import Recipe, assignments, validate
from decathlete.recipes.schema import RecipeError, lookup

SCALARS = (type(None), bool, int, float, str)
_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"},
         "list": {"items"}, "fixed": {"value"}}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the entry and the fix."""


@dataclass(frozen=True)
class Parameter:
    """One drawn value: a float or int range, or categorical choices (any JSON; Optuna sees non-scalars as JSON)."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.CategoricalDistribution([_encode(c) for c in self.choices])

    def draw(self, trial: optuna.trial.BaseTrial) -> Any:
        """Ask ``trial`` for this parameter; its JSON value."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return self.decode(trial.suggest_categorical(self.name, [_encode(c) for c in self.choices]))

    def decode(self, value: Any) -> Any:
        """The JSON value of what Optuna stored."""
        if self.kind == "categorical":
            return {_encode(c): c for c in self.choices}[value]
        return int(value) if self.kind == "int" else float(value)

    def encode(self, value: Any) -> Any | None:
        """What Optuna stores for a JSON value, or None when the value lies outside this parameter."""
        if self.kind == "categorical":
            return _encode(value) if value in self.choices else None
        ok_type = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not self.low <= value <= self.high:
            return None
        return value


def _encode(choice: Any) -> Any:
    return choice if isinstance(choice, SCALARS) else json.dumps(choice, sort_keys=True)


@dataclass(frozen=True)
class Entry:
    """One field of the space: a fixed value, one parameter, or a list of constants and parameters."""

    path: str
    kind: str
    value: Any = None
    items: tuple[Any, ...] = ()  # list: constants, or Parameter
    parameters: tuple[Parameter, ...] = ()

    def assemble(self, drawn: Mapping[str, Any]) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "list":
            return [drawn[i.name] if isinstance(i, Parameter) else i for i in self.items]
        return drawn[self.parameters[0].name]


@dataclass(frozen=True)
class SearchSpace:
    """The checked space: its entries in file order, and the parameters Optuna draws."""

    entries: tuple[Entry, ...]
    source: str = "the space"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> list[Parameter]:
        return [p for e in self.entries for p in e.parameters]

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Draw every parameter for ``trial``; JSON values by parameter name."""
        return {p.name: p.draw(trial) for p in self.parameters}

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """JSON values by parameter name from a finished trial's stored ``params``."""
        return {p.name: p.decode(params[p.name]) for p in self.parameters if p.name in params}

    def override_values(self, drawn: Mapping[str, Any]) -> dict[str, Any]:
        """Recipe field -> value: fixed entries first, then the drawn ones, each in file order (the content of an
        override file for ``--set-file``)."""
        ordered = sorted(self.entries, key=lambda e: e.kind != "fixed")
        return {e.path: e.assemble(drawn) for e in ordered}

    def overrides(self, drawn: Mapping[str, Any]) -> list[str]:
        """The same as ``path=value`` assignments."""
        return assignments(self.override_values(drawn))

    def fixed_overrides(self) -> list[str]:
        return assignments({e.path: e.value for e in self.entries if e.kind == "fixed"})

    def probes(self) -> list[tuple[str, list[str]]]:
        """``(entry, overrides)`` that put every range end and every choice into a recipe, after the fixed entries."""
        fixed = self.fixed_overrides()
        return [("the fixed entries", fixed)] + [(f"'{e.path}'", [*fixed, f"{e.path}={json.dumps(value)}"])
                                                  for e in self.entries for value in _probes(e)]

    def check(self, recipe: Recipe, also: Callable[[Recipe], None] | None = None) -> None:
        """Apply every probe to ``recipe`` and validate it (then ``also``, which may raise `SpaceError`)."""
        for entry, overrides in self.probes():
            try:
                probe = validate(recipe.with_overrides(overrides))
            except RecipeError as err:
                raise SpaceError(f"{self.source}: {entry} does not fit recipe '{recipe.name}': {err}") from None
            if also is not None:
                also(probe)

    def encode(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna's stored form of those ``values`` (by parameter name) that lie inside the space."""
        encoded = {p.name: p.encode(values[p.name]) for p in self.parameters if p.name in values}
        return {k: v for k, v in encoded.items() if v is not None}


def _probes(entry: Entry) -> list[Any]:
    """Values to check the recipe with: every choice, and each range at both ends."""
    if entry.kind == "fixed":
        return []
    ends = [{p.name: p.choices[i] if p.kind == "categorical" else p.decode((p.low, p.high)[i])
             for p in entry.parameters} for i in (0, -1)]
    if entry.kind == "categorical":
        return list(entry.parameters[0].choices)
    return [entry.assemble(end) for end in ends]


def _parameter(name: str, spec: Any, source: str) -> Parameter:
    where = f"{source}: '{name}'"
    if not isinstance(spec, Mapping) or spec.get("type") not in ("float", "int", "categorical"):
        raise SpaceError(f"{where}: expected {{\"type\": \"float\"|\"int\"|\"categorical\", ...}}, got "
                         f"{json.dumps(spec)}")
    kind = spec["type"]
    unknown = set(spec) - _KEYS[kind] - {"type"}
    if unknown:
        raise SpaceError(f"{where}: a {kind} range takes {', '.join(sorted(_KEYS[kind]))}, not "
                         f"{', '.join(sorted(unknown))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise SpaceError(f"{where}: 'choices' must list at least two values (one value: "
                             '{"type": "fixed", "value": ...})')
        return Parameter(name, kind, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    numbers = (int,) if kind == "int" else (int, float)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in (low, high)):
        raise SpaceError(f"{where}: 'low' and 'high' must be {kind}s, got {json.dumps(low)} and {json.dumps(high)}")
    if not low < high:
        raise SpaceError(f"{where}: the range [{low}, {high}] is empty or a single point; 'low' must be below 'high' "
                         '(one value: {"type": "fixed", "value": ...})')
    log, step = bool(spec.get("log", False)), spec.get("step")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range must stay above 0, got low={low}")
    if log and step is not None:
        raise SpaceError(f"{where}: 'step' and 'log' cannot be combined")
    if step is not None and (not isinstance(step, numbers) or step <= 0 or step > high - low):
        raise SpaceError(f"{where}: 'step' must be a positive {kind} no larger than high - low, got {step}")
    return Parameter(name, kind, float(low), float(high), log, None if step is None else float(step))


def _entry(path: str, spec: Any, source: str) -> Entry:
    if not isinstance(path, str) or not path.strip() or any(not s for s in path.split(".")):
        raise SpaceError(f"{source}: '{path}' is not a dotted recipe field (e.g. optimizer.lr)")
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind == "fixed":
        if set(spec) != {"type", "value"}:
            raise SpaceError(f"{source}: '{path}': a fixed entry is {{\"type\": \"fixed\", \"value\": ...}}")
        return Entry(path, kind, value=spec["value"])
    if kind == "list":
        items = spec.get("items")
        if set(spec) != {"type", "items"} or not isinstance(items, list) or not items:
            raise SpaceError(f"{source}: '{path}': a list entry is {{\"type\": \"list\", \"items\": [...]}} with "
                             "constants and ranges")
        made = tuple(_parameter(f"{path}[{i}]", item, source) if isinstance(item, Mapping) and "type" in item
                     else item for i, item in enumerate(items))
        parameters = tuple(i for i in made if isinstance(i, Parameter))
        if not parameters:
            raise SpaceError(f"{source}: '{path}': the list has no range to search; use a fixed entry")
        return Entry(path, kind, items=made, parameters=parameters)
    parameter = _parameter(path, spec, source)
    return Entry(path, parameter.kind, parameters=(parameter,))


def parse_space(data: Any, source: str = "the space") -> SearchSpace:
    """A `SearchSpace` from its JSON data (not yet checked against a recipe)."""
    if not isinstance(data, Mapping) or not data:
        raise SpaceError(f"{source}: a search space is a non-empty JSON object of dotted recipe fields and ranges")
    space = SearchSpace(tuple(_entry(path, spec, source) for path, spec in data.items()), source, dict(data))
    if not space.parameters:
        raise SpaceError(f"{source}: nothing to search: every entry is fixed")
    return space


def load_space(path: str | Path, recipe: Recipe | None = None,
               also: Callable[[Recipe], None] | None = None) -> SearchSpace:
    """Read and check a space file (against ``recipe`` when given; see `SearchSpace.check`).

    Raises:
        SpaceError: naming the file, the entry and the fix.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpaceError(f"cannot read the search space {path}: {err}") from None
    space = parse_space(data, str(path))
    if recipe is not None:
        space.check(recipe, also)
    return space


def current_values(space: SearchSpace, recipe: dict[str, Any], defaults: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Each parameter's value in the recipe's JSON form (a component's other keys are its kwargs; ``defaults`` by
    dotted path fill what the recipe leaves to a preset), for the parameters whose value is known."""
    found: dict[str, Any] = {}
    for entry in space.entries:
        value = lookup(recipe, entry.path.split("."))
        if value is None:
            value = dict(defaults).get(entry.path)
        if entry.kind == "list" and isinstance(value, Sequence) and len(value) == len(entry.items):
            found.update({i.name: v for i, v in zip(entry.items, value) if isinstance(i, Parameter)})
        elif entry.parameters and entry.kind != "list" and value is not None:
            found[entry.parameters[0].name] = value
    return found
