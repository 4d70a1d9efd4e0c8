"""Compare runs: ``python scripts/compare_runs.py RUN_DIR... --out DIR``.

Reads each run's TensorBoard event files (a run's dump folder, or its tb/ folder) and
writes losses.png, effective_rank.png, avg_cosine.png (one line per run) and summary.md
(the final value of each objective loss and geometry metric)."""

import argparse

from titan_objectives.report import compare_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding TensorBoard event files")
    parser.add_argument("--out", required=True, help="folder for the plots and summary.md")
    args = parser.parse_args()
    for path in compare_runs(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    main()
