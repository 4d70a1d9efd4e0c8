"""The ``[objectives]`` section of a job config, and its validation, for every host.

The section has ``stack`` plus one sub-table per registered objective (built-in or from an
entry point), typed by that objective's options dataclass, so TOML tables
(``[objectives.nitp]``) and CLI flags (``--objectives.nitp.weight 0.8``) work the
torchtitan way. The section's class exists once the registry is read, so it is made on
first use (``Objectives``, ``JobConfig``: torchtitan 0.2.2 merges ``JobConfig`` from the
module its ``[job] custom_config_module`` names): importing this module discovers no
entry point. No ``from __future__ import annotations`` here: tyro needs real types.
"""

import dataclasses
import functools
import logging
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI
    import tomli as tomllib

from titan_objectives.objective import ModelInfo, Objective, ObjectiveOptions, OptionError
from titan_objectives.registry import (
    RESERVED_NAMES,
    RegistryError,
    broken_entry_points,
    get_objective,
    list_objectives,
)

logger = logging.getLogger(__name__)

SECTION = "objectives"
NonFinitePolicy = Literal["error", "skip", "off"]


class ObjectivesConfigError(ValueError):
    """A bad ``[objectives]`` setting. The message names the key, the value and what is allowed."""


@dataclass
class GeometryOptions:
    """Representation geometry of the hidden states during training and validation."""

    freq: int = 0
    """Every `freq` steps, log effective rank and average cosine (0 = off)."""

    layers: list[int] | None = None
    """Hidden states besides the final one (0 = embeddings, k = output of block k).
    Default: those the stacked objectives declare worth tracking (NITP: its target block)."""

    max_tokens: int = 2048
    """Tokens sampled per measurement, over all ranks, for effective_rank_sv and the
    cosines (at least the model width); effective_rank uses every token with a label."""

    pairs: int = 4096
    """Random token pairs (from different sequences) for the average cosine."""

    def resolved_layers(self, declared: frozenset[int]) -> list[int]:
        """``layers``, or the layers the objectives declare (``Requirements.geometry_layers``)."""
        return sorted(set(self.layers if self.layers is not None else declared))


@dataclass(frozen=True)
class StackEntry:
    """One stacked objective: its registered class and its checked options."""

    cls: type[Objective]
    options: ObjectiveOptions


@functools.cache
def objectives_section() -> type:
    """The ``[objectives]`` dataclass: the section's own keys and one field per
    registered objective (read from the registry on the first call)."""
    section_fields: list[tuple[str, Any, Any]] = [
        (
            "stack",
            Annotated[
                list[str],
                tyro.conf.arg(
                    help="Objectives to train, in order (TOML list; CLI: comma-separated)."
                ),
            ],
            field(default_factory=lambda: ["ntp"]),
        ),
        (
            "nonfinite",
            Annotated[
                NonFinitePolicy,
                tyro.conf.arg(
                    help="When an objective's loss is NaN or inf, the optimizer does not "
                    "apply that step; then 'error' stops training at the next logging step, "
                    "naming the objective and step, and 'skip' warns and goes on. 'off' does "
                    "not check."
                ),
            ],
            "error",
        ),
        ("geometry", GeometryOptions, field(default_factory=GeometryOptions)),
    ]
    for name, cls in list_objectives().items():
        section_fields.append((name, cls.Options, field(default_factory=cls.Options)))
    section = dataclasses.make_dataclass("Objectives", section_fields)
    section.__module__ = __name__
    section.__doc__ = "Loss objectives (titan-objectives). One sub-table per objective."
    return section


@functools.cache
def _job_config() -> type:
    objectives = objectives_section()
    job_config = dataclasses.make_dataclass(
        "JobConfig", [("objectives", objectives, field(default_factory=objectives))]
    )
    job_config.__module__ = __name__
    return job_config


def __getattr__(name: str) -> type:
    """``Objectives`` and ``JobConfig``, made on first use (see the module docstring)."""
    if name == "Objectives":
        return objectives_section()
    if name == "JobConfig":
        return _job_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    type(None): "None (leave the key out)",
}


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    return _TYPE_NAMES.get(expected, getattr(expected, "__name__", str(expected)))


def _is_literal(expected: Any) -> bool:
    """A ``Literal`` type, possibly ``Annotated``: a wrong value is a value, not a type."""
    if typing.get_origin(expected) is Annotated:
        return _is_literal(typing.get_args(expected)[0])
    return typing.get_origin(expected) is Literal


def _type_error(value: Any, expected: Any) -> str | None:
    """What ``expected`` allows, if a TOML ``value`` is not of that type (an integer is a
    number); None if it is."""
    origin = typing.get_origin(expected)
    if origin is Annotated:
        return _type_error(value, typing.get_args(expected)[0])
    if origin is Literal:
        ok = value in typing.get_args(expected) and not isinstance(value, bool)
        return None if ok else _type_name(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        errors = [_type_error(value, option) for option in options]
        return None if None in errors else " or ".join(_type_name(a) for a in options)
    if origin is list:
        item = typing.get_args(expected)[0]
        if not isinstance(value, list) or any(_type_error(v, item) for v in value):
            return f"a list of {_type_name(item)}"
        return None
    if expected is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _type_name(float)
        return None if math.isfinite(value) else "a finite number"
    if expected is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if expected in (bool, str, type(None)):
        return None if isinstance(value, expected) else _type_name(expected)
    return None


def _check_table(key: str, table: dict[str, Any], options_cls: type) -> None:
    """Keys and value types of a TOML sub-table (``key``) against an options dataclass:
    torchtitan builds dataclasses from TOML without checking either (CLI flags are typed
    by tyro)."""
    hints = typing.get_type_hints(options_cls, include_extras=True)
    allowed = [f.name for f in dataclasses.fields(options_cls)]
    for option, value in table.items():
        if option not in allowed:
            raise ObjectivesConfigError(
                f"unknown option {key}.{option}; allowed: {', '.join(allowed)}"
            )
        expected = _type_error(value, hints[option])
        if expected:
            wrong = "is not allowed" if _is_literal(hints[option]) else "has the wrong type"
            raise ObjectivesConfigError(f"{key}.{option} = {value!r} {wrong}; expected {expected}")


def _validated(name: str, options: Any, cls: type[Objective], model: ModelInfo) -> ObjectiveOptions:
    if not isinstance(options, cls.Options):
        raise ObjectivesConfigError(
            f"{SECTION}.{name} must be a table of {cls.Options.__name__} options, got {options!r}"
        )
    try:
        options.validate(model)
    except OptionError as error:
        raise ObjectivesConfigError(f"{SECTION}.{name}.{error}") from None
    return options


def resolve_stack(section: Any, model: ModelInfo) -> dict[str, StackEntry]:
    """Validate the section against a model; return each stacked objective's class and
    options, in stack order. Raises ``ObjectivesConfigError``; logs warnings for
    suspicious but legal settings."""
    stack = section.stack
    if not isinstance(stack, list) or not all(isinstance(n, str) for n in stack):
        raise ObjectivesConfigError(
            f"{SECTION}.stack = {stack!r} must be a list of objective names"
        )
    registered = list_objectives()
    if not stack:
        raise ObjectivesConfigError(
            f"{SECTION}.stack is empty; name at least one objective "
            f"(available: {', '.join(registered)})"
        )
    duplicates = sorted({n for n in stack if stack.count(n) > 1})
    if duplicates:
        raise ObjectivesConfigError(
            f"{SECTION}.stack = {stack!r} names {', '.join(duplicates)} more than once; "
            "each objective may appear once"
        )
    classes = {}
    for name in stack:
        try:
            classes[name] = get_objective(name)
        except RegistryError as error:
            raise ObjectivesConfigError(f"{SECTION}.stack: {error}") from None

    if section.nonfinite not in typing.get_args(NonFinitePolicy):
        raise ObjectivesConfigError(
            f"{SECTION}.nonfinite = {section.nonfinite!r} is not allowed; expected "
            + _type_name(NonFinitePolicy)
        )
    resolved = {
        name: StackEntry(cls, _validated(name, getattr(section, name), cls, model))
        for name, cls in classes.items()
    }
    check_geometry(section.geometry, model)

    for name, cls in registered.items():
        if name not in stack and getattr(section, name, None) != cls.Options():
            logger.warning(
                "[%s.%s] is set but %r is not in %s.stack = %r; its options are ignored",
                SECTION,
                name,
                name,
                SECTION,
                stack,
            )
    return resolved


def check_geometry(options: GeometryOptions, model: ModelInfo) -> None:
    key = f"{SECTION}.geometry"
    if options.freq < 0:
        raise ObjectivesConfigError(
            f"{key}.freq = {options.freq} is not allowed; expected 0 (off) or a number of steps"
        )
    for layer in options.layers or []:
        if not 0 <= layer <= model.n_layers:
            raise ObjectivesConfigError(
                f"{key}.layers: {layer} is not a hidden state of a model with {model.n_layers} "
                f"blocks; expected 0 (embeddings) .. {model.n_layers}"
            )
    if options.freq and options.max_tokens < model.dim:
        raise ObjectivesConfigError(
            f"{key}.max_tokens = {options.max_tokens} is too small to estimate a rank: the "
            f"model width is {model.dim}; expected at least {model.dim} tokens"
        )
    if options.pairs < 1:
        raise ObjectivesConfigError(f"{key}.pairs = {options.pairs} is not allowed; expected >= 1")


def check_objectives_table(toml: dict[str, Any]) -> None:
    """Keys and types of ``[objectives]`` and its sub-tables, with what is allowed.

    torchtitan would reject unknown keys too, but naming only a Python class."""
    table = toml.get(SECTION)
    if table is None:
        return
    if not isinstance(table, dict):
        raise ObjectivesConfigError(f"{SECTION} must be a table, got {table!r}")
    registered = list_objectives()
    broken = broken_entry_points()
    section_hints = typing.get_type_hints(objectives_section(), include_extras=True)
    for key, value in table.items():
        if key == "geometry" and isinstance(value, dict):
            _check_table(f"{SECTION}.geometry", value, GeometryOptions)
            continue
        if key in RESERVED_NAMES:
            expected = _type_error(value, section_hints[key])
            if expected and key != "stack":  # resolve_stack names a bad stack with its value
                raise ObjectivesConfigError(
                    f"{SECTION}.{key} = {value!r} is not allowed; expected {expected}"
                )
            continue
        if key in broken:
            raise ObjectivesConfigError(f"[{SECTION}.{key}]: {broken[key]}")
        if key not in registered:
            raise ObjectivesConfigError(
                f"unknown key {SECTION}.{key}; allowed: {', '.join(RESERVED_NAMES)}, "
                + ", ".join(f"[{SECTION}.{n}]" for n in registered)
            )
        if not isinstance(value, dict):
            raise ObjectivesConfigError(
                f"{SECTION}.{key} must be a table of options, got {value!r}"
            )
        _check_table(f"{SECTION}.{key}", value, registered[key].Options)


def objectives_from_table(table: dict[str, Any]) -> Any:
    """The ``[objectives]`` table of a TOML file as the section dataclass (the hosts
    without TOML job configs load it this way). Keys and types are checked here; values
    when the stack is resolved, with the same messages as on the TOML host."""
    check_objectives_table({SECTION: table})
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "geometry":
            values[key] = GeometryOptions(**value)
        elif isinstance(value, dict):
            values[key] = list_objectives()[key].Options(**value)
        else:
            values[key] = value
    return objectives_section()(**values)


def read_toml(path: str, flag: str) -> dict[str, Any]:
    """A TOML file named on the command line by ``flag``, or a config error naming both."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ObjectivesConfigError(f"{flag} {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ObjectivesConfigError(f"{flag} {path!r} is not valid TOML: {error}") from None


def exit_on_config_error(error: ObjectivesConfigError) -> None:
    print(f"titan-objectives: config error: {error}", file=sys.stderr)
    raise SystemExit(2)
