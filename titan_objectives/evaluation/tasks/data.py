"""The bundled tasks' documents for lm-eval (``custom_dataset`` in their YAML files): read
from the JSON Lines files beside this one, so the tasks need no dataset hub."""

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

HERE = Path(__file__).resolve().parent


def _split(name: str) -> DatasetDict:
    records = [json.loads(line) for line in (HERE / name).read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(records)})


def cloze(**metadata: Any) -> DatasetDict:
    return _split("cloze.jsonl")


def perplexity(**metadata: Any) -> DatasetDict:
    return _split("perplexity.jsonl")
