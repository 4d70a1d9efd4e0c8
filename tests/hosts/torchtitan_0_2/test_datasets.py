import gzip
import json

import pytest
from torchtitan.hf_datasets.text_datasets import DATASETS

from titan_objectives.hosts.common.corpus import (
    DEFAULT_TRAIN_PATH,
    corpus_files,
    load_local_text,
    paragraph_chunks,
)
from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions


def test_paragraph_chunks_cut_only_at_blank_lines():
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(20))
    chunks = paragraph_chunks(text, chunk_chars=200)
    assert "\n\n".join(chunks) == text
    assert all(len(c) >= 200 for c in chunks[:-1])


def test_bundled_alice_loads():
    dataset = load_local_text(str(DEFAULT_TRAIN_PATH))
    assert len(dataset) > 50
    assert "Alice" in dataset[0]["text"]


def test_jsonl_gz_streams(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(3):
            f.write(json.dumps({"text": f"document {i}"}) + "\n")
    assert [s["text"] for s in load_local_text(str(path))] == [f"document {i}" for i in range(3)]
    assert corpus_files(tmp_path) == [path]


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.txt", "does not exist"), ("data.csv", "must end in .txt, .jsonl or .jsonl.gz")],
)
def test_bad_paths_are_explained(tmp_path, name, message):
    if name.endswith(".csv"):
        (tmp_path / name).write_text("a,b")
    with pytest.raises(FileNotFoundError, match=message):
        corpus_files(tmp_path / name)


def test_registered_in_torchtitan():
    register_extensions()
    assert DATASETS["local_text"].path == str(DEFAULT_TRAIN_PATH)
