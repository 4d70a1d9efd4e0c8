"""A run's dump folder or an export, as the exported model folder lm-eval reads."""

import importlib
from pathlib import Path

import torch

from titan_objectives.evaluation.harness import check_export_folder
from titan_objectives.hosts import installed_host
from titan_objectives.hosts.common.hf_export import (
    Export,
    LogitsAgreement,
    export_run,
    logits_agreement,
    step_folder,
)
from titan_objectives.hosts.common.run_record import RECORD_NAME, ExportError, read_record

VERIFY_TOKENS = (2, 64)
"""--verify compares the logits of this many sequences of this many tokens (at most the
model's context)."""


def export(
    run_dir: Path, out: Path, step: int | None = None, tokenizer: Path | None = None
) -> Export:
    """``export_run`` with the installed torchtitan's host."""
    host = importlib.import_module(f"{installed_host()}.cli")
    return export_run(run_dir, out, host.exportable, step, tokenizer)


def verify(export: Export) -> LogitsAgreement:
    """The exported model's logits against the torchtitan model's, on random tokens."""
    if export.model_state is None:
        raise ExportError(
            "--verify compares with the torchtitan model of a DCP checkpoint; this step was "
            "saved in Hugging Face format (last_save_in_hf), which is exported as it is"
        )
    config = export.config
    batch, length = VERIFY_TOKENS
    length = min(length, config["max_position_embeddings"])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)
    return logits_agreement(export.folder, export.model.logits_of(export.model_state), tokens)


def model_folder(directory: Path, step: int | None = None) -> Path:
    """``directory`` itself when it is an export; for a run's dump folder, its export at
    ``step`` (default: the last checkpoint), written once to ``RUN/hf/step-N``."""
    if not (directory / RECORD_NAME).is_file():
        if step is not None:
            raise ExportError(f"--step {step} applies to a run's dump folder, not to an export")
        check_export_folder(directory)
        return directory
    step, _ = step_folder(read_record(directory), step)
    folder = directory / "hf" / f"step-{step}"
    if not folder.exists():
        export(directory, folder, step)
    return folder
