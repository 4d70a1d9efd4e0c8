"""Writes docs/objectives.md, the TOML reference of the built-in objectives, from their
options dataclasses: ``python scripts/gen_objectives_doc.py``."""

from pathlib import Path

from titan_objectives.options_doc import render_markdown
from titan_objectives.registry import list_objectives, objective_source

DOC = Path(__file__).resolve().parents[1] / "docs" / "objectives.md"


def builtin_reference() -> str:
    builtins = {
        name: cls
        for name, cls in list_objectives().items()
        if objective_source(name).startswith("module titan_objectives.")
    }
    return render_markdown(builtins)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(builtin_reference())
    print(f"wrote {DOC}")
