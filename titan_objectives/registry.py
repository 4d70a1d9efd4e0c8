"""Name -> objective class, for built-ins and for objectives in other packages.

Built-ins are listed in ``BUILTINS`` the way a plugin lists itself in its entry points
(``module:Class``), so that they never import the registry. Other packages declare an
entry point in the group ``titan_objectives``, or register from their own code with
``@register_objective("name")``. Both are discovered once, on first use. An entry point that
fails to load only breaks its own name: asking for it raises the load error, while every
other objective stays usable.
"""

import importlib
import importlib.metadata
import keyword
import logging

from titan_objectives.objective import Objective

ENTRY_POINT_GROUP = "titan_objectives"

# Name -> ``module:Class``, loaded with the entry points.
BUILTINS = {
    "mtp": "titan_objectives.objectives.mtp:MultiTokenPrediction",
    "nitp": "titan_objectives.objectives.nitp:NextImplicitTokenPrediction",
    "ntp": "titan_objectives.objectives.ntp:NextTokenPrediction",
    "top": "titan_objectives.objectives.top:TokenOrderPrediction",
}

logger = logging.getLogger(__name__)

_objectives: dict[str, type[Objective]] = {}
_sources: dict[str, str] = {}
_broken_entry_points: dict[str, str] = {}
_entry_points_loaded = False
_builtins_loaded = False


class RegistryError(ValueError):
    pass


# Keys of the [objectives] section itself.
RESERVED_NAMES = ("stack", "nonfinite", "geometry")


def _check_name(name: str) -> None:
    # The name becomes a TOML table, a dataclass field and a CLI flag segment.
    if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED_NAMES:
        raise RegistryError(
            f"objective name {name!r} must be a Python identifier other than "
            + ", ".join(repr(n) for n in RESERVED_NAMES)
        )


def add_objective(name: str, cls: type[Objective], source: str) -> None:
    """Register ``cls`` under ``name``; ``source`` says where it came from, for errors."""
    _check_name(name)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise RegistryError(
            f"objective {name!r} from {source} is {cls!r}, which is not a subclass of "
            "titan_objectives.Objective"
        )
    if name in _objectives:
        raise RegistryError(
            f"objective {name!r} is registered twice: by {_sources[name]} and by {source}"
        )
    cls.name = name
    _objectives[name] = cls
    _sources[name] = source


def register_objective(name: str):
    """Class decorator for objectives defined in importable modules."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        add_objective(name, cls, f"module {cls.__module__}")
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist else "unknown distribution"
        source = f"entry point {entry_point.value!r} of {dist}"
        try:
            cls = entry_point.load()
        except Exception as error:  # noqa: BLE001 - any import failure is reported, not fatal
            _broken_entry_points[entry_point.name] = (
                f"{source} failed to import: {type(error).__name__}: {error}"
            )
            logger.warning("titan_objectives: %s", _broken_entry_points[entry_point.name])
            continue
        try:
            add_objective(entry_point.name, cls, source)
        except RegistryError as error:
            _broken_entry_points.setdefault(entry_point.name, str(error))
            logger.warning("titan_objectives: %s", error)


def _load_builtins() -> None:
    """Once: a name another package registered first is an error naming both."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for name, target in BUILTINS.items():
        module, _, attribute = target.partition(":")
        add_objective(name, getattr(importlib.import_module(module), attribute), f"module {module}")


def _ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def get_objective(name: str) -> type[Objective]:
    _ensure_loaded()
    if name in _objectives:
        return _objectives[name]
    if name in _broken_entry_points:
        raise RegistryError(f"objective {name!r} is unavailable: {_broken_entry_points[name]}")
    raise RegistryError(
        f"unknown objective {name!r}; registered objectives: {', '.join(sorted(_objectives))}"
    )


def list_objectives() -> dict[str, type[Objective]]:
    """All usable objectives, by name."""
    _ensure_loaded()
    return dict(sorted(_objectives.items()))


def objective_source(name: str) -> str:
    _ensure_loaded()
    return _sources[name]


def broken_entry_points() -> dict[str, str]:
    """Entry points that could not be loaded, with the reason."""
    _ensure_loaded()
    return dict(_broken_entry_points)
