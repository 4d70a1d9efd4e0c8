"""``python -m titan_objectives.train ...``: training on the installed torchtitan.

torchtitan 0.2.2 (TOML job configs): ``--job.config_file CONFIG.toml [--section.key v]``.
torchtitan 0.3.0 (Python configs): ``--module M --config FN [--section.key v]``.
Each host's ``launch.main`` switches the CPU runtime on first, where there is no CUDA.
"""

import importlib.metadata
from typing import Any


def main(argv: list[str] | None = None, **kwargs: Any) -> None:
    """Train with the host for the installed torchtitan (``kwargs`` go to its ``main``:
    ``trainer_class`` on 0.2.2). Without torchtitan, the 0.2.2 host says how to install."""
    try:
        on_0_3 = importlib.metadata.version("torchtitan").startswith("0.3.")
    except importlib.metadata.PackageNotFoundError:
        on_0_3 = False
    if on_0_3:
        from titan_objectives.hosts.torchtitan_0_3.launch import main as host_main
    else:
        from titan_objectives.hosts.torchtitan_0_2.launch import main as host_main
    host_main(argv, **kwargs)


if __name__ == "__main__":
    main()
