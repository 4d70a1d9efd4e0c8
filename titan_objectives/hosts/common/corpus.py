"""Local text corpora for torchtitan's dataset registry (``local_text_dataset``; each
host's ``register_extensions`` adds it, the same registry in torchtitan 0.2.2 and 0.3.0).

``--training.dataset local_text --training.dataset_path PATH`` (0.2.2; on 0.3:
``--dataloader.dataset`` / ``--dataloader.dataset_path``) reads a ``.txt`` file
(cut into chunks of whole paragraphs), a ``.jsonl`` / ``.jsonl.gz`` file of
``{"text": ...}`` records (streamed, the layout of torchtitan's c4), or a directory of
such files. The default path is the bundled Alice books, so a debug run needs no download.
"""

from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset, load_dataset

DATASET_NAME = "local_text"
ASSETS = Path(__file__).resolve().parents[3] / "assets"
DEFAULT_TRAIN_PATH = ASSETS / "tiny" / "train.txt"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
CHUNK_CHARS = 4096


def corpus_files(path: str | Path) -> list[Path]:
    """The files a dataset path stands for, or a FileNotFoundError that says why."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES))
        if not files:
            raise FileNotFoundError(
                f"dataset path {str(path)!r} has no .txt, .jsonl or .jsonl.gz files"
            )
    elif path.is_file():
        if not path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise FileNotFoundError(
                f"dataset path {str(path)!r} must end in .txt, .jsonl or .jsonl.gz"
            )
        files = [path]
    else:
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
    kinds = {f.name.endswith(TEXT_SUFFIXES) for f in files}
    if len(kinds) > 1:
        raise FileNotFoundError(
            f"dataset path {str(path)!r} mixes .txt and .jsonl files; use one kind"
        )
    return files


def paragraph_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text into chunks of about ``chunk_chars``, only at blank lines."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= chunk_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def load_local_text(path: str) -> Dataset | IterableDataset:
    files = corpus_files(path)
    if files[0].name.endswith(TEXT_SUFFIXES):
        chunks = [c for f in files for c in paragraph_chunks(f.read_text(encoding="utf-8"))]
        return Dataset.from_dict({"text": chunks})
    return load_dataset("json", data_files=[str(f) for f in files], split="train", streaming=True)


def text_of(sample: dict[str, Any]) -> str:
    return sample["text"]


def local_text_dataset() -> dict[str, Any]:
    """``local_text``'s entry in torchtitan's dataset registry: the keyword arguments of
    its ``DatasetConfig`` (the same in both releases; each host registers it)."""
    return {"path": str(DEFAULT_TRAIN_PATH), "loader": load_local_text, "sample_processor": text_of}
