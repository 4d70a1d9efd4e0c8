"""Compare training runs from their TensorBoard event files: PNG plots and a Markdown
table of final values, and with ``evaluate`` a table of each run's downstream scores
(``titan-objectives compare``)."""

from pathlib import Path

PLOTS = {
    "losses.png": ("objectives/", "/loss"),
    "effective_rank.png": ("geometry/", "/effective_rank"),
    "effective_rank_sv.png": ("geometry/", "/effective_rank_sv"),
    "avg_cosine.png": ("geometry/", "/avg_cosine"),
}


def event_files(run_dir: str | Path) -> list[Path]:
    """The TensorBoard event files under ``run_dir``."""
    return sorted(Path(run_dir).rglob("events.out.tfevents.*"))


def load_scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from every event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = event_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    values: dict[str, dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                values.setdefault(tag, {})[event.step] = event.value
    return values


def run_names(run_dirs: list[Path]) -> list[str]:
    """Shortest distinct names: the folder name, or more of the path when they clash."""
    for depth in range(1, max(len(p.parts) for p in run_dirs) + 1):
        names = ["/".join(p.parts[-depth:]) for p in run_dirs]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in run_dirs]


def _tags(runs: dict, infix: str, suffix: str) -> list[str]:
    """Matching tags, training first, then validation (``validation/<tag>``)."""
    tags = {t for scalars in runs.values() for t in scalars if t.endswith(suffix)}
    training = sorted(t for t in tags if t.startswith(infix))
    validation = sorted(t for t in tags if t.startswith("validation/" + infix))
    return training + validation


def _plot(runs: dict, tags: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(tags))
    rows = (len(tags) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, tag in zip(axes.flat, tags, strict=False):
        for name, scalars in runs.items():
            if tag in scalars:
                steps = sorted(scalars[tag])
                axis.plot(steps, [scalars[tag][s] for s in steps], label=name, marker=".")
        axis.set_title(tag, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(tags) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_table(runs: dict[str, dict[str, dict[int, float]]]) -> str:
    tags = [t for infix, suffix in PLOTS.values() for t in _tags(runs, infix, suffix)]
    tags = list(dict.fromkeys(tags))
    lines = [
        "| tag | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for tag in tags:
        cells = []
        for scalars in runs.values():
            if tag in scalars:
                step = max(scalars[tag])
                cells.append(f"{scalars[tag][step]:.4f} (step {step})")
            else:
                cells.append("")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def downstream_table(scores: dict[str, dict[str, float]]) -> str:
    """One row per run, one column per task and metric (lm-eval's names)."""
    columns = list(dict.fromkeys(c for run in scores.values() for c in run))
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in scores.items():
        cells = [f"{values[c]:.4g}" if c in values else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def downstream_scores(
    runs: dict[str, Path], tasks: list[str] | None, limit: int | None
) -> dict[str, dict[str, float]]:
    """Each run's last checkpoint exported (``RUN/hf/step-N``) and scored by lm-eval
    (results in ``RUN/eval``); the task names are checked before the first export."""
    from titan_objectives.evaluation.harness import bundled_tasks, evaluate, scores, task_manager
    from titan_objectives.evaluation.runs import check_exports, model_folder

    tasks = tasks or bundled_tasks()
    manager = task_manager(tasks)
    for path in runs.values():  # every run exportable, before the first export
        check_exports(path)
    found = {}
    for name, path in runs.items():
        evaluation = evaluate(model_folder(path), tasks, path / "eval", limit, manager=manager)
        found[name] = scores(evaluation.results)
    return found


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    evaluate: bool = False,
    tasks: list[str] | None = None,
    limit: int | None = None,
) -> list[Path]:
    """Writes the plots and ``summary.md`` into ``out_dir``; returns the files written."""
    paths = [Path(p) for p in run_dirs]
    runs = {name: load_scalars(path) for name, path in zip(run_names(paths), paths, strict=True)}
    scores = (
        downstream_scores(dict(zip(runs, paths, strict=True)), tasks, limit) if evaluate else {}
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (infix, suffix) in PLOTS.items():
        tags = _tags(runs, infix, suffix)
        if tags:
            _plot(runs, tags, out / filename)
            written.append(out / filename)
    summary = out / "summary.md"
    text = "# Final values\n\n" + summary_table(runs)
    if evaluate:
        text += "\n# Downstream scores (lm-eval)\n\n" + downstream_table(scores)
    summary.write_text(text)
    written.append(summary)
    return written
