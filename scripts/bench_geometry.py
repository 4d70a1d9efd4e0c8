"""Step-time overhead of the geometry probe: runs with ``geometry.freq = 0`` and with
``--freq`` (default 10), alternating ``--repeats`` times (run-to-run noise on a shared
machine is several percent), then prints step times, their ratio, and the probe's own
cost timed directly at the run's sizes. Extra arguments go to every run.

    python scripts/bench_geometry.py --steps 60 -- --training.seq_len 256
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from titan_objectives.report import load_scalars

ROOT = Path(__file__).resolve().parents[1]


def step_times(dump: Path, args: list[str]) -> list[float]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        "-m",
        "titan_objectives.train",
        "--job.dump_folder",
        str(dump),
        "--metrics.log_freq",
        "1",
        *args,
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    times = load_scalars(dump)["time_metrics/end_to_end(s)"]
    return [times[s] for s in sorted(times) if s > 5]  # after warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "toml_configs" / "llama3_debug_nitp.toml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--freq", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    common = ["--job.config_file", args.config, "--training.steps", str(args.steps), *args.extra]
    times: dict[int, list[float]] = {0: [], args.freq: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for freq in times:
                dump = Path(tmp) / f"{freq}_{repeat}"
                times[freq] += step_times(dump, [*common, "--objectives.geometry.freq", str(freq)])
    print("| geometry.freq | median step s | mean step s |\n|---|---|---|")
    for freq, values in times.items():
        print(f"| {freq} | {statistics.median(values):.4f} | {statistics.mean(values):.4f} |")
    off, on = statistics.mean(times[0]), statistics.mean(times[args.freq])
    print(f"end-to-end mean step-time overhead: {100 * (on / off - 1):+.2f}%")
    probe = probe_seconds()
    print(
        f"probe cost, timed directly: {probe * 1e3:.1f} ms per measurement = "
        f"{100 * probe / args.freq / off:.2f}% of a {off:.3f} s step at freq {args.freq}"
    )


def probe_seconds(batch: int = 8, seq: int = 256, dim: int = 256, repeats: int = 5) -> float:
    """One sample + measurement of two hidden states at the debug config's sizes."""
    import time

    import torch

    from titan_objectives.hosts.common.geometry_probe import GeometryProbe
    from titan_objectives.sequence import UNSHARDED

    probe = GeometryProbe([2], 2048, 4096, None, 0, 1, UNSHARDED)
    hidden = {"final": torch.randn(batch, seq, dim), 2: torch.randn(batch, seq, dim)}
    durations = []
    for seed in range(repeats):
        start = time.perf_counter()
        probe.take_sample(hidden, seed, valid=torch.ones(batch, seq, dtype=torch.bool))
        probe.measure(seed)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


if __name__ == "__main__":
    main()
