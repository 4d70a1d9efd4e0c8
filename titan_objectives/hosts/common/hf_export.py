"""``titan-objectives export``: a run's checkpoint as a folder Hugging Face ``transformers``
loads (``AutoModelForCausalLM`` / ``AutoTokenizer``), the same on every host.

The host says how to rebuild its model from the run record and hands over torchtitan's
own state-dict adapter and the ``config.json`` of the model's family; what is shared here:
finding the checkpoint, reading the plain model's tensors from it (never an objective's),
and writing the folder so that it is either complete or absent.
"""

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from titan_objectives.hosts.common.run_record import ExportError, RunRecord, read_record

EXPORT_RECORD = "titan_objectives_export.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
STEP_FOLDER = re.compile(r"step-(\d+)")

# Why a family transformers has a class for is still not exported (measured on the CPU).
NOT_REPRESENTABLE = {
    "deepseek_v3": "transformers' DeepseekV3 routes experts by sigmoid scores only (torchtitan's "
    "debugmodel, 16B and 236B flavors use softmax: logits 1.9e-2 apart on the debug flavor) "
    "and fixes its MLA norms' epsilon at 1e-6",
}


def check_exportable(record: RunRecord, host: str, families: list[str]) -> None:
    """The run was trained on this ``host``, and its model is one of the ``families``
    it has a ``config.json`` for."""
    if record.host != host:
        raise ExportError(
            f"the run was trained on {record.host}; export it in that host's environment "
            f"(this is {host})"
        )
    if record.model_name not in families:
        why = NOT_REPRESENTABLE.get(
            record.model_name, "no transformers class matching torchtitan's here"
        )
        raise ExportError(
            f"model {record.model_name!r} cannot be exported for Hugging Face transformers: "
            f"{why}; exportable models: {', '.join(families)}"
        )


def refuse_routing(model: str, transformers_class: str, settings: list[str]) -> None:
    """An error naming the run's routing ``settings`` (``name = value``) that
    transformers' class cannot reproduce, if there are any."""
    if settings:
        raise ExportError(
            f"model {model}: transformers' {transformers_class} cannot route as this run did "
            f"({', '.join(settings)})"
        )


def settings_of(prefix: str, owner: object, refused: dict[str, bool]) -> list[str]:
    """``prefix + name = value`` of each of ``owner``'s attributes ``refused`` marks."""
    return [f"{prefix}{name} = {getattr(owner, name)!r}" for name, bad in refused.items() if bad]


Shapes = dict[str, torch.Size]
Logits = Callable[[torch.Tensor], torch.Tensor]
StateConversion = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ExportableModel:
    """A host's model of one run, as the exporter needs it."""

    shapes: Shapes
    """The plain model's state-dict keys and shapes (what a checkpoint must hold)."""

    to_hf: StateConversion
    """torchtitan's state-dict adapter for this model (``StateDictAdapter.to_hf``)."""

    hf_config: Callable[[dict[str, int]], dict[str, Any]]
    """``config.json``, given the tokenizer's special-token ids."""

    logits_of: Callable[[dict[str, torch.Tensor]], Logits]
    """The torchtitan model with these tensors, on the CPU, as tokens (batch, seq) ->
    logits: what ``--verify`` compares transformers' model with."""

    hf_save_gap: str | None = None
    """Why torchtitan's own Hugging Face save (``last_save_in_hf``) of this model cannot
    be exported, if it cannot."""


def without_routing_bias(to_hf: StateConversion) -> StateConversion:
    """``to_hf`` for models whose transformers class routes experts without a bias: a run
    that learned one (MoE load balancing, ``expert_bias``) is refused, not exported wrong
    (torchtitan's adapters drop the buffer)."""

    def checked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        biased = [
            key
            for key, value in state.items()
            if "expert_bias" in key and value.device.type != "meta" and bool(value.any())
        ]
        if biased:
            raise ExportError(
                f"the checkpoint's experts were routed with a learned bias ({biased[0]}, from "
                "MoE load balancing: load_balance_coeff), which this model's transformers "
                "class has no place for; a run without that balancing exports"
            )
        return to_hf(state)

    return checked


def _complete(step: Path) -> bool:
    """DCP writes a checkpoint's ``.metadata`` last, torchtitan's HF save its
    safetensors; a folder with neither is still being written, or was cut short."""
    return (step / ".metadata").is_file() or bool(_hf_files(step))


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps with a complete checkpoint in ``folder``."""
    if not folder.is_dir():
        return []
    found = (STEP_FOLDER.fullmatch(p.name) for p in folder.iterdir() if _complete(p))
    return sorted(int(match.group(1)) for match in found if match)


def checkpoint_folder(run_dir: str | Path, record: RunRecord) -> Path:
    """The run's checkpoint folder (recorded relative to the run: a moved run works)."""
    return Path(run_dir) / record.checkpoint_folder


def step_folder(run_dir: str | Path, record: RunRecord, step: int | None) -> tuple[int, Path]:
    """The checkpoint to export: ``step``, or the last complete one."""
    folder = checkpoint_folder(run_dir, record)
    steps = checkpoint_steps(folder)
    if not steps:
        raise ExportError(
            f"the run has no complete checkpoint in {folder}: train with checkpoints on "
            "([checkpoint] enable = true, or --checkpoint.enable; the last step is always saved)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(
            f"--step {step}: the run has no checkpoint at that step; it has steps "
            f"{', '.join(map(str, steps))} (in {folder})"
        )
    return step, folder / f"step-{step}"


def _hf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def in_hf_format(step: Path) -> bool:
    """Whether torchtitan saved this step in Hugging Face format (``last_save_in_hf``)."""
    return bool(_hf_files(step))


def _dcp_state(folder: Path, shapes: Shapes) -> dict[str, torch.Tensor]:
    """The plain model's tensors from a DCP checkpoint (full or model-only), each in the
    dtype it was saved in; the objectives' modules and the optimizer are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    missing = [key for key in shapes if key not in saved]
    if missing:
        raise ExportError(
            f"checkpoint {folder} has no {missing[0]!r} ({len(missing)} model tensors "
            "missing): it was written for another model or flavor than the run record's"
        )
    state = {}
    for key, shape in shapes.items():
        meta = saved[key]
        if not isinstance(meta, TensorStorageMetadata) or tuple(meta.size) != tuple(shape):
            raise ExportError(
                f"checkpoint {folder}: {key!r} has shape {tuple(getattr(meta, 'size', ()))} "
                f"there and {tuple(shape)} in the run record's model"
            )
        state[key] = torch.empty(tuple(shape), dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader)
    return state


def _safetensors_state(folder: Path, expected_keys: set[str]) -> dict[str, torch.Tensor]:
    """A checkpoint torchtitan saved in Hugging Face format (``last_save_in_hf``)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _hf_files(folder):
        state.update(load_file(str(path)))
    if set(state) != expected_keys:
        extra = sorted(set(state) - expected_keys)[:3]
        missing = sorted(expected_keys - set(state))[:3]
        raise ExportError(
            f"checkpoint {folder} (Hugging Face format) does not hold this model's tensors: "
            f"unexpected {extra}, missing {missing}"
        )
    return state


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a Hugging Face tokenizer
    folder, from its ``tokenizer_config.json`` names and ``tokenizer.json`` ids."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    vocabulary_path = tokenizer_dir / "tokenizer.json"
    if not config_path.is_file() or not vocabulary_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    added = json.loads(vocabulary_path.read_text()).get("added_tokens", [])
    ids = {t["content"]: t["id"] for t in added}
    found = {}
    for role in ("bos", "eos", "pad"):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            found[f"{role}_token_id"] = ids[token]
    return found


def _tokenizer_files(tokenizer_dir: Path, named_by: str) -> tuple[Path, ...]:
    """The tokenizer files to copy from ``tokenizer_dir``, which ``named_by`` names."""
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model") for f in files):
        raise ExportError(
            f"{named_by} {str(tokenizer_dir)!r} has no tokenizer.json or tokenizer.model: "
            "name the folder that has them with `titan-objectives export RUN_DIR --out DIR "
            "--tokenizer TOKENIZER_DIR`, then score DIR"
        )
    return tuple(files)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(
            f"--out {str(out)!r} exists and is not an empty folder: name a new folder "
            "(an export is never written over anything)"
        )


def _write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a hidden folder beside ``out``, renamed to ``out`` once complete:
    an error leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def checkpoint_written(step: Path) -> float:
    """When the step's checkpoint was last written (a retrained run rewrites it)."""
    return max(p.stat().st_mtime for p in step.iterdir())


@dataclass(frozen=True)
class Export:
    """What ``export_run`` wrote, and the tensors it wrote (for ``--verify``)."""

    folder: Path
    step: int
    config: dict[str, Any]
    """What ``config.json`` holds."""
    model: ExportableModel
    model_state: dict[str, torch.Tensor] | None
    """The plain model's torchtitan tensors (None for a checkpoint in Hugging Face format)."""


@dataclass(frozen=True)
class ExportSource:
    """What an export reads, each part checked before any tensor is read."""

    record: RunRecord
    step: int
    checkpoint: Path
    """The step's checkpoint folder."""
    tokenizer_dir: Path
    tokenizer_files: tuple[Path, ...]
    model: ExportableModel


def export_source(
    run_dir: str | Path,
    exportable: Callable[[RunRecord], ExportableModel],
    step: int | None = None,
    tokenizer: str | Path | None = None,
) -> ExportSource:
    """Run ``run_dir``'s checkpoint at ``step`` (default: the last), its tokenizer and its
    model as the host exports it; an error names what is missing or not exportable."""
    record = read_record(run_dir)
    step, checkpoint = step_folder(run_dir, record, step)
    if not (tokenizer or record.tokenizer):
        raise ExportError(
            "the run names no tokenizer (model.hf_assets_path): pass --tokenizer TOKENIZER_DIR"
        )
    tokenizer_dir = Path(tokenizer or record.tokenizer)
    named_by = "--tokenizer" if tokenizer else "the run's tokenizer folder (moved since training?)"
    files = _tokenizer_files(tokenizer_dir, named_by)
    model = exportable(record)
    model.hf_config({})  # what config.json cannot say is refused here, before any tensor
    if model.hf_save_gap and in_hf_format(checkpoint):
        raise ExportError(
            f"{checkpoint} was saved in Hugging Face format (last_save_in_hf), which cannot "
            f"be exported for model {record.model_name}: {model.hf_save_gap}; export a DCP "
            "checkpoint of the run (--step N)"
        )
    return ExportSource(record, step, checkpoint, tokenizer_dir, files, model)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    exportable: Callable[[RunRecord], ExportableModel],
    step: int | None = None,
    tokenizer: str | Path | None = None,
) -> Export:
    """Write run ``run_dir``'s checkpoint (``step``, default the last) to ``out`` in the
    Hugging Face layout: ``model.safetensors``, ``config.json``, the tokenizer files and
    ``titan_objectives_export.json`` (where it came from)."""
    out = Path(out)
    _check_out(out)
    source = export_source(run_dir, exportable, step, tokenizer)
    record, step, folder, model = source.record, source.step, source.checkpoint, source.model

    expected_hf = model.to_hf({k: torch.empty(s, device="meta") for k, s in model.shapes.items()})
    model_state = None
    if in_hf_format(folder):
        hf_state = _safetensors_state(folder, set(expected_hf))
    else:
        model_state = _dcp_state(folder, model.shapes)
        hf_state = model.to_hf(model_state)
    config = model.hf_config(special_token_ids(source.tokenizer_dir))
    if config.get("tie_word_embeddings"):
        hf_state.pop("lm_head.weight", None)  # transformers ties it to the embedding
    dtypes = {t.dtype for t in hf_state.values()}
    config["dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix(
        "torch."
    )

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in hf_state.items()}
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in source.tokenizer_files:
            shutil.copyfile(path, staging / path.name)
        provenance = {
            "run_dir": str(Path(run_dir).resolve()),
            "checkpoint": str(folder.resolve()),
            "step": step,
            "model": record.model_name,
            "flavor": record.flavor,
            "host": record.host,
            "objectives_trained": record.stack,
            "checkpoint_written": checkpoint_written(folder),
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(provenance, indent=2) + "\n")

    _write_folder(out, write)
    return Export(out, step, config, model, model_state)


@dataclass(frozen=True)
class LogitsAgreement:
    tokens: int
    max_abs_difference: float
    kl_divergence: float
    """Mean over positions of KL(torchtitan || transformers), in nats."""

    def __str__(self) -> str:
        return (
            f"transformers' logits vs torchtitan's on {self.tokens} tokens (fp32): largest "
            f"difference {self.max_abs_difference:.2e}, KL divergence {self.kl_divergence:.2e}"
        )


def logits_agreement(
    hf_folder: str | Path, torchtitan_logits: Logits, tokens: torch.Tensor
) -> LogitsAgreement:
    """Both models' logits on ``tokens`` (batch, seq) on the CPU, the exported model in fp32."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ExportError(
            "--verify loads the export with transformers: install the eval extra "
            "(EVAL=1 ./scripts/setup.sh)"
        ) from None

    hf_model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    hf_model.eval()
    with torch.no_grad():
        ours = torchtitan_logits(tokens).double()
        theirs = hf_model(tokens).logits.double()
    log_p, log_q = ours.log_softmax(-1), theirs.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return LogitsAgreement(
        tokens.numel(), (ours - theirs).abs().max().item(), kl.clamp_min(0).item()
    )
