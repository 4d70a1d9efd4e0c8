"""The torchtitan release this host is written against, every private part of torchtitan
and torch it touches (a test checks that each still exists and is used where listed, so an
upgrade that moves one fails there, by name), and the objects it extends in place."""

from typing import Any

from titan_objectives.hosts.common.checkpoint_state import checkpoint_seams
from titan_objectives.hosts.common.cpu_patches import CPU_SEAMS
from titan_objectives.hosts.common.extend import extend
from titan_objectives.hosts.common.nonfinite import GuardedOptimizers
from titan_objectives.hosts.common.version import require_torchtitan

SUPPORTED_TORCHTITAN = "0.3.0"

# (module, attribute path, our module that uses it, why)
PRIVATE_SEAMS: tuple[tuple[str, str, str, str], ...] = (
    *CPU_SEAMS,
    (
        "torchtitan.config.manager",
        "tyro",
        "runtime/extensions",
        "its tyro.cli spells flags as the fields are named (--objectives.hidden_rms.*)",
    ),
    *checkpoint_seams("torchtitan.components.checkpointer"),
    (
        "torchtitan.models.common.decoder",
        "Decoder._skip_lm_head",
        "trainer",
        "the model returns its final hidden states when no objective reads the logits",
    ),
    (
        "torchtitan.trainer",
        "Trainer._forward_backward_body",
        "trainer",
        "overridden: one forward, the objective stack's loss, one backward",
    ),
    (
        "torchtitan.protocols.module",
        "Module._init_self_parameters",
        "model_adapter",
        "the stack's own init_weights runs inside the model's init_states",
    ),
    (
        "torchtitan.config.manager",
        "ConfigManager._load_config",
        "launch",
        "overridden: a loaded config becomes an ObjectiveTrainer.Config, with --objectives.toml",
    ),
    (
        "torchtitan.models.common.attention",
        "FlexAttention.compiled_flex_attn",
        "runtime/cpu",
        "replaced by dense-mask SDPA on CPU (FlexAttention has no CPU backward)",
    ),
)


def extend_trainer_objects(trainer: Any) -> None:
    """The objects torchtitan 0.3 builds that the host cannot reach through a config
    class, given their mixins here, in one place: the optimizers container (its config
    class differs per optimizer family), whose step the non-finite guard decides."""
    extend(trainer.optimizers, GuardedOptimizers)


def check_torchtitan_version() -> None:
    require_torchtitan(
        SUPPORTED_TORCHTITAN,
        __package__,
        "Python configs",
        "TORCHTITAN=0.3 ./scripts/setup.sh makes its own environment (.venv-tt03)",
    )
