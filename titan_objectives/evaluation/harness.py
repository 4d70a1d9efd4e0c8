"""lm-evaluation-harness on an exported model (``titan-objectives evaluate``): lm-eval's
Hugging Face backend, the bundled local tasks or lm-eval's own, and lm-eval's results file.

Task names are checked before any model is loaded (lm-eval's Python API would load the
model first). Needs the ``eval`` extra (``lm-eval[hf]``, ``transformers``).
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titan_objectives.evaluation.task_data import TASKS
from titan_objectives.hosts.common.run_record import ExportError

NOT_SCORES = ("_stderr", "sample_len")
INSTALL = "EVAL=1 ./scripts/setup.sh (or pip install 'titan-objectives[eval]')"


def bundled_tasks() -> list[str]:
    """The local tasks shipped in ``evaluation/tasks`` (one YAML file each)."""
    return sorted(path.stem for path in TASKS.glob("*.yaml"))


def requested_tasks(text: str | None) -> list[str]:
    """``--tasks``: comma-separated names, the bundled tasks when not given."""
    if text is None:
        return bundled_tasks()
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ExportError(
            f"--tasks {text!r} has an empty task name; expected comma-separated task names"
        )
    return names


def require_eval_extra(command: str) -> None:
    """A clear error, before any work, when the ``eval`` extra is not installed."""
    import importlib.util

    missing = [m for m in ("lm_eval", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{command} needs {' and '.join(missing)}: install them with {INSTALL}")


def task_manager(tasks: list[str]) -> Any:
    """lm-eval's task index: the bundled tasks, and lm-eval's own only when a task asked
    for is not bundled (indexing them takes seconds). Unknown names are an error naming
    ``--tasks``, before any model is loaded. With bundled tasks alone, sets
    ``HF_HUB_OFFLINE=1`` for this process (unless set) before lm-eval's imports read it."""
    require_eval_extra("evaluate")
    bundled = bundled_tasks()
    others = [t for t in tasks if t not in bundled]
    if not others:  # local files only: no hub lookups (read when lm-eval's imports load the hub)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

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
    """``folder`` holds what ``export`` writes: a ``config.json`` and safetensors."""
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ExportError(
            f"DIR {str(folder)!r} is not an exported model (no {', '.join(missing)}): pass "
            "a folder `titan-objectives export` wrote, or a run's dump folder (exported first)"
        )


@dataclass(frozen=True)
class Evaluation:
    """Where lm-eval's results went, and the results."""

    results_file: Path
    results: dict[str, Any]
    """lm-eval's results: ``results[task][metric,filter]`` and the run's settings."""

    def table(self) -> str:
        from lm_eval.utils import make_table

        return make_table(self.results)


def _results_file(output_dir: Path) -> Path:
    """A new ``results_<time>.json`` in ``output_dir`` (made now: an unwritable folder
    fails before the evaluation, not after)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    path, n = output_dir / f"results_{stamp}.json", 1
    while path.exists():
        path, n = output_dir / f"results_{stamp}_{n}.json", n + 1
    return path


def evaluate(
    model_folder: Path,
    tasks: list[str],
    output_dir: Path,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    manager: Any = None,
) -> Evaluation:
    """Score the exported model in ``model_folder`` on ``tasks`` (indexed by ``manager``,
    made here if None); lm-eval's results go to ``output_dir/results_<time>.json``.
    lm-eval's default BOS handling: a document scored whole follows a BOS token (its
    prefix token), as torchtitan's datasets start documents; a context is read as it is
    (``add_bos_token`` would also score a BOS after that prefix in rolling perplexity)."""
    check_export_folder(model_folder)
    manager = manager or task_manager(tasks)
    path = _results_file(output_dir)
    import lm_eval
    import torch
    from lm_eval.utils import handle_non_serializable

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_folder), "dtype": "float32"},
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        task_manager=manager,
        log_samples=False,
    )
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return Evaluation(path, results)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """``task/metric`` (``task/metric,filter`` for a filter other than ``none``) -> value,
    from lm-eval's results (standard errors left out)."""
    found = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, where = key.partition(",")
            if isinstance(value, (int, float)) and not metric.endswith(NOT_SCORES):
                found[f"{task}/{metric}" + (f",{where}" if where not in ("", "none") else "")] = (
                    float(value)
                )
    return found
