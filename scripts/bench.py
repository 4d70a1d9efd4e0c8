"""Throughput, memory and MFU of each objective stack, side by side in one run, on one
GPU; plus plain torchtitan (its own Trainer) on the same config.

    python scripts/bench.py --size 125M        # ~110M Llama3, seq 1024, batch 32, bf16, compile
    python scripts/bench.py --size 1B          # dim 2048, 16 blocks, seq 2048
    python scripts/bench.py --tiny             # CPU smoke: debug model, a few steps

Each stack trains in its own process from the same config, seed and data; figures are
medians over the steps after ``--warmup``, read from the runs' TensorBoard logs. FLOPs
overheads come from the model shapes (torchtitan's count for the model, each objective's
``flops_per_token``). The GPU sizes read ``data/gutenberg/{train,val}.jsonl.gz`` (see
docs/data.md) with the bundled ``assets/tokenizer-bpe16k``.
"""

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
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


def run(module: str, args: list[str], dump: Path, steps: int) -> dict[str, dict[int, float]]:
    from titan_objectives.report import load_scalars

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="125M")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of the debug model")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
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

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    label = "tiny (debug model, CPU smoke)" if args.tiny else args.size
    print(
        f"# {label} on {device}, torch {torch.__version__}; medians of steps {warmup + 1}-{steps}"
    )
    print(
        "| stack | tokens/s | peak memory GiB | MFU % | time vs ntp | memory vs ntp "
        "| FLOPs vs ntp |\n|---|---|---|---|---|---|---|"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            module, stack_args = STACKS[name]
            tb = run(module, [*size, *stack_args], Path(tmp) / str(len(rows)), steps)
            rows[name] = (
                median_after(tb["throughput(tps)"], warmup),
                median_after(tb["memory/max_reserved(GiB)"], warmup),
                median_after(tb["mfu(%)"], warmup),
                flops_overhead([*size, *stack_args]),
            )
            tps, memory, mfu, flops = rows[name]
            base_tps, base_memory = rows.get("ntp", rows[name])[:2]
            print(
                f"| {name} | {tps:,.0f} | {memory:.2f} | {mfu:.1f} | "
                f"{100 * (base_tps / tps - 1):+.1f}% | {100 * (memory / base_memory - 1):+.1f}% "
                f"| {100 * flops:+.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
