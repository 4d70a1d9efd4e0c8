"""``TRAINER_PROBE=name python -m trainer_probes --job.config_file ...``: the objective
trainer with a test probe, for what the logs do not show.

- ``validate_only``: builds the trainer and runs one validation, no training step (flex
  attention runs forward on CPU, but has no backward there);
- ``dump_gradients``: trains as usual and saves, after step 1's backward and before
  clipping, the whole gradients of a few parameters to ``<dump_folder>/gradients.<rank>.pt``.
"""

import os

from titan_objectives.hosts.torchtitan_0_2.runtime import cpu as cpu_runtime

cpu_runtime.activate()

import torch  # noqa: E402

from tests.helpers import save_whole_gradients  # noqa: E402
from titan_objectives import train  # noqa: E402
from titan_objectives.hosts.torchtitan_0_2.trainer import ObjectiveTrainer  # noqa: E402

GRADIENTS = (
    "tok_embeddings.weight",
    "layers.0.attention.wq.weight",
    "layers.5.attention.wq.weight",  # the last block: on another pipeline stage
    "norm.weight",
    "output.weight",
)
# Saved too when the stack has them.
OBJECTIVE_GRADIENTS = (
    "objectives.nitp.projector.w1.weight",
    "objectives.mtp.depths.0.projection.weight",
    "objectives.top.head.weight",
)


class ValidateOnly(ObjectiveTrainer):
    def train(self) -> None:
        self.step = 1
        self.validator.validate(self.model_parts, self.step)


class DumpGradients(ObjectiveTrainer):
    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        if self.step == 1:
            names = (*GRADIENTS, *OBJECTIVE_GRADIENTS)
            save_whole_gradients(self.model_parts, names, self.job_config.job.dump_folder)
        return loss


PROBES = {"validate_only": ValidateOnly, "dump_gradients": DumpGradients}

if __name__ == "__main__":
    train.main(trainer_class=PROBES[os.environ["TRAINER_PROBE"]])
