"""The torchtitan release this host is written against, and every private part of
torchtitan and torch it touches.

torchtitan 0.2.2 has no public hook for a few things the host needs; each entry below
names the private attribute, the module of ours that uses it and why. A test checks that
every one still exists, so an upgrade that moves one fails there, by name, instead of
deep inside a training run.
"""

import importlib.metadata

SUPPORTED_TORCHTITAN = "0.2.2"

# (module, attribute path, our module that uses it, why)
PRIVATE_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    ("torchtitan.protocols.train_spec", "_extra_train_specs", "trainer",
     "serve the wrapped TrainSpec under the model's own name while the Trainer builds"),
    ("torchtitan.components.checkpoint", "CheckpointManager._save_last_step", "checkpointing",
     "leave the objectives' modules out of the model-only save at the last step"),
    ("torchtitan.components.checkpoint", "CheckpointManager.dcp_load", "checkpointing",
     "fit a checkpoint to the current stack before DCP reads it"),
    ("torchtitan.tools.utils", "device_type", "cpu_runtime",
     "bound at import from torch._utils: must say cpu without an accelerator"),
    ("torch._utils", "_get_available_device_type", "cpu_runtime",
     "answers cpu while torchtitan.tools.utils is first imported"),
    ("torch._utils", "_get_device_module", "cpu_runtime",
     "a CPU device module with the memory statistics torchtitan's metrics read"),
    ("torch.distributed.fsdp._fully_shard._fsdp_collectives", "_get_gradient_divide_factors",
     "cpu_runtime", "force SUM reductions: gloo has no PREMUL_SUM"),
    ("torchtitan.models.moe.utils", "generate_permute_indices", "cpu_runtime",
     "imported from torchtitan.models.moe.kernels (Triton): that module is replaced by "
     "a plain-PyTorch one"),
)  # fmt: skip


class UnsupportedTorchtitanError(ImportError):
    pass


def check_torchtitan_version() -> None:
    """Stop at import, naming the versions, when another torchtitan is installed."""
    try:
        installed = importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != SUPPORTED_TORCHTITAN:
        found = f"torchtitan {installed} is installed" if installed else "torchtitan is missing"
        raise UnsupportedTorchtitanError(
            f"titan_objectives.integration is the host for torchtitan {SUPPORTED_TORCHTITAN} "
            f"(TOML job configs), and {found}: pip install torchtitan=={SUPPORTED_TORCHTITAN} "
            "(./scripts/setup.sh does)"
        )
