"""Each host serves one torchtitan release: importing it with another installed stops at
once, naming both versions and how to get the right one."""

import importlib.metadata


class UnsupportedTorchtitanError(ImportError):
    pass


def require_torchtitan(supported: str, host: str, configs: str, install: str) -> None:
    """Raise unless torchtitan ``supported`` is installed; ``host`` is the host package,
    ``configs`` what its configs are, ``install`` how to get the release."""
    try:
        installed = importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != supported:
        found = f"torchtitan {installed} is installed" if installed else "torchtitan is missing"
        raise UnsupportedTorchtitanError(
            f"{host} is the host for torchtitan {supported} ({configs}), and {found}: "
            f"{install}; the other release has its own host in titan_objectives.hosts"
        )
