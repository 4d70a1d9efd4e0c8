"""The ``[objectives]`` section of a torchtitan job config, and its validation.

torchtitan merges ``JobConfig`` from the module named by ``[job] custom_config_module``
into its own. The section has ``stack`` plus one sub-table per registered objective
(built-in or from an entry point), typed by that objective's options dataclass, so TOML
tables (``[objectives.nitp]``) and CLI flags (``--objectives.nitp.weight 0.8``) work the
torchtitan way. No ``from __future__ import annotations`` here: tyro needs real types.
"""

import dataclasses
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

from titan_objectives.objective import ModelInfo, ObjectiveOptions, OptionError
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


def _build_section() -> type:
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


Objectives = _build_section()


@dataclass
class JobConfig:
    objectives: Objectives = field(default_factory=Objectives)  # type: ignore[valid-type]


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


def _coerce(value: Any, expected: Any) -> Any:
    """Return ``value`` as ``expected`` (an int is a valid float), or raise TypeError."""
    origin = typing.get_origin(expected)
    if origin is Annotated:
        return _coerce(value, typing.get_args(expected)[0])
    if origin is Literal:
        if value in typing.get_args(expected) and not isinstance(value, bool):
            return value
        raise TypeError(_type_name(expected))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError(" or ".join(_type_name(a) for a in typing.get_args(expected)))
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"a list of {_type_name(typing.get_args(expected)[0])}")
        return [_coerce(item, typing.get_args(expected)[0]) for item in value]
    if expected is type(None):
        if value is None:
            return None
        raise TypeError(_type_name(expected))
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise TypeError("a finite number")
            return float(value)
        raise TypeError(_type_name(float))
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(_type_name(int))
    if expected in (bool, str):
        if isinstance(value, expected):
            return value
        raise TypeError(_type_name(expected))
    return value


def _checked_options(name: str, options: Any, model: ModelInfo) -> ObjectiveOptions:
    cls = get_objective(name).Options
    if not isinstance(options, cls):
        raise ObjectivesConfigError(
            f"{SECTION}.{name} must be a table of {cls.__name__} options, got {options!r}"
        )
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for option in dataclasses.fields(cls):
        value = getattr(options, option.name)
        try:
            values[option.name] = _coerce(value, hints[option.name])
        except TypeError as error:
            raise ObjectivesConfigError(
                f"{SECTION}.{name}.{option.name} = {value!r} has the wrong type; expected {error}"
            ) from None
    checked = cls(**values)
    try:
        checked.validate(model)
    except OptionError as error:
        raise ObjectivesConfigError(f"{SECTION}.{name}.{error}") from None
    return checked


def resolve_stack(section: Any, model: ModelInfo) -> dict[str, ObjectiveOptions]:
    """Validate the section against a model; return each stacked objective's options in
    stack order. Raises ``ObjectivesConfigError``; logs warnings for suspicious but legal
    settings."""
    stack = section.stack
    if not isinstance(stack, list) or not all(isinstance(n, str) for n in stack):
        raise ObjectivesConfigError(
            f"{SECTION}.stack = {stack!r} must be a list of objective names"
        )
    available = ", ".join(list_objectives())
    if not stack:
        raise ObjectivesConfigError(
            f"{SECTION}.stack is empty; name at least one objective (available: {available})"
        )
    duplicates = sorted({n for n in stack if stack.count(n) > 1})
    if duplicates:
        raise ObjectivesConfigError(
            f"{SECTION}.stack = {stack!r} names {', '.join(duplicates)} more than once; "
            "each objective may appear once"
        )
    for name in stack:
        try:
            get_objective(name)
        except RegistryError as error:
            raise ObjectivesConfigError(f"{SECTION}.stack: {error}") from None

    if section.nonfinite not in typing.get_args(NonFinitePolicy):
        raise ObjectivesConfigError(
            f"{SECTION}.nonfinite = {section.nonfinite!r} is not allowed; expected "
            + _type_name(NonFinitePolicy)
        )
    resolved = {name: _checked_options(name, getattr(section, name), model) for name in stack}
    check_geometry(section.geometry, model)

    for name, cls in list_objectives().items():
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


def check_geometry(options: Any, model: ModelInfo) -> None:
    key = f"{SECTION}.geometry"
    hints = typing.get_type_hints(GeometryOptions)
    for option in dataclasses.fields(GeometryOptions):
        value = getattr(options, option.name)
        try:
            _coerce(value, hints[option.name])
        except TypeError as error:
            raise ObjectivesConfigError(
                f"{key}.{option.name} = {value!r} has the wrong type; expected {error}"
            ) from None
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
    """Unknown keys in ``[objectives]`` and its sub-tables, with what is allowed.

    torchtitan would reject them too, but naming only a Python class."""
    table = toml.get(SECTION)
    if table is None:
        return
    if not isinstance(table, dict):
        raise ObjectivesConfigError(f"{SECTION} must be a table, got {table!r}")
    registered = list_objectives()
    broken = broken_entry_points()
    for key, value in table.items():
        if key == "geometry" and isinstance(value, dict):
            allowed = [f.name for f in dataclasses.fields(GeometryOptions)]
            for option in value:
                if option not in allowed:
                    raise ObjectivesConfigError(
                        f"unknown option {SECTION}.geometry.{option}; allowed: {', '.join(allowed)}"
                    )
            continue
        if key in RESERVED_NAMES:
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
        allowed = [f.name for f in dataclasses.fields(registered[key].Options)]
        for option in value:
            if option not in allowed:
                raise ObjectivesConfigError(
                    f"unknown option {SECTION}.{key}.{option}; allowed: {', '.join(allowed)}"
                )


def objectives_from_table(table: dict[str, Any]) -> Any:
    """The ``[objectives]`` table of a TOML file as the section dataclass (the hosts
    without TOML job configs load it this way). Keys are checked here; types and values
    when the stack is resolved, with the same messages as on the TOML host."""
    check_objectives_table({SECTION: table})
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "geometry":
            values[key] = GeometryOptions(**value)
        elif isinstance(value, dict):
            values[key] = get_objective(key).Options(**value)
        else:
            values[key] = value
    return Objectives(**values)


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
