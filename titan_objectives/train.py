"""``python -m titan_objectives.train ...``: training on the installed torchtitan.

torchtitan 0.2.2 (TOML job configs): ``--job.config_file CONFIG.toml [--section.key v]``.
torchtitan 0.3.0 (Python configs): ``--module M --config FN [--section.key v]``.
Each host's ``launch.main`` switches the CPU runtime on first, where there is no CUDA.
"""

import importlib
from typing import Any

from titan_objectives.hosts import installed_host


def main(argv: list[str] | None = None, **kwargs: Any) -> None:
    """Train with the host for the installed torchtitan (``kwargs`` go to its ``main``:
    ``trainer_class`` on 0.2.2)."""
    importlib.import_module(f"{installed_host()}.launch").main(argv, **kwargs)


if __name__ == "__main__":
    main()
