"""The bundled lm-eval tasks' documents, made from held-out text no bundled job trains
on (``assets/tiny/val.txt``, Lewis Carroll's *A Tangled Tale*; the main job trains on the
Alice books). Smoke-scale: they show that a model and the pipeline work, not how good a
model is. ``python -m titan_objectives.evaluation.task_data`` rewrites the files."""

import json
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "assets" / "tiny" / "val.txt"
TASKS = Path(__file__).resolve().parent / "tasks"
CLOZE_WORDS = (25, 150)
"""A cloze passage's length in words (LAMBADA's passages are about 80)."""
DOCUMENT_WORDS = 300
"""A perplexity document is whole paragraphs, cut once it reaches this many words."""
TARGET = re.compile(r"[A-Za-z]{3,}")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (tables of contents, headings and sums left out), each
    on one line."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [
        p
        for p in paragraphs
        if len(p.split()) >= 8 and sum(c.isalpha() for c in p) > 0.7 * len(p) and not p.isupper()
    ]


def cloze_items(paragraphs: list[str]) -> list[dict[str, str]]:
    """LAMBADA-style items: a passage without its last word, and that word to predict."""
    items = []
    for paragraph in paragraphs:
        words = paragraph.split()
        if not CLOZE_WORDS[0] <= len(words) <= CLOZE_WORDS[1]:
            continue
        target = words[-1].rstrip(".,;:!?\"'-)_")
        if TARGET.fullmatch(target):
            items.append({"context": " ".join(words[:-1]), "target": target})
    return items


def perplexity_documents(paragraphs: list[str]) -> list[dict[str, str]]:
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p.split()) for p in current) >= DOCUMENT_WORDS:
            documents.append({"text": "\n\n".join(current)})
            current = []
    return documents


def task_documents(text: str) -> dict[str, list[dict[str, str]]]:
    """File name -> records, for every bundled task."""
    paragraphs = prose_paragraphs(text)
    return {
        "cloze.jsonl": cloze_items(paragraphs),
        "perplexity.jsonl": perplexity_documents(paragraphs),
    }


def jsonl(records: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    for name, records in task_documents(SOURCE.read_text()).items():
        (TASKS / name).write_text(jsonl(records))
        print(f"{TASKS / name}: {len(records)} records")


if __name__ == "__main__":
    main()
