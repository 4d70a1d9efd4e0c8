"""The torchtitan release this host is written against, every private part of torchtitan
and torch it touches, and the objects it extends in place.

torchtitan 0.2.2 has no public hook for a few things the host needs; each entry below
names the private attribute, the module of ours that uses it and why. A test checks that
every one still exists, so an upgrade that moves one fails there, by name, instead of
deep inside a training run.
"""

from typing import Any

from titan_objectives.hosts.common.checkpoint_state import ObjectiveCheckpointing, checkpoint_seams
from titan_objectives.hosts.common.cpu_patches import CPU_SEAMS
from titan_objectives.hosts.common.extend import extend
from titan_objectives.hosts.common.nonfinite import GuardedOptimizers
from titan_objectives.hosts.common.version import require_torchtitan

SUPPORTED_TORCHTITAN = "0.2.2"

# (module, attribute path, our module that uses it, why)
PRIVATE_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    *CPU_SEAMS,
    (
        "torchtitan.config.manager",
        "tyro",
        "runtime/extensions",
        "its tyro.cli spells flags as the fields are named (--objectives.hidden_rms.*)",
    ),
    *checkpoint_seams("torchtitan.components.checkpoint"),
    (
        "torchtitan.protocols.train_spec",
        "_extra_train_specs",
        "trainer",
        "serve the wrapped TrainSpec under the model's own name while the Trainer builds",
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
