"""``TRAINER_PROBE=name python -m tests.hosts.torchtitan_0_3.trainer_probe --module M
--config FN``: the objective trainer with a test probe, through
``train.main(trainer_class=...)`` as on 0.2.2.

- ``report_only`` (the default): builds, reports what it built, and trains nothing;
- ``dump_gradients``: trains as usual and saves, after step 1's backward and before
  clipping, the whole gradients of a few parameters to ``<dump_folder>/gradients.<rank>.pt``.
"""

import os

from titan_objectives.hosts.torchtitan_0_3.runtime import cpu as cpu_runtime

cpu_runtime.activate()

import torch  # noqa: E402

from tests.helpers import save_whole_gradients  # noqa: E402
from titan_objectives import train  # noqa: E402
from titan_objectives.hosts.torchtitan_0_3.trainer import ObjectiveTrainer  # noqa: E402

# Saved when the model or the stack has them (llama3's fused attention, deepseek_v3's MLA).
GRADIENTS = (
    "tok_embeddings.weight",
    "layers.0.attention.qkv_linear.wqkv.weight",
    "layers.0.attention.wq.weight",
    "norm.weight",
    "lm_head.weight",
    "objectives.nitp.projector.w1.weight",
    "objectives.mtp.depths.0.projection.weight",
    "objectives.top.head.weight",
)


class ReportOnly(ObjectiveTrainer):
    def train(self) -> None:
        print(f"built {type(self).__name__} with {', '.join(self.objectives.stack)}")


class DumpGradients(ObjectiveTrainer):
    def forward_backward_step(self, **kwargs) -> torch.Tensor:
        loss = super().forward_backward_step(**kwargs)
        if self.step == 1:
            save_whole_gradients(self.model_parts, GRADIENTS, self.config.dump_folder)
        return loss


PROBES = {"report_only": ReportOnly, "dump_gradients": DumpGradients}

if __name__ == "__main__":
    train.main(trainer_class=PROBES[os.environ.get("TRAINER_PROBE", "report_only")])
