"""One subpackage per torchtitan release the objectives train under (``torchtitan_0_2``,
``torchtitan_0_3``), and what they share (``common``, which imports no torchtitan)."""

import importlib
import importlib.metadata
from types import ModuleType


def installed_host() -> str:
    """The host package for the installed torchtitan. Without torchtitan, the 0.2.2 host
    (the default), which says how to install it."""
    try:
        on_0_3 = importlib.metadata.version("torchtitan").startswith("0.3.")
    except importlib.metadata.PackageNotFoundError:
        on_0_3 = False
    return f"{__name__}.torchtitan_0_3" if on_0_3 else f"{__name__}.torchtitan_0_2"


def installed_host_cli() -> ModuleType:
    """The installed torchtitan's host's ``cli`` module (what the commands call)."""
    return importlib.import_module(f"{installed_host()}.cli")
