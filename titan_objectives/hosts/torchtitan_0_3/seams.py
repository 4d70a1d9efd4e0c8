"""The torchtitan release this host is written against, and every private part of
torchtitan and torch it touches (a test checks that each still exists and is used where
listed, so an upgrade that moves one fails there, by name)."""

import importlib.metadata

SUPPORTED_TORCHTITAN = "0.3.0"

# (module, attribute path, our module that uses it, why)
PRIVATE_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    ("torchtitan.components.checkpointer", "CheckpointManager._save_last_step",
     "../common/checkpoint_state",
     "leave the objectives' modules out of the model-only save at the last step"),
    ("torchtitan.components.checkpointer", "CheckpointManager.dcp_load",
     "../common/checkpoint_state", "fit a checkpoint to the current stack before DCP reads it"),
    ("torchtitan.models.common.decoder", "Decoder._skip_lm_head", "trainer",
     "the model returns its final hidden states when no objective reads the logits"),
    ("torchtitan.tools.utils", "device_type", "../common/cpu_patches",
     "bound at import from torch._utils: must say cpu without an accelerator"),
    ("torch._utils", "_get_available_device_type", "../common/cpu_patches",
     "answers cpu while torchtitan.tools.utils is first imported"),
    ("torch._utils", "_get_device_module", "../common/cpu_patches",
     "a CPU device module with the memory statistics torchtitan's metrics read"),
    ("torch.distributed.fsdp._fully_shard._fsdp_collectives", "_get_gradient_divide_factors",
     "../common/cpu_patches", "force SUM reductions: gloo has no PREMUL_SUM"),
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
            f"{__package__} is the host for torchtitan {SUPPORTED_TORCHTITAN} (Python "
            f"configs), and {found}: TORCHTITAN=0.3 ./scripts/setup.sh makes its own "
            "environment (.venv-tt03); torchtitan 0.2.2 has its own host, "
            "titan_objectives.hosts.torchtitan_0_2"
        )
