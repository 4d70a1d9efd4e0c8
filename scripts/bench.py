"""Throughput, memory and MFU of each objective stack, side by side in one run, on one
GPU (or under pipeline parallelism, ``--pp N``); plus plain torchtitan (its own Trainer)
on the same config.

    python scripts/bench.py --size 125M        # ~110M Llama3, seq 1024, batch 32, bf16, compile
    python scripts/bench.py --size 1B          # dim 2048, 16 blocks, seq 2048
    python scripts/bench.py --tiny             # CPU smoke: debug model, a few steps
    python scripts/bench.py --tiny --pp 2      # the same under pipeline parallelism (2 ranks)

Each stack trains in its own process from the same config, seed and data, the stacks
alternating (A B C A B C ...) for ``--rounds`` rounds, so that a shared machine's drift
hits them alike. A run's figures are medians over its steps after ``--warmup``, read from
its TensorBoard log (under PP, the last stage's rank's); the table gives each stack's
median over rounds, and its time against ``ntp`` as the median of the rounds' ratios with
their spread (flagged when the spread is wider than the effect). FLOPs overheads come
from the model shapes (torchtitan's count for the model, each objective's
``flops_per_token``). The GPU sizes read ``data/gutenberg/{train,val}.jsonl.gz`` (see
docs/data.md) with the bundled ``assets/tokenizer-bpe16k``.
"""

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STACKS = {
    "ntp": ("titan_objectives.train", ["--objectives.stack", "ntp"]),
    "torchtitan (plain)": (
        "titan_objectives.hosts.torchtitan_0_2.baseline",
        ["--objectives.stack", "ntp"],
    ),
    "ntp+nitp": ("titan_objectives.train", ["--objectives.stack", "ntp,nitp"]),
    "ntp+nitp (recomputed projector)": (
        "titan_objectives.train",
        ["--objectives.stack", "ntp,nitp", "--objectives.nitp.recompute_projector"],
    ),
    "ntp+mtp": ("titan_objectives.train", ["--objectives.stack", "ntp,mtp"]),
    "ntp+mtp (chunked CE)": (
        "titan_objectives.train",
        [
            "--objectives.stack",
            "ntp,mtp",
            "--objectives.ntp.chunk_size",
            "4096",
            "--objectives.mtp.chunk_size",
            "4096",
        ],
    ),
    "ntp+nitp+mtp": ("titan_objectives.train", ["--objectives.stack", "ntp,nitp,mtp"]),
}

SIZES = {
    "125M": [
        "--model.flavor",
        "125M",
        "--training.seq_len",
        "1024",
        "--training.local_batch_size",
        "32",
    ],
    "1B": [
        "--model.flavor",
        "1B",
        "--training.seq_len",
        "2048",
        "--training.local_batch_size",
        "8",
    ],
}
GPU_COMMON = [
    "--model.hf_assets_path",
    "assets/tokenizer-bpe16k",
    "--training.dataset",
    "local_text",
    "--training.dataset_path",
    "data/gutenberg/train.jsonl.gz",
    "--training.mixed_precision_param",
    "bfloat16",
    "--compile.enable",
]
TINY = [
    "--model.flavor",
    "debugmodel",
    "--training.seq_len",
    "128",
    "--training.local_batch_size",
    "4",
    "--training.mixed_precision_param",
    "float32",
    "--compile.no-enable",
]


CONFIG = [
    "--job.config_file",
    str(ROOT / "toml_configs" / "llama3_125m_nitp.toml"),
    "--validation.no-enable",
    "--objectives.geometry.freq",
    "0",
    "--debug.seed",
    "0",
]


def run(
    module: str, args: list[str], dump: Path, steps: int, nproc: int
) -> dict[str, dict[int, float]]:
    from titan_objectives.report import load_scalars

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        "-m",
        module,
        *CONFIG,
        "--job.dump_folder",
        str(dump),
        "--training.steps",
        str(steps),
        "--metrics.log_freq",
        "1",
        *args,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stdout[-3000:]}")
    return load_scalars(dump)


def median_after(values: dict[int, float], warmup: int) -> float:
    return statistics.median(v for step, v in values.items() if step > warmup)


def flops_overhead(args: list[str]) -> float:
    """Extra training FLOPs of the stack over the model's, from the shapes."""
    from titan_objectives.hosts.torchtitan_0_2.cli import checked_config

    # Options the stack leaves unused (the TOML's [objectives.nitp]) are expected here.
    logging.getLogger("titan_objectives.config").setLevel(logging.ERROR)
    checked, model = checked_config([*CONFIG, *args])
    extra = sum(objective.flops_per_token() for objective in checked.stack.objectives().values())
    return extra / model.flops_per_token


@dataclass
class Measured:
    """One stack's figures, one entry per round."""

    tps: list[float] = field(default_factory=list)
    memory: list[float] = field(default_factory=list)
    mfu: list[float] = field(default_factory=list)
    flops: float = 0.0


def time_against(measured: Measured, base: Measured) -> str:
    """The median over rounds of this stack's step time against ``ntp``'s in the same
    round, with the rounds' spread; flagged when the spread is wider than the effect."""
    ratios = [100 * (b / t - 1) for t, b in zip(measured.tps, base.tps, strict=True)]
    median = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{median:+.1f}%"
    low, high = min(ratios), max(ratios)
    noisy = " (spread wider than the effect)" if high - low > abs(median) else ""
    return f"{median:+.1f}% ({low:+.1f} to {high:+.1f}){noisy}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="125M")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the debug model")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="A B A B ... rounds (default 3)")
    parser.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel degree: one rank per stage (1F1B)"
    )
    parser.add_argument(
        "--stacks",
        default=",".join(STACKS),
        help=f"comma-separated rows to measure, ntp first (default: all: {','.join(STACKS)})",
    )
    args = parser.parse_args()
    chosen = args.stacks.split(",")
    unknown = [name for name in chosen if name not in STACKS]
    if unknown or chosen[0] != "ntp":
        parser.error(f"--stacks {args.stacks!r}: start with ntp and choose from {list(STACKS)}")
    if args.rounds < 1 or args.pp < 1:
        parser.error(f"--rounds {args.rounds} --pp {args.pp}: both must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    chosen = args.stacks.split(",")

    from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime

    cpu_runtime.activate()  # before anything imports torchtitan
    from titan_objectives.hosts.torchtitan_0_2.runtime.extensions import register_extensions

    register_extensions()
    if args.tiny:
        size = [
            "--model.hf_assets_path",
            "assets/tokenizer-bpe2k-tiny",
            "--training.dataset_path",
            "assets/tiny/train.txt",
            *TINY,
        ]
        steps, warmup = args.steps or 6, args.warmup or 2
    else:
        size, steps, warmup = [*GPU_COMMON, *SIZES[args.size]], args.steps or 60, args.warmup or 20
    if args.pp > 1:
        size += [
            "--parallelism.pipeline_parallel_degree",
            str(args.pp),
            "--parallelism.data_parallel_shard_degree",
            "1",
            "--parallelism.pipeline_parallel_schedule",
            "1F1B",
        ]

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    label = "tiny (debug model, CPU smoke)" if args.tiny else args.size
    parallel = f", PP {args.pp} (1F1B)" if args.pp > 1 else ""
    print(
        f"# {label}{parallel} on {device}, torch {torch.__version__}; medians of steps "
        f"{warmup + 1}-{steps}, {args.rounds} alternating round(s)"
    )
    measured = {name: Measured() for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name in chosen:
                module, stack_args = STACKS[name]
                dump = Path(tmp) / f"{round_index}-{chosen.index(name)}"
                tb = run(module, [*size, *stack_args], dump, steps, args.pp)
                figures = measured[name]
                figures.tps.append(median_after(tb["throughput(tps)"], warmup))
                figures.memory.append(median_after(tb["memory/max_reserved(GiB)"], warmup))
                figures.mfu.append(median_after(tb["mfu(%)"], warmup))
            print(f"# round {round_index + 1} of {args.rounds} done", flush=True)
    print(
        "| stack | tokens/s | peak memory GiB | MFU % | time vs ntp (rounds' spread) "
        "| memory vs ntp | FLOPs vs ntp |\n|---|---|---|---|---|---|---|"
    )
    base = measured["ntp"]
    for name in chosen:
        figures = measured[name]
        figures.flops = flops_overhead([*size, *STACKS[name][1]])
        memory = statistics.median(figures.memory)
        print(
            f"| {name} | {statistics.median(figures.tps):,.0f} | {memory:.2f} | "
            f"{statistics.median(figures.mfu):.1f} | {time_against(figures, base)} | "
            f"{100 * (memory / statistics.median(base.memory) - 1):+.1f}% "
            f"| {100 * figures.flops:+.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
