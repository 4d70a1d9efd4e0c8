"""The bundled and local text corpora (``hosts.common.corpus``) in torchtitan 0.3.0's
dataset registry: ``--dataloader.dataset local_text --dataloader.dataset_path PATH``."""

from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from titan_objectives.hosts.common.corpus import (
    DATASET_NAME,
    DEFAULT_TRAIN_PATH,
    load_local_text,
    text_of,
)


def register_datasets() -> None:
    DATASETS[DATASET_NAME] = DatasetConfig(
        path=str(DEFAULT_TRAIN_PATH), loader=load_local_text, sample_processor=text_of
    )
