"""A run's dump folder or an export, as the exported model folder lm-eval reads."""

import json
import shutil
from pathlib import Path

import torch

from titan_objectives.hosts import installed_host_cli
from titan_objectives.hosts.common.hf_export import (
    EXPORT_RECORD,
    Export,
    LogitsAgreement,
    checkpoint_written,
    export_run,
    export_source,
    in_hf_format,
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
    return export_run(run_dir, out, installed_host_cli().exportable, step, tokenizer)


def verify(made: Export) -> LogitsAgreement:
    """The exported model's logits against the torchtitan model's, on random tokens."""
    batch, length = VERIFY_TOKENS
    length = min(length, made.config["max_position_embeddings"])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, made.config["vocab_size"], (batch, length), generator=generator)
    return logits_agreement(made.folder, made.model.logits_of(made.model_state), tokens)


def check_verifiable(run_dir: Path, step: int | None) -> None:
    """``--verify`` builds the torchtitan model from a DCP checkpoint: say so before
    exporting when the step was saved in Hugging Face format."""
    _, folder = step_folder(run_dir, read_record(run_dir), step)
    if in_hf_format(folder):
        raise ExportError(
            f"--verify compares with the torchtitan model of a DCP checkpoint; {folder} was "
            "saved in Hugging Face format (last_save_in_hf): export it without --verify"
        )


def run_export(directory: Path, step: int | None = None) -> tuple[Path, bool]:
    """Where a run's export at ``step`` (default: the last checkpoint) goes,
    ``RUN/hf/step-N``, and whether it holds that checkpoint as last written (a retrained
    run rewrites it). A folder there that no export wrote is an error."""
    step, checkpoint = step_folder(directory, read_record(directory), step)
    folder = directory / "hf" / f"step-{step}"
    made = folder / EXPORT_RECORD
    if made.is_file():
        written = json.loads(made.read_text()).get("checkpoint_written")
        return folder, written == checkpoint_written(checkpoint)
    if folder.exists():
        raise ExportError(
            f"run {str(directory)!r}: {folder} exists but is no export of this run (no "
            f"{EXPORT_RECORD}); the run's export goes there: move that folder away"
        )
    return folder, False


def check_exports(run_dir: Path, step: int | None = None) -> None:
    """Everything exporting a run checks before reading a tensor, unless its current
    export is there already (``compare`` checks every run first)."""
    _, current = run_export(run_dir, step)
    if not current:
        export_source(run_dir, installed_host_cli().exportable, step)


def model_folder(directory: Path, step: int | None = None) -> Path:
    """``directory`` itself when it is an export; for a run's dump folder, its current
    export (``run_export``), made first if needed."""
    if not (directory / RECORD_NAME).is_file():
        if step is not None:
            raise ExportError(f"--step {step} applies to a run's dump folder, not to an export")
        return directory
    folder, current = run_export(directory, step)
    if not current:
        shutil.rmtree(folder, ignore_errors=True)  # an export of an older checkpoint
        export(directory, folder, step)
    return folder


def results_folder(directory: Path) -> Path:
    """Where ``evaluate`` writes by default: ``RUN/eval`` of the run ``directory`` is, or
    that an export came from (if it is still there), else ``directory/eval``."""
    if not (directory / RECORD_NAME).is_file() and (directory / EXPORT_RECORD).is_file():
        run_dir = Path(json.loads((directory / EXPORT_RECORD).read_text())["run_dir"])
        if (run_dir / RECORD_NAME).is_file():
            return run_dir / "eval"
    return directory / "eval"
