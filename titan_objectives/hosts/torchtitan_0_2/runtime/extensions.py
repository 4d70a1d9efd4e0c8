"""What this project adds to torchtitan's registries, for every entry point."""

from titan_objectives.hosts.common.corpus import DATASET_NAME, local_text_dataset
from titan_objectives.hosts.torchtitan_0_2.runtime.flavors import register_flavors


def register_extensions() -> None:
    """Local-file datasets and research flavors. Idempotent."""
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS[DATASET_NAME] = DatasetConfig(**local_text_dataset())
    register_flavors()
