"""What a run was trained as, written into its dump folder at the start of training, so
that ``titan-objectives export RUN_DIR`` can rebuild the model and find its checkpoints and
tokenizer without the config that launched it."""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

RECORD_NAME = "titan_objectives_run.json"


class ExportError(ValueError):
    """A bad argument to ``export`` or ``evaluate``; the message names it and what is allowed."""


@dataclass(frozen=True)
class RunRecord:
    host: str
    """The host package that trained the run (``torchtitan_0_2`` / ``torchtitan_0_3``)."""

    model_name: str
    """torchtitan's model name (``llama3``, ``qwen3``, ``deepseek_v3``)."""

    flavor: str
    """torchtitan's flavor of the model (``debugmodel``): the base its arguments overlay."""

    model_args: dict[str, Any]
    """The model's arguments as trained (after torchtitan filled them from the config)."""

    tokenizer: str
    """Absolute path of the tokenizer folder (``hf_assets_path``)."""

    checkpoint_folder: str
    """The run's checkpoint folder (``step-N`` folders in it), relative to the run's dump
    folder as torchtitan joins them (absolute if configured so)."""

    stack: list[str]
    """The objectives trained; none of their modules is part of an export."""


def as_record(value: Any) -> Any:
    """A model's argument dataclass as JSON values (nested dataclasses as objects)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_record(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [as_record(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_record(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _overlaid(current: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        return overlay(current, value)
    if isinstance(value, dict):
        return current  # a mapping of callables, or an object recorded as its fields
    if isinstance(current, (list, tuple)) and isinstance(value, list):
        if current and all(dataclasses.is_dataclass(c) for c in current):
            # Blocks past the base's last one (a run with more layers) are made like it.
            value = [_overlaid(current[min(i, len(current) - 1)], v) for i, v in enumerate(value)]
        return type(current)(value)
    if current is None or isinstance(current, (bool, int, float, str)):
        return value
    return current  # recorded as its repr: the base's value stands


def overlay(base: Any, recorded: dict[str, Any]) -> Any:
    """``base`` (a dataclass, e.g. a flavor's model arguments) with the values ``recorded``
    holds (``as_record`` of the arguments a run trained with): nested dataclasses and lists
    of them field by field; values recorded as ``repr`` strings keep their base value."""
    changes = {
        field.name: _overlaid(getattr(base, field.name), recorded[field.name])
        for field in dataclasses.fields(base)
        if field.name in recorded and field.init
    }
    return dataclasses.replace(base, **changes)


def write_record(dump_folder: str | Path, record: RunRecord) -> None:
    """Rank 0 writes the record (atomically: a reader never sees half of it), also
    before torchtitan has made the process group."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank != 0:
        return
    folder = Path(dump_folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RECORD_NAME}.{os.getpid()}"
    partial.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    partial.replace(folder / RECORD_NAME)


def read_record(run_dir: str | Path) -> RunRecord:
    path = Path(run_dir) / RECORD_NAME
    if not Path(run_dir).is_dir():
        raise ExportError(f"RUN_DIR {str(run_dir)!r} is not a folder")
    if not path.is_file():
        raise ExportError(
            f"RUN_DIR {str(run_dir)!r} has no {RECORD_NAME}: it is not the dump folder of a "
            "titan-objectives training (each training writes that file at its start; "
            "RUN_DIR is the job's dump_folder)"
        )
    fields = json.loads(path.read_text())
    return RunRecord(**{f.name: fields[f.name] for f in dataclasses.fields(RunRecord)})
