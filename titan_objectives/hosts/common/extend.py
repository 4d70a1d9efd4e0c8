"""Giving a live torchtitan object a mixin, where torchtitan builds it with no builder to
extend: the one way a host changes an object torchtitan made (each host's seams module
lists where, and why)."""

import functools
from typing import Any


@functools.cache
def _extended_class(cls: type, mixin: type) -> type:
    return type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})


def extend(instance: Any, mixin: type) -> None:
    """Make ``instance`` an instance of a subclass of its class with ``mixin`` first in
    the method order (its methods call the original ones through ``super()``)."""
    if not isinstance(instance, mixin):
        instance.__class__ = _extended_class(type(instance), mixin)
