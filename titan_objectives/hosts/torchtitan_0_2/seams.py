"""The torchtitan release this host is written against, every private part of torchtitan
and torch it touches, and the objects it extends in place.

torchtitan 0.2.2 has no public hook for a few things the host needs; each entry below
names the private attribute, the module of ours that uses it and why. A test checks that
every one still exists, so an upgrade that moves one fails there, by name, instead of
deep inside a training run.
"""

from typing import Any

from titan_objectives.hosts.common.checkpoint_state import ObjectiveCheckpointing
from titan_objectives.hosts.common.extend import extend
from titan_objectives.hosts.common.nonfinite import GuardedOptimizers
from titan_objectives.hosts.common.version import require_torchtitan

SUPPORTED_TORCHTITAN = "0.2.2"

# (module, attribute path, our module that uses it, why)
PRIVATE_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    (
        "torchtitan.protocols.train_spec",
        "_extra_train_specs",
        "trainer",
        "serve the wrapped TrainSpec under the model's own name while the Trainer builds",
    ),
    (
        "torchtitan.components.checkpoint",
        "CheckpointManager._save_last_step",
        "../common/checkpoint_state",
        "leave the objectives' modules out of the model-only save at the last step",
    ),
    (
        "torchtitan.components.checkpoint",
        "CheckpointManager.dcp_load",
        "../common/checkpoint_state",
        "fit a checkpoint to the current stack before DCP reads it",
    ),
    (
        "torchtitan.tools.utils",
        "device_type",
        "../common/cpu_patches",
        "bound at import from torch._utils: must say cpu without an accelerator",
    ),
    (
        "torch._utils",
        "_get_available_device_type",
        "../common/cpu_patches",
        "answers cpu while torchtitan.tools.utils is first imported",
    ),
    (
        "torch._utils",
        "_get_device_module",
        "../common/cpu_patches",
        "a CPU device module with the memory statistics torchtitan's metrics read",
    ),
    (
        "torch.distributed.fsdp._fully_shard._fsdp_collectives",
        "_get_gradient_divide_factors",
        "../common/cpu_patches",
        "force SUM reductions: gloo has no PREMUL_SUM",
    ),
    (
        "torchtitan.models.moe.utils",
        "generate_permute_indices",
        "runtime/cpu",
        "imported from torchtitan.models.moe.kernels (Triton): that module is replaced by "
        "a plain-PyTorch one",
    ),
)


def extend_trainer_objects(trainer: Any) -> None:
    """The objects torchtitan 0.2.2's Trainer builds with no builder to extend, given
    their mixins here, in one place:

    - the checkpointer (``CheckpointManager(...)`` in ``Trainer.__init__``): loads fit a
      checkpoint to the stack, model-only saves leave the objectives out;
    - the optimizers container (its builder's result is compared by identity for MoE
      balancing, so it is extended, not the builder wrapped): the non-finite guard decides
      each step.
    """
    extend(trainer.checkpointer, ObjectiveCheckpointing)
    extend(trainer.optimizers, GuardedOptimizers)


def check_torchtitan_version() -> None:
    require_torchtitan(
        SUPPORTED_TORCHTITAN,
        __package__,
        "TOML job configs",
        "pip install torchtitan==0.2.2 (./scripts/setup.sh does)",
    )
