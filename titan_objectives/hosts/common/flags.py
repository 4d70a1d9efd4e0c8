"""Flags spelled as the config fields are named: ``--objectives.hidden_rms.target_rms``
in ``--help``, as the objective is registered and as torchtitan's docs write its own flags
(tyro writes ``--objectives.hidden-rms.target-rms`` by default). Parsing is unchanged:
tyro accepts both spellings either way."""

import functools
import types
from typing import Any


class _UnderscoreTyro(types.ModuleType):
    """``tyro`` as a host's config manager uses it, with ``cli(..., use_underscores=True)``."""

    def __init__(self, tyro: types.ModuleType):
        super().__init__(tyro.__name__)
        self._tyro = tyro
        self.cli = functools.partial(tyro.cli, use_underscores=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tyro, name)


def spell_flags_as_named(config_manager_module: types.ModuleType) -> None:
    """Make the module's ``tyro.cli`` calls spell flags with underscores. Idempotent."""
    tyro = config_manager_module.tyro
    if not isinstance(tyro, _UnderscoreTyro):
        config_manager_module.tyro = _UnderscoreTyro(tyro)
