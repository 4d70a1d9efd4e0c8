"""What this project adds to torchtitan's registries, for every entry point."""

from titan_objectives.hosts.common.corpus import register_datasets
from titan_objectives.hosts.torchtitan_0_2.runtime.flavors import register_flavors


def register_extensions() -> None:
    """Local-file datasets and research flavors. Idempotent."""
    register_datasets()
    register_flavors()
