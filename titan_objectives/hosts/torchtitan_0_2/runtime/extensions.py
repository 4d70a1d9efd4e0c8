"""What this project adds to torchtitan's registries, for every entry point."""

from titan_objectives.hosts.common.corpus import DATASET_NAME, local_text_dataset
from titan_objectives.hosts.common.flags import spell_flags_as_named
from titan_objectives.hosts.torchtitan_0_2.runtime.flavors import register_flavors


def register_extensions() -> None:
    """Local-file datasets, research flavors, flags spelled as named. Idempotent."""
    import torchtitan.config.manager
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    spell_flags_as_named(torchtitan.config.manager)  # its tyro.cli writes --help
    DATASETS[DATASET_NAME] = DatasetConfig(**local_text_dataset())
    register_flavors()
