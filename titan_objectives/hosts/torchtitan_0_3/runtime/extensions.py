"""What this project adds to torchtitan 0.3's registries, for every entry point."""

from titan_objectives.hosts.common.corpus import DATASET_NAME, local_text_dataset


def register_extensions() -> None:
    """Local-file datasets. Idempotent."""
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS[DATASET_NAME] = DatasetConfig(**local_text_dataset())
