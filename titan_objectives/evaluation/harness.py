"""lm-evaluation-harness on an exported model (``titan-objectives evaluate``): lm-eval's
Hugging Face backend, the bundled local tasks or lm-eval's own, and lm-eval's results file.

Task names are checked before any model is loaded (lm-eval's Python API would load the
model first). Needs the ``eval`` extra (``lm-eval[hf]``, ``transformers``).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_objectives.hosts.common.run_record import ExportError

TASKS = Path(__file__).resolve().parent / "tasks"
NOT_SCORES = ("_stderr", "sample_len")
INSTALL = "EVAL=1 ./scripts/setup.sh (or pip install 'titan-objectives[eval]')"


def bundled_tasks() -> list[str]:
    return sorted(path.stem for path in TASKS.glob("*.yaml"))


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ExportError(
            f"evaluate needs lm-evaluation-harness: install it with {INSTALL}"
        ) from None
    return lm_eval


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index: the bundled tasks, and lm-eval's own only when a task asked
    for is not bundled (indexing them takes seconds). Unknown names are an error naming
    ``--tasks``, before any model is loaded."""
    from lm_eval.tasks import TaskManager

    bundled = bundled_tasks()
    others = [t for t in tasks if t not in bundled]
    manager = TaskManager(include_path=str(TASKS), include_defaults=bool(others))
    unknown = [t for t in others if t not in manager.all_tasks]
    if unknown:
        raise ExportError(
            f"--tasks {','.join(unknown)}: lm-eval has no such task. Bundled tasks (local "
            f"files, no download): {', '.join(bundled)}; lm-eval's own tasks (arc_challenge, "
            "hellaswag, piqa, mmlu_pro, ...; `lm_eval ls tasks` lists them) read their "
            "datasets from the Hugging Face hub"
        )
    return manager


def check_export_folder(folder: Path) -> None:
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ExportError(
            f"DIR {str(folder)!r} is not an exported model (no {', '.join(missing)}): pass "
            "a folder `titan-objectives export` wrote, or a run's dump folder (exported first)"
        )


@dataclass(frozen=True)
class Evaluation:
    results_file: Path
    results: dict[str, Any]
    """lm-eval's results: ``results[task][metric,filter]`` and the run's settings."""

    def table(self) -> str:
        from lm_eval.utils import make_table

        return make_table(self.results)


def evaluate(
    model_folder: Path,
    tasks: list[str],
    output_dir: Path,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> Evaluation:
    """Score the exported model in ``model_folder`` on ``tasks``; lm-eval's results go to
    ``output_dir/results_<time>.json``. The model reads text with a BOS token first, as
    torchtitan's datasets trained it."""
    lm_eval = _lm_eval()
    check_export_folder(model_folder)
    manager = task_manager(tasks)
    import torch
    from lm_eval.utils import handle_non_serializable

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(model_folder),
            "dtype": "float32",
            "add_bos_token": True,
        },
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        task_manager=manager,
        log_samples=False,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return Evaluation(path, results)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` -> value, from lm-eval's results (standard errors left out)."""
    found = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",", 1)[0]
            if isinstance(value, (int, float)) and not metric.endswith(NOT_SCORES):
                found[f"{task}/{metric}"] = float(value)
    return found
